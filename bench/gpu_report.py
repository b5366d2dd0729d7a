"""Static GPU report: registers, spills and shared memory of the fusedloss Triton kernels,
compiled ahead of time for sm_90 and sm_80 by ptxas (no GPU needed).

    python bench/gpu_report.py                      # the launch configs the benchmarks use
    python bench/gpu_report.py --all --arch 90      # every launch config (about 1100: minutes)
    python bench/gpu_report.py --json FILE

The kernels' AOT build is tests/aot.py (fusedloss.triton.aot in older trees): compile_all(arch, configs)
returns one report per launch config (name "kernel[tag]", num_warps, registers,
spill_stores, spill_loads, stack, smem_static, smem_triton). This file picks the configs,
compiles them in parallel (one process per core) and tabulates; it reads those fields
defensively (records or dicts, or the ptxas -v text) in case the report's shape moves.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import sys

import harness

ARCHS = (90, 80)

# field -> the names it may go by in a report
KEYS = {
    "registers": ("registers", "regs", "n_regs", "num_regs"),
    "spill_stores": ("spill_stores", "n_spills", "spills"),
    "spill_loads": ("spill_loads",),
    "stack": ("stack", "stack_bytes"),
    "smem_static": ("smem_static", "shared", "shared_bytes", "smem"),
    "smem_triton": ("smem_triton", "shared_dynamic"),
    "num_warps": ("num_warps", "warps"),
}
PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "smem_static": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(text: str) -> dict:
    """Fields of `ptxas -v` output ("Used 40 registers, 16 bytes smem", "0 bytes spill stores")."""
    return {f: max(int(v) for v in p.findall(text)) for f, p in PTXAS.items() if p.search(text)}


def normalise(report, arch) -> dict:
    """One compile report (a record, a dict, or ptxas text) -> a plain row."""
    if isinstance(report, str):
        return {"arch": arch, "kernel": "?", "config": "", **parse_ptxas(report)}
    get = report.get if isinstance(report, dict) else (lambda k, d=None: getattr(report, k, d))
    name = str(get("name") or get("kernel") or "?")
    kernel, _, config = name.partition("[")
    row = {"arch": arch, "kernel": kernel, "config": config.rstrip("]")}
    for field, names in KEYS.items():
        value = next((get(n) for n in names if get(n) is not None), None)
        if isinstance(value, (int, float)):
            row[field] = int(value)
    for text_key in ("ptxas_log", "log", "info"):
        if isinstance(get(text_key), str):
            row = {**parse_ptxas(get(text_key)), **row}
    row["smem"] = row.get("smem_static", 0) + row.get("smem_triton", 0)
    return row


def in_bench_scope(tag: str) -> bool:
    """The launch configs the benchmark shapes reach: fp32/bf16, (N, C) rows, no class weight
    or mask, reduced elementwise losses; gradient, pos_weight and focal both ways."""
    parts = tag.split(",")
    flags = dict(p.split("=", 1) for p in parts if "=" in p)
    words = {p for p in parts if "=" not in p}
    return (bool(words & {"fp32", "bf16"}) and "dense" not in words and flags.get("w", "0") == "0"
            and flags.get("mask", "0") == "0" and flags.get("reduce", "1") == "1")


def _aot():
    """tests/aot.py, the AOT tooling beside the tests (fusedloss.triton.aot in older trees)."""
    tests = str(harness.ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        import aot
    except ModuleNotFoundError as e:
        if e.name != "aot":
            raise
        from fusedloss.triton import aot
    return aot


def _compile_one(arch, index):
    aot = _aot()
    return [normalise(r, arch) for r in aot.compile_all(arch, [aot.launch_configs()[index]])]


def compile_arch(arch: int, everything: bool = False, workers: int = None) -> list:
    aot = _aot()

    if not hasattr(aot, "launch_configs"):  # no way to pick configs: let compile_all do them all
        return [normalise(r, arch) for r in aot.compile_all(arch)]
    configs = aot.launch_configs()
    picked = [i for i, c in enumerate(configs) if everything or in_bench_scope(getattr(c, "tag", ""))]
    rows = []
    # spawn, not fork: the parent may hold a CUDA context (run_all on a GPU), which a forked
    # child must not inherit
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers or os.cpu_count(), mp_context=spawn) as pool:
        for part in pool.map(_compile_one, [arch] * len(picked), picked):
            rows += part
    return rows


def report(archs=ARCHS, everything: bool = False) -> dict:
    """{"sm_90": {"rows": [...]} or {"error": why}, ...}."""
    out = {}
    for arch in archs:
        try:
            out[f"sm_{arch}"] = {"rows": compile_arch(int(arch), everything)}
        except Exception as e:  # no Triton kernels here, no ptxas, or a kernel that fails to compile
            out[f"sm_{arch}"] = {"error": harness.error_text(e)}
    return out


def report_text(rep: dict) -> str:
    """One line per (arch, kernel, dtype): configs, worst registers / spills / shared memory;
    then every config that spills."""
    lines, cells, spilling = ["static Triton kernel report (ptxas -v; per kernel and dtype, worst config)"], [], []
    for arch, r in rep.items():
        if "error" in r:
            lines.append(f"  {arch}: not available: {r['error']}")
            continue
        groups = {}
        for row in r["rows"]:
            dtype = row["config"].split(",")[0] if row["config"] else "-"
            groups.setdefault((row["kernel"], dtype), []).append(row)
            if row.get("spill_stores", 0) or row.get("spill_loads", 0):
                spilling.append(f"  spills: {arch} {row['kernel']}[{row['config']}] "
                                f"{row.get('spill_stores')} B stored / {row.get('spill_loads')} B loaded")
        for (kernel, dtype), rows in sorted(groups.items()):
            worst = lambda k: str(max(x.get(k, 0) for x in rows))
            cells.append([arch, kernel, dtype, str(len(rows)), worst("registers"), worst("spill_stores"),
                          worst("spill_loads"), worst("stack"), worst("smem")])
    if cells:
        lines.append(harness.format_table(
            [("arch", "<"), ("kernel", "<"), ("dtype", "<"), ("configs", ">"), ("max regs", ">"),
             ("spill st B", ">"), ("spill ld B", ">"), ("stack B", ">"), ("smem B", ">")], cells))
    lines += spilling or (["  no config spills"] if cells else [])
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description="static register/spill/shared-memory report of the Triton kernels")
    p.add_argument("--arch", nargs="+", type=int, default=list(ARCHS), help="compute capabilities (default 90 80)")
    p.add_argument("--all", action="store_true", help="every launch config, not only those the benchmarks use")
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args()
    rep = report(args.arch, args.all)
    print(report_text(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1, default=str)


if __name__ == "__main__":
    main()
