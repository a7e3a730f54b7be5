"""PyTorch's (cuDNN's) side of `singlora-lab bench-unet --profile`'s convolution rows: a 3x3,
320-channel convolution at 64x64 in bf16, forward and forward + input gradient, and the same
stride 2, medians of 20 after 5, at batch 1 and 4. One JSON line per row.

    python bench/conv_torch.py
"""
import json
import time

import torch


def timed(f, n=20, warm=5):
    ts = []
    for i in range(n + warm):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        if i >= warm:
            ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def main():
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    for batch in (1, 4):
        for name, stride in (("conv 3x3, 320 -> 320, 64x64", 1), ("conv 3x3 stride 2 (downsample)", 2)):
            w = (torch.randn(320, 320, 3, 3, device=dev) * 0.02).to(torch.bfloat16)
            x = torch.randn(batch, 320, 64, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
            fwd = lambda: torch.nn.functional.conv2d(x, w, padding=1, stride=stride)
            g = torch.randn_like(fwd())

            def both():
                y = fwd()
                torch.autograd.grad(y, x, g)

            with torch.no_grad():
                f_ms = timed(fwd)
            print(json.dumps({"component": name, "impl": "pytorch (cuDNN)", "batch": batch,
                              "forward_ms": f_ms, "forward_backward_ms": timed(both)}), flush=True)


if __name__ == "__main__":
    main()
