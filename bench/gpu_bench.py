"""The GPU benchmark of bench/gpu_check.sh, in stages that each write their JSON as they go
(a stage killed by its timeout leaves what it measured):

    python bench/gpu_bench.py copy    --out DIR    # device-to-device copy: the bandwidth reference
    python bench/gpu_bench.py bench   --out DIR --sections llm,seg,linear,dense [--budget-s 90]
    python bench/gpu_bench.py summary --out DIR    # tables, the issue's GPU targets, JSON + PNG

Sections (every one against eager, torch.compile and the peers installed, do_bench medians):
  llm     cross-entropy on (N, C) logits: 16384x128256 bf16, 4096x128256 bf16, 4096x32000 fp32;
          fusedloss on the triton and cuda backends (and triton with inplace_backward)
  seg     cross-entropy on 16x150x128x128 maps (ADE20K), ignore_index=255, fp32 and bf16, contiguous
          (NCHW: the K-dim kernels, positions across lanes) and channels_last (the row kernels)
  linear  logits = h @ W.T (not a leaf) -> cross-entropy -> backward, N x 128256 x 4096 bf16
  dense   sigmoid focal loss on 8x80x128x128 fp32 detection maps (COCO), channels_last and NCHW
--dry-run: the same code on the CPU with tiny shapes and torch.utils.benchmark timings, to
check the script before spending GPU time (its figures mean nothing).
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import harness
import torch

import bench_cross_entropy
import bench_linear_ce
import bench_vision

COPY_SHAPE = (16384, 128256)  # the bf16 logits of the largest LLM case
LLM_SHAPES = [((16384, 128256), torch.bfloat16), ((4096, 128256), torch.bfloat16), ((4096, 32000), torch.float32)]
DRY_LLM_SHAPES = [((512, 2000), torch.bfloat16), ((256, 1000), torch.float32)]
SEG_SHAPE, DRY_SEG_SHAPE = (16, 150, 128, 128), (2, 21, 32, 32)
DENSE_SHAPE, DRY_DENSE_SHAPE = (8, 80, 128, 128), (2, 8, 32, 32)


def seg_shapes(dry: bool) -> list:
    """Segmentation cross-entropy: fp32 and bf16, NCHW and channels_last."""
    shape = DRY_SEG_SHAPE if dry else SEG_SHAPE
    return [(shape, dtype, layout) for dtype in (torch.float32, torch.bfloat16) for layout in ("", "channels_last")]


def dense_shapes(dry: bool) -> list:
    """Dense detection sigmoid focal loss: channels_last (the usual layout there) and NCHW."""
    shape = DRY_DENSE_SHAPE if dry else DENSE_SHAPE
    return [(shape, torch.float32, "channels_last"), (shape, torch.float32)]


def llm_checks() -> list:
    """The issue's GPU targets at the LLM shapes (reported, not asserted)."""
    C = harness.Check
    return [
        C("fwd+bwd liger/fusedloss", "liger-kernel", "fusedloss", "fwdbwd_ms", 1.1, True),
        C("fwd+bwd compile/fusedloss", "torch.compile", "fusedloss", "fwdbwd_ms", 1.4, True),
        C("fwd+bwd eager/fusedloss", "eager", "fusedloss", "fwdbwd_ms", 3.0, True),
        C("fwd GB/s fusedloss/copy", "fusedloss", "copy", "fwd_gbps", 0.85, True),
        C("fwd time cuda/triton", "fusedloss[cuda]", "fusedloss[triton]", "fwd_ms", 1.5, False),
        C("fwd+bwd time cuda/triton", "fusedloss[cuda]", "fusedloss[triton]", "fwdbwd_ms", 1.5, False),
    ]


