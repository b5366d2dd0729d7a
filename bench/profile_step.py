"""Kernel-by-kernel profile of one fusedloss forward+backward (torch.profiler), to see where
a step's time goes beyond the fused kernel itself (README "Known gaps": on an H100 the
measured cross-entropy fwd+bwd exceeds kernel + scaling pass by ~4 ms).

    python bench/profile_step.py [--n 16384 --c 128256 --dtype bfloat16 --backend triton --loss cross_entropy]
"""
import argparse

import harness  # noqa: F401  (puts the repository root on sys.path)
import torch
from torch.profiler import ProfilerActivity, profile

import fusedloss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--c", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", default="auto")
    p.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "focal_loss"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    x = torch.randn(args.n, args.c, device=dev, dtype=getattr(torch, args.dtype)).requires_grad_()
    t = torch.randint(0, args.c, (args.n,), device=dev)
    loss_fn = getattr(fusedloss, args.loss)

    def step():
        x.grad = None
        loss_fn(x, t, backend=args.backend).backward()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
