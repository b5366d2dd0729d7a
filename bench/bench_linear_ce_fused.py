"""fusedloss.linear_cross_entropy against the unfused head and torch's chunked one.

The LLM head's forward+backward: loss = CE(h @ W.T, target), gradients to h (N, H) and
W (V, H). Side by side in one process, on the same inputs, every implementation taking
turns (round-robin, so a machine whose load drifts hurts all of them alike):

    eager            F.cross_entropy(F.linear(h, W), t): holds the N x V logits and more
    torch chunked    F.linear_cross_entropy(h, W, t, options=LinearCrossEntropyOptions())
    fusedloss[b]     fusedloss.linear_cross_entropy(h, W, t, backend=b), b = cpu (and torch
                     with --all-backends), at the default chunk and at --chunks

Time: median of --reps fwd+bwd steps after a warm-up (.grad reset before each step, so the
gradients are allocated inside it, as in training); "paired" is the median over rounds of
eager's time / the row's time in the same round, steadier on a loaded machine. Peak memory: the peak extra CPU memory
of one step, the gradients included, from torch.profiler(profile_memory=True)'s allocation
events replayed in order (as bench/harness.py measures it; checked first on known
allocations). Every 7th token is ignored (ignore_index=-100).

    python bench/bench_linear_ce_fused.py                      # N=4096 H=1024 V=32000 fp32, 2 threads
    python bench/bench_linear_ce_fused.py --quick              # seconds, a smoke run
    python bench/bench_linear_ce_fused.py --chunks 128,256,512,1024 --json out.json

Standalone: needs only torch and fusedloss (not the rest of bench/).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fusedloss

MB = 1 << 20


# ----------------------------------------------------------------------------- memory
from harness import check_cpu_peak, cpu_peak_bytes  # noqa: E402  (bench/ is the script's directory)


# ----------------------------------------------------------------------------- impls
def impls(t, backends, chunks):
    out = {
        "eager": lambda h, w: F.cross_entropy(F.linear(h, w), t),
        "torch chunked": lambda h, w: F.linear_cross_entropy(h, w, t, options=torch.nn.LinearCrossEntropyOptions()),
    }
    for b in backends:
        out[f"fusedloss[{b}]"] = lambda h, w, b=b: fusedloss.linear_cross_entropy(h, w, t, backend=b)
        for c in chunks:
            opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=c)
            out[f"fusedloss[{b}] chunk {c}"] = lambda h, w, b=b, o=opts: fusedloss.linear_cross_entropy(
                h, w, t, backend=b, options=o)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunks", default="", help="extra fusedloss rows at these batch_chunk_size values")
    p.add_argument("--all-backends", action="store_true", help="also the torch reference backend")
    p.add_argument("--only", default="", help="comma-separated impl names to run (default: all)")
    p.add_argument("--quick", action="store_true", help="N=512 H=128 V=4000, 2 reps")
    p.add_argument("--json", default="", help="write the results here")
    a = p.parse_args()
    if a.quick:
        a.n, a.hidden, a.vocab, a.reps = 512, 128, 4000, 2
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    h0 = torch.randn(a.n, a.hidden).to(dtype)
    w0 = (torch.randn(a.vocab, a.hidden) / math.sqrt(a.hidden)).to(dtype)  # logits ~ N(0, 1)
    t = torch.randint(0, a.vocab, (a.n,))
    t[::7] = -100
    backends = ["cpu"] if fusedloss.backends("cpu")["cpu"] is None else []
    if a.all_backends or not backends:
        backends.append("torch")
    chunks = [int(c) for c in a.chunks.split(",") if c]
    fns = impls(t, backends, chunks)
    if a.only:
        keep = a.only.split(",")
        fns = {k: v for k, v in fns.items() if k in keep}

    # own copies per impl, gradients reset before each step
    state = {k: (h0.clone().requires_grad_(), w0.clone().requires_grad_()) for k in fns}

    def step(k):
        h, w = state[k]
        h.grad = w.grad = None
        fns[k](h, w).backward()

    print(f"linear CE fwd+bwd  N={a.n} H={a.hidden} V={a.vocab} {a.dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}")
    print(f"peak check (5 MiB known): {'ok' if check_cpu_peak()['ok'] else 'FAILED'}")
    for k in fns:  # warm-up (page faults of fresh buffers, MKL init)
        step(k)
    times = {k: [] for k in fns}
    for _ in range(a.reps):
        for k in fns:
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)
    peaks = {}
    for k in fns:
        h, w = state[k]
        h.grad = w.grad = None
        peaks[k] = cpu_peak_bytes(lambda k=k: fns[k](*state[k]).backward())
    # correctness of the fused rows against eager (float32: SPEC tolerances are against float64)
    ref = None
    with torch.no_grad():
        hd, wd = h0.double(), w0.double()
    hr, wr = hd.clone().requires_grad_(), wd.clone().requires_grad_()
    lr = F.cross_entropy(F.linear(hr, wr), t)
    lr.backward()
    ref = (lr.detach(), hr.grad, wr.grad)
    errs = {}
    for k in fns:
        if not k.startswith("fusedloss"):
            continue
        h, w = state[k]
        h.grad = w.grad = None
        loss = fns[k](h, w)
        loss.backward()
        errs[k] = [float((loss.detach().double() - ref[0]).abs()), float((h.grad.double() - ref[1]).abs().max()),
                   float((w.grad.double() - ref[2]).abs().max())]

    base = statistics.median(times["eager"]) if "eager" in times else None
    chunked = statistics.median(times["torch chunked"]) if "torch chunked" in times else None
    print(f"{'impl':<28}{'median s':>10}{'min s':>9}{'peak MiB':>10}{'eager/x':>9}{'paired':>8}{'chunked/x':>10}"
          f"   |err| loss, dX, dW vs float64")
    rows = []
    for k in fns:
        med, lo = statistics.median(times[k]), min(times[k])
        # paired: each round's ratio (neighbouring calls see the same machine load), then the median
        paired = (statistics.median(e / v for e, v in zip(times["eager"], times[k])) if base else None)
        r = {"impl": k, "median_s": med, "min_s": lo, "times_s": times[k], "peak_mib": peaks[k] / MB,
             "vs_eager": base / med if base else None, "vs_torch_chunked": chunked / med if chunked else None,
             "vs_eager_paired": paired, "err_vs_float64": errs.get(k)}
        rows.append(r)
        e = "  ".join(f"{v:.1e}" for v in errs[k]) if k in errs else ""
        print(f"{k:<28}{med:>10.3f}{lo:>9.3f}{peaks[k] / MB:>10.1f}"
              f"{(base / med if base else float('nan')):>9.2f}{(paired or float('nan')):>8.2f}"
              f"{(chunked / med if chunked else float('nan')):>10.2f}   {e}")
    first = next((k for k in fns if k.startswith("fusedloss")), None)
    if first and base and chunked:
        r = next(r for r in rows if r["impl"] == first)
        print(f"issue targets ({first}): >= 1.1x eager {r['vs_eager']:.2f} {'ok' if r['vs_eager'] >= 1.1 else 'MISSED'}; "
              f">= 1.3x torch chunked {r['vs_torch_chunked']:.2f} {'ok' if r['vs_torch_chunked'] >= 1.3 else 'MISSED'}; "
              f"peak <= torch chunked's {r['peak_mib']:.0f} / {peaks['torch chunked'] / MB:.0f} MiB "
              f"{'ok' if peaks[first] <= peaks['torch chunked'] else 'MISSED'}")
    if a.json:
        env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "date": time.strftime("%Y-%m-%d"), "shape": [a.n, a.hidden, a.vocab], "dtype": a.dtype}
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