def sections(dry: bool) -> dict:
    llm = DRY_LLM_SHAPES if dry else LLM_SHAPES
    linear = bench_linear_ce.BENCH.shapes("cpu" if dry else "cuda", dry)
    return {
        "llm": harness.LossBench(
            name="cross_entropy_llm", setup=bench_cross_entropy.setup, shapes=lambda device_type, quick: llm,
            targets={case: llm_checks() for case in llm}, title="logits a leaf, ignore_index=-100 on every 16th row"),
        "seg": dataclasses.replace(bench_cross_entropy.SEGMENTATION, shapes=lambda device_type, quick: seg_shapes(dry),
                                   title="(N, C, H, W) maps, ignore_index=255; NCHW runs the K-dim kernels"),
        # the CPU's memory targets, reported at the GPU shapes
        "linear": dataclasses.replace(bench_linear_ce.BENCH,
                                      targets={c: bench_linear_ce.memory_checks() for c in linear}),
        "dense": dataclasses.replace(bench_vision.FOCAL, name="sigmoid_focal_dense", targets={},
                                     shapes=lambda device_type, quick: dense_shapes(dry),
                                     title="dense detection maps (gamma=2, alpha=0.25, mean), logits and targets alike"),
    }


def config(args) -> harness.Config:
    if args.dry_run:
        cfg = harness.Config(device=torch.device("cpu"), compile=not args.no_compile, threads=torch.get_num_threads(),
                             warmup=1, max_time=0.05, quick=True, dry_run=True)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on the GPU machine, or with --dry-run to check the script on a CPU")
        cfg = harness.Config(device=torch.device("cuda"), compile=not args.no_compile)
    return cfg


def write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)  # a kill mid-write leaves the previous, whole file


