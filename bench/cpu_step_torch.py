"""The PyTorch side of the CPU step benchmark: one MiniLM training step, SingLoRA r = 8 on
query, key, value and attention.output.dense, batch 16 x 128 random tokens, mean pooling and a
linear head, AdamW; median of N steps after warm-up. The SingLoRA layer is a plain PyTorch
module written here (factored forward, no ΔW formed).

    python bench/cpu_step_torch.py MODEL_DIR [--batch 16] [--seq 128] [--steps 10] [--threads 2]
"""
import argparse
import json
import statistics
import time

import torch
import transformers

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--rank", type=int, default=8)
p.add_argument("--method", default="singlora", choices=["singlora", "lora", "peft-lora"])
p.add_argument("--compile", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)


class SingLoRALinear(torch.nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        d_out, d_in = base.weight.shape
        self.d_out, self.d_in = d_out, d_in
        n = max(d_in, d_out)
        self.A = torch.nn.Parameter(torch.empty(n, r).uniform_(-1 / n**0.5, 1 / n**0.5))
        self.s = alpha / r
        self.u = 1.0

    def forward(self, x):
        h = x @ self.A[: self.d_in]
        return self.base(x) + (self.s * self.u) * (h @ self.A[: self.d_out].T)


class LoRALinear(torch.nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        d_out, d_in = base.weight.shape
        self.A = torch.nn.Parameter(torch.empty(r, d_in).uniform_(-1 / d_in**0.5, 1 / d_in**0.5))
        self.B = torch.nn.Parameter(torch.zeros(d_out, r))
        self.s = alpha / r

    def forward(self, x):
        return self.base(x) + self.s * ((x @ self.A.T) @ self.B.T)


model = transformers.AutoModel.from_pretrained(a.model, torch_dtype=torch.float32)
model.requires_grad_(False)
targets = ("query", "key", "value", "attention.output.dense")
if a.method == "peft-lora":
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=list(targets)))
else:
    cls = SingLoRALinear if a.method == "singlora" else LoRALinear
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and any(full.endswith(t) for t in targets):
                setattr(mod, child_name, cls(child, a.rank, a.rank))
model.train()
# no dropout, as singlora trains
for m in model.modules():
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0
head = torch.nn.Linear(model.config.hidden_size, 2)
params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq))
mask = torch.ones_like(ids)
labels = torch.arange(a.batch) % 2


def step():
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    loss = torch.nn.functional.cross_entropy(head(pooled), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


fn = torch.compile(step) if a.compile else step
times = []
for i in range(a.warmup + a.steps):
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if i >= a.warmup:
        times.append(dt * 1e3)
med = statistics.median(times)
print(json.dumps({
    "impl": f"pytorch {torch.__version__} {a.method}{' compiled' if a.compile else ''}",
    "threads": a.threads, "median_ms": med, "min_ms": min(times),
    "tokens_per_s": a.batch * a.seq / (med / 1e3), "trainable": sum(p.numel() for p in params),
}))
