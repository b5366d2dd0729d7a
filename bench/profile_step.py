"""Kernel-by-kernel profile of one fusedloss forward+backward (torch.profiler), to see where
a step's time goes beyond the fused kernel itself (README "Known gaps": on an H100 the
measured cross-entropy fwd+bwd exceeded kernel + scaling pass by ~4 ms).

    python bench/profile_step.py [--n 16384 --c 128256 --dtype bfloat16 --backend triton,cuda]
    python bench/profile_step.py --out DIR     # also DIR/profile-<loss>-<backend>.{txt,json}
    python bench/profile_step.py --dry-run     # CPU, 256 x 1000: checks the script

Per backend: the per-kernel table (name, calls, total and mean device time, sorted by total),
and per step the wall time (perf_counter around the profiled steps, synchronized; profiler
overhead included) beside the summed kernel time: a wall time well above the kernels' is
time the device sat idle (host work, a sync).
"""
import argparse
import json
import time
from pathlib import Path

import harness
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import fusedloss


def _device_us(evt) -> float:
    """An event's own device time in us (torch renamed cuda_* to device_* in 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_backend(loss_fn, x, t, backend, steps, dev) -> dict:
    def step():
        x.grad = None
        loss_fn(x, t, backend=backend).backward()

    for _ in range(3):
        step()
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with harness.quiet_stderr(), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    rows = []
    for evt in prof.key_averages():
        if cuda:  # kernels only (a CPU event such as cudaLaunchKernel carries its kernel's time too)
            us, is_kernel = _device_us(evt), evt.device_type == DeviceType.CUDA
        else:  # CPU: the ops' own time stands in for kernels
            us, is_kernel = float(evt.self_cpu_time_total), evt.self_cpu_time_total > 0
        if is_kernel and us > 0:
            rows.append({"name": evt.key, "count": evt.count, "total_us": us, "mean_us": us / max(evt.count, 1)})
    rows.sort(key=lambda r: -r["total_us"])
    kernel_ms = sum(r["total_us"] for r in rows) / 1e3 / steps
    table = harness.format_table(
        [("kernel" if cuda else "op (self CPU time)", "<"), ("calls", ">"), ("total us", ">"), ("mean us", ">"),
         ("share", ">")],
        [[r["name"][:90], str(r["count"]), f"{r['total_us']:.0f}", f"{r['mean_us']:.1f}",
          f"{r['total_us'] / max(kernel_ms * 1e3 * steps, 1e-9):.0%}"] for r in rows[:25]])
    return {"backend": backend, "steps": steps, "step_ms": wall_ms, "kernel_ms_per_step": kernel_ms, "kernels": rows,
            "table": table}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--c", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", default="auto", help="comma-separated fusedloss backends, e.g. triton,cuda")
    p.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "focal_loss"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--out", type=Path, default=None, help="folder for profile-<loss>-<backend>.txt and .json")
    p.add_argument("--dry-run", action="store_true", help="CPU, 256 x 1000 (checks the script)")
    args = p.parse_args()
    if args.dry_run:
        args.device, args.n, args.c = "cpu", 256, 1000
    dev = torch.device(args.device)
    x = torch.randn(args.n, args.c, device=dev, dtype=getattr(torch, args.dtype)).requires_grad_()
    t = torch.randint(0, args.c, (args.n,), device=dev)
    loss_fn = getattr(fusedloss, args.loss)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if args.dry_run and "auto" not in backends:
        backends.insert(0, "auto")  # one backend that runs on the CPU, so the dry run profiles something
    done = []
    for backend in backends:
        head = f"{args.loss} {args.n}x{args.c} {args.dtype} backend={backend} on {dev.type}"
        try:
            r = profile_backend(loss_fn, x, t, backend, args.steps, dev)
        except Exception as e:  # a backend that cannot run here: say so, profile the next
            print(f"\n== {head}: failed: {harness.error_text(e)}")
            done.append(f"{backend} failed")
            continue
        done.append(f"{backend} wall {r['step_ms']:.3f} ms / kernels {r['kernel_ms_per_step']:.3f} ms")
        text = (f"== {head}\nper step: wall {r['step_ms']:.3f} ms, kernels {r['kernel_ms_per_step']:.3f} ms "
                f"({args.steps} steps profiled)\n{r['table']}")
        print("\n" + text, flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            stem = args.out / f"profile-{args.loss}-{backend}"
            stem.with_suffix(".txt").write_text(text + "\n")
            r.update(loss=args.loss, shape=f"{args.n}x{args.c}", dtype=args.dtype, device=dev.type)
            stem.with_suffix(".json").write_text(json.dumps(r, indent=1))
    print(f"\nprofile {args.loss} {args.n}x{args.c} {args.dtype}, per step: " + "; ".join(done))


if __name__ == "__main__":
    main()