# ----------------------------------------------------------------------------- stages
def stage_copy(args, cfg):
    """y.copy_(x) for a tensor the size of the 16384 x 128256 bf16 logits: bytes read and
    written over the do_bench median (the bandwidth a memory-bound loss can at best reach)."""
    numel = 512 * 2000 if args.dry_run else COPY_SHAPE[0] * COPY_SHAPE[1]
    x = torch.randn(numel, device=cfg.device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = harness.time_step(lambda: y.copy_(x), cfg)
    moved = 2 * x.numel() * x.element_size()
    out = {"what": f"device-to-device copy_ of {numel} bf16 ({moved / 2**30:.2f} GiB read + written)",
           "bytes": moved, "ms": t["median_ms"], "fwd_gbps": moved / t["median_ms"] / 1e6, "stats": t,
           "environment": harness.environment(cfg)}
    write_json(args.out / "gpu-copy.json", out)
    print(f"copy: {out['what']}: {out['ms']:.3f} ms median, {out['fwd_gbps']:.0f} GB/s")


def stage_bench(args, cfg):
    """Each section's cases in turn (its JSON rewritten after every case); a case that would
    start after --budget-s is left out, listed as such."""
    secs = sections(args.dry_run)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in secs]
    if unknown:
        sys.exit(f"unknown section {', '.join(unknown)}; choose from {', '.join(secs)}")
    env = harness.environment(cfg)
    print(harness.header(env, cfg), flush=True)
    start = time.perf_counter()
    for name in names:
        bench = secs[name]
        out = {"environment": env, "section": name, "loss": bench.name, "title": bench.title, "rows": [],
               "left_out": []}
        path = args.out / f"gpu-{name}.json"
        for case in map(harness.as_case, bench.shapes(cfg.device.type, cfg.quick)):
            if args.budget_s and time.perf_counter() - start > args.budget_s:
                out["left_out"].append(f"{case.label} {harness.dtype_name(case.dtype)}")
                harness.progress(f"  {bench.name} {case.label}: left out (over --budget-s {args.budget_s:g})")
                continue
            out["rows"] += harness.run_case(bench, case, cfg)
            out["elapsed_s"] = time.perf_counter() - start
            write_json(path, out)
        write_json(path, out)
        print(f"\n== {bench.name} ==  ({bench.title})\n{harness.loss_table(out['rows'])}", flush=True)
        if out["left_out"]:
            print(f"  left out (time budget): {', '.join(out['left_out'])}")
    print(f"\nbench stage: {time.perf_counter() - start:.0f} s")


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_summary(args, cfg):
    """Merges what the stages wrote: tables, bandwidth against the copy, the issue's targets,
    the profiles' per-step lines; gpu-summary.json (+ .png where matplotlib is installed)."""
    copy = _read(args.out / "gpu-copy.json")
    secs = sections(args.dry_run)
    results = {"losses": {}, "copy": copy, "profiles": {}}
    if copy:
        print(f"copy reference: {copy['what']}: {copy['ms']:.3f} ms, {copy['fwd_gbps']:.0f} GB/s")
    else:
        print("copy reference: not measured (stage failed or not run)")
    context = {"copy": copy} if copy else {}
    all_checks = []
    for name, bench in secs.items():
        data = _read(args.out / f"gpu-{name}.json")
        if data is None:
            print(f"\n== {bench.name} ==  not measured (stage failed or not run)")
            continue
        results.setdefault("environment", data["environment"])
        rows = data["rows"]
        targets = harness.check_targets(bench, rows, context)
        all_checks += targets
        results["losses"][bench.name] = {"rows": rows, "targets": targets, "title": bench.title,
                                         "left_out": data.get("left_out", [])}
        print(f"\n== {bench.name} ==  ({bench.title})\n{harness.loss_table(rows)}")
        if copy:
            for case in dict.fromkeys((r["case"], r["dtype"]) for r in rows):
                here = [r for r in rows if (r["case"], r["dtype"]) == case and r.get("fwd_gbps")]
                if here:
                    print(f"  fwd bandwidth / copy, {case[0]} {case[1]}: "
                          + ", ".join(f"{r['impl']} {r['fwd_gbps'] / copy['fwd_gbps']:.0%}" for r in here))
        text = harness.targets_text(targets)
        if text:
            print(text)
        if data.get("left_out"):
            print(f"  left out (time budget): {', '.join(data['left_out'])}")
    for path in sorted(args.out.glob("profile-*.json")):
        prof = _read(path) or {}
        results["profiles"][path.stem] = prof
        if "step_ms" in prof:
            print(f"\nprofile {path.stem}: wall {prof['step_ms']:.3f} ms per step, kernels "
                  f"{prof['kernel_ms_per_step']:.3f} ms per step ({prof['shape']} {prof['dtype']}); "
                  f"table in {path.with_suffix('.txt').name}")
    if "environment" not in results:
        print("\nno benchmark results to summarise")
        return
    results["config"] = {"dry_run": args.dry_run}
    met = [c["ok"] for e in all_checks for c in e["checks"] if c["ok"] is not None]
    print(f"\ntargets: {sum(met)} of {len(met)} met ({sum(c['ok'] is None for e in all_checks for c in e['checks'])}"
          " not measurable: a row missing)")
    paths = harness.save(results, args.out, "gpu-summary")
    print("saved " + ", ".join(str(p) for p in paths.values()))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["copy", "bench", "summary"])
    p.add_argument("--out", type=Path, default=harness.RESULTS / "gpu",
                   help="output folder (default bench/results/gpu)")
    p.add_argument("--sections", default="llm,seg,linear,dense", help="bench: comma-separated, of llm, seg, linear, dense")
    p.add_argument("--budget-s", type=float, default=None,
                   help="bench: start no case after this many seconds (default: 0.6 x $STAGE_TIMEOUT_S, which "
                        "gpu_check.sh sets to the stage's timeout; else no limit)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU, tiny shapes: checks the script, measures nothing")
    args = p.parse_args()
    if args.budget_s is None:
        args.budget_s = 0.6 * float(os.environ.get("STAGE_TIMEOUT_S", 0))
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = config(args) if args.stage != "summary" else None
    {"copy": stage_copy, "bench": stage_bench, "summary": stage_summary}[args.stage](args, cfg)


if __name__ == "__main__":
    main()
