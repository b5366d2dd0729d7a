"""The main benchmark: correctness summary, then every loss's runner, one table per loss,
results saved as JSON and PNG (bench/results/ or --out). CPU timings: pytest-benchmark
(bench/test_bench_cpu.py, run in this process); CUDA: triton.testing.do_bench.

    python bench/run_all.py                 # default shapes for the device (cuda if available)
    python bench/run_all.py --quick         # tiny shapes: CI smoke, about a minute on 2 cores
    python bench/run_all.py --device cpu --losses ce,linear,host --out /tmp/bench
    python bench/run_all.py --device cpu --compare   # and pytest-benchmark's comparison with the last run
"""
import math
import sys

import benches as registry
import harness
import torch

import fusedloss

BENCHES = registry.BENCHES

# SPEC section 5: (loss rel, loss abs, gradient abs) against a float64 evaluation of PyTorch's formula
TOLERANCES = {
    torch.float64: (1e-10, 1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6, 1e-6),
    torch.bfloat16: (1e-2, 1e-3, 1e-2),
}


def check_backend(bench, backend, dtype, device) -> dict:
    """Value and gradient of fusedloss on the bench's small case vs the bench's eager formula
    evaluated in float64 on the same (rounded) input."""
    torch.manual_seed(0)
    s = bench.setup(bench.check_shape, dtype, device)
    xr = s.x.detach().double().requires_grad_(True)
    ref = s.eager(xr)
    ref.backward()
    x = s.x.detach().clone().requires_grad_(True)
    value = s.fused(x, backend=backend)
    value.backward()
    rel, abs_, grad_tol = TOLERANCES[dtype]
    loss_err = abs(value.double().item() - ref.item())
    grad_err = (x.grad.double() - xr.grad).abs().max().item()
    ok = loss_err <= abs_ + rel * abs(ref.item()) and grad_err <= grad_tol
    return {"loss_err": loss_err, "grad_err": grad_err, "ok": bool(ok and math.isfinite(loss_err + grad_err)),
            "tolerance": f"{rel:g}/{abs_:g}, grad {grad_tol:g}"}


def correctness(benches, device) -> list:
    rows = []
    reasons = fusedloss.backends(device.type)
    for bench in benches:
        if bench.check_shape is None:  # a runner over a kernel another runner checks (host, linear)
            continue
        for backend, why in reasons.items():
            base = {"loss": bench.name, "backend": backend}
            if why is not None:
                rows.append(dict(base, skip=why))
                continue
            for dtype in TOLERANCES:
                row = dict(base, check=f"{harness.shape_label(bench.check_shape)} {harness.dtype_name(dtype)}")
                try:
                    row.update(check_backend(bench, backend, dtype, device))
                except Exception as e:
                    row.update(error=harness.error_text(e), ok=False)
                rows.append(row)
            for extra in bench.extra_checks:
                row = dict(base)
                try:
                    row.update(extra(device, backend))
                except Exception as e:
                    row.update(check=extra.__name__, error=harness.error_text(e), ok=False)
                rows.append(row)
    return rows


def correctness_table(rows) -> str:
    cells, skipped = [], {}
    for r in rows:
        if "skip" in r:
            skipped.setdefault(r["backend"], r["skip"])
            continue
        verdict = "pass" if r["ok"] else "FAIL"
        if "error" in r:
            detail = "error: " + r["error"][:80]
        elif "detail" in r:
            detail = r["detail"]
        else:
            detail = f"tol {r['tolerance']}"
        cells.append([r["loss"], r["backend"], r["check"], harness.num(r.get("loss_err"), ".2e"),
                      harness.num(r.get("grad_err"), ".2e"), verdict, detail])
    text = harness.format_table([("loss", "<"), ("backend", "<"), ("case", "<"), ("loss err", ">"),
                                 ("grad err", ">"), ("result", "<"), ("detail", "<")], cells)
    for backend, why in skipped.items():
        text += f"\n  not checked: {backend}: {why}"
    return text


def main():
    p = harness.arg_parser(__doc__.splitlines()[0])
    p.add_argument("--losses", default=",".join(BENCHES),
                   help=f"comma-separated, of: {', '.join(BENCHES)} (or {', '.join(registry.ALIASES)})")
    p.add_argument("--no-correctness", action="store_true", help="skip the correctness summary")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu-report", action="store_true", help="static Triton kernel report (default: on CUDA only)")
    g.add_argument("--no-gpu-report", action="store_true")
    args = p.parse_args()
    try:
        benches = registry.select(args.losses)
    except ValueError as e:
        p.error(str(e))
    cfg = harness.config_from(args)

    def prelude():
        extra = {}
        if not args.no_correctness:
            rows = correctness(benches, cfg.device)
            print("correctness vs a float64 PyTorch evaluation (SPEC section 5 tolerances)")
            print(correctness_table(rows) + "\n", flush=True)
            extra["correctness"] = rows
        if args.gpu_report or (cfg.device.type == "cuda" and not args.no_gpu_report):
            import gpu_report

            extra["gpu_report"] = gpu_report.report()
            print(gpu_report.report_text(extra["gpu_report"]) + "\n", flush=True)
        return extra

    results = harness.run(benches, cfg, args.out, prelude=prelude, pytest_args=harness.pytest_extra_args(args))
    failed = [r for r in results.get("correctness", []) if r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
