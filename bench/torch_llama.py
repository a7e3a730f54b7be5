"""The PyTorch side of the GPU benchmark: LLaMA-shaped models with random weights (bf16 frozen
base), batch x seq random tokens, causal-LM loss over every position, AdamW on the adapters.

Methods: base (the frozen-base floor: the backward runs from the loss to the embedded input,
which requires grad, so every layer's input gradient is computed but no weight gradient),
peft-lora, peft-dora (PEFT 0.21), singlora (a plain PyTorch SingLoRA layer written here, the
factored forward y = W0 x + s u A_out (A_in^T x)), each eager or under torch.compile, and qlora:
QLoRA as bitsandbytes and PEFT do it (the seven projections' weights in bitsandbytes' NF4 with
double quantisation, bf16 compute, PEFT LoRA on them; needs bitsandbytes; eager).

    python bench/torch_llama.py --shape tinyllama --methods base,peft-lora,peft-dora,singlora [--compile]

Prints one JSON line per configuration: median step time over --steps after --warmup, tokens/s,
peak memory (torch.cuda.max_memory_allocated), trainable parameter count.
"""
import argparse
import gc
import json
import statistics
import time

import torch
import transformers

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SingLoRALinear(torch.nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        d_out, d_in = base.weight.shape
        self.d_in, self.d_out = d_in, d_out
        n = max(d_in, d_out)
        self.A = torch.nn.Parameter(torch.empty(n, r, device=base.weight.device, dtype=torch.float32).uniform_(-(n**-0.5), n**-0.5))
        self.scale = alpha / r
        self.u = 1.0

    def forward(self, x):
        a = self.A.to(x.dtype)
        h = x @ a[: self.d_in]
        return self.base(x) + (self.scale * self.u) * (h @ a[: self.d_out].T)


def to_nf4(model):
    """Every target projection as a bitsandbytes NF4 layer (double quantisation, bf16 compute),
    quantised from the bf16 weight on the GPU, which is then freed."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        for child, sub in list(mod.named_children()):
            if isinstance(sub, torch.nn.Linear) and child in TARGETS:
                q = bnb.nn.Linear4bit(sub.in_features, sub.out_features, bias=sub.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(sub.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to("cuda")
                if sub.bias is not None:
                    q.bias = sub.bias
                setattr(mod, child, q)
                del sub
    gc.collect()
    torch.cuda.empty_cache()


def build(shape, method, rank, vocab):
    cfg = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    model.config.use_cache = False
    if method == "qlora":
        to_nf4(model)
    if method in ("peft-lora", "peft-dora", "qlora"):
        import peft

        lc = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, use_dora=method == "peft-dora", lora_dropout=0.0)
        model = peft.get_peft_model(model, lc)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    elif method == "singlora":
        for name, mod in list(model.named_modules()):
            for child, sub in list(mod.named_children()):
                if isinstance(sub, torch.nn.Linear) and child in TARGETS:
                    setattr(mod, child, SingLoRALinear(sub, rank, rank))
    return model


def run(a, method, compiled):
    model = build(a.shape, method, a.rank, a.vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device="cuda", generator=g)
    embed = model.get_input_embeddings()

    def step():
        x = embed(ids)
        if method == "base":
            x = x.detach().requires_grad_(True)
        logits = model(inputs_embeds=x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    fn = torch.compile(step) if compiled else step
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    out = {
        "impl": "pytorch",
        "shape": a.shape,
        "batch": a.batch,
        "seq": a.seq,
        "method": method + (" compiled" if compiled else ""),
        "median_ms": med,
        "min_ms": min(times),
        "tokens_per_s": a.batch * a.seq / (med / 1e3),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_params": sum(p.numel() for p in params),
        "torch": torch.__version__,
    }
    del model, opt, params
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="tinyllama", choices=list(SHAPES))
    p.add_argument("--methods", default="base,peft-lora,peft-dora,singlora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile each configuration")
    p.add_argument("--eager-and-compiled", action="store_true")
    a = p.parse_args()
    modes = [False, True] if a.eager_and_compiled else [a.compile]
    for m in a.methods.split(","):
        for c in modes:
            try:
                print(json.dumps(run(a, m.strip(), c)), flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on to the next configuration
                print(json.dumps({"impl": "pytorch", "shape": a.shape, "method": m + (" compiled" if c else ""), "error": repr(e)[:300]}), flush=True)
