"""PyTorch DDP + PEFT beside `singlora-lab bench-scaling`: the same LLaMA-shaped step as
bench/torch_llama.py (random bf16 frozen base, batch x seq random tokens per GPU, causal-LM loss,
AdamW on the adapters), one process per GPU under torchrun, the adapters' gradients all-reduced
by DistributedDataParallel (frozen weights are not registered, so only adapter gradients
travel, in DDP's 25 MB buckets overlapping the backward).

    torchrun --nproc_per_node 2 bench/torch_ddp.py --shape 7b --methods peft-lora,singlora

Rank 0 prints one JSON line per method: median step time (the slowest rank's, as every step
ends in an all-reduce), global tokens/s, peak memory of rank 0.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_llama import SHAPES, build  # noqa: E402


def run(a, method, rank, world):
    model = build(a.shape, method, a.rank, a.vocab)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cuda").manual_seed(rank)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device="cuda", generator=g)

    def step():
        logits = ddp(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.warmup + a.steps):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    med = torch.tensor(statistics.median(times), device="cuda")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    med = med.item()
    out = {
        "impl": "pytorch-ddp",
        "shape": a.shape,
        "method": method,
        "gpus": world,
        "batch_per_gpu": a.batch,
        "seq": a.seq,
        "median_ms": med,
        "tokens_per_s": world * a.batch * a.seq / (med / 1e3),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "torch": torch.__version__,
    }
    del ddp, model, opt, params
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="7b", choices=list(SHAPES))
    p.add_argument("--methods", default="peft-lora,singlora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    for m in a.methods.split(","):
        try:
            r = run(a, m.strip(), rank, world)
            if rank == 0:
                print(json.dumps(r), flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            if rank == 0:
                print(json.dumps({"impl": "pytorch-ddp", "method": m, "gpus": world, "error": repr(e)[:300]}), flush=True)
    dist.destroy_process_group()
