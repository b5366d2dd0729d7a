"""Shared benchmark machinery: implementations, timing, peak memory, tables, JSON, plot.

Each loss has one runner (bench_<loss>.py) whose setup factory builds the inputs and the
callables to compare on them (a `Setup`); everything else lives here, so the runners share
one way of measuring.

What is measured, for every implementation, on the same inputs, in one process:
  fwd      the loss only; the input does not require grad.
  fwd+bwd  loss.backward(), the input a leaf whose .grad is reset before each call, so the
           gradient is allocated inside the measured call as it is in training.
  peak     peak bytes allocated during one fwd+bwd call minus the bytes allocated just
           before it (the input's gradient included), in a separate untimed run.
CUDA: triton.testing.do_bench (CUDA events, L2 flushed between calls), median;
      torch.cuda.max_memory_allocated after reset_peak_memory_stats.
CPU:  time.perf_counter around each call, median of repeats after warm-up, the
      implementations taking turns call by call, torch.set_num_threads as configured;
      peak from the allocator events that torch.profiler records (see cpu_peak_bytes),
      checked on known allocations.
"""
import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run_all.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fusedloss  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MB = 1024 * 1024


# ----------------------------------------------------------------------------- descriptions
@dataclass
class Impl:
    """One row of a table: an implementation, run (fn) or not (skip says why)."""

    name: str
    kind: str  # "fusedloss" | "eager" | "compile" | "peer"
    fn: Optional[Callable] = None  # x -> scalar loss
    skip: Optional[str] = None


@dataclass
class Setup:
    """What a runner's setup factory returns: one input and the callables to compare on it."""

    x: torch.Tensor  # the differentiated input (logits), not requiring grad
    fused: Callable  # fused(x, backend=..., **variant_kwargs) -> loss
    eager: Callable  # x -> loss in PyTorch ops; also valid on x.double() (the reference)
    bytes_fwd: int  # minimal traffic of the forward (input and target read once)
    bytes_fwdbwd: int  # ... and of forward+backward (plus the gradient written once)
    peers: list = field(default_factory=list)  # Impl rows for peer libraries, run or skipped
    variants: dict = field(default_factory=dict)  # extra fusedloss rows: label -> fused kwargs


@dataclass
class Target:
    """An issue target at one shape (reported, never asserted): fwd+bwd speed-ups over
    eager and torch.compile (at least), peak extra memory as a fraction of eager's (at most)."""

    vs_eager: float
    vs_compile: float
    mem_vs_eager: float


@dataclass
class LossBench:
    """A runner: its setup factory, its shapes and the targets that apply to them."""

    name: str
    setup: Callable  # (shape, dtype, device) -> Setup
    shapes: Callable  # (device_type, quick) -> [(shape, dtype)]
    check_shape: tuple  # small case of the correctness summary
    targets: dict = field(default_factory=dict)  # (shape, dtype) -> Target
    extra_checks: list = field(default_factory=list)  # (device, backend) -> check row (run_all)


@dataclass
class Config:
    device: torch.device
    quick: bool = False
    compile: bool = True
    threads: Optional[int] = None
    # CPU timing: warm-up calls, then repeats until min_reps and budget_s are both reached
    warmup: int = 2
    min_reps: int = 3
    max_reps: int = 100
    budget_s: float = 1.0
    # CUDA timing (do_bench)
    warmup_ms: int = 25
    rep_ms: int = 100


def shape_label(shape) -> str:
    if len(shape) == 2:
        return f"{shape[0]}x{shape[1]}"
    return "x".join(str(s) for s in shape)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------- backends and peers
def fast_backends(device: torch.device):
    """([fast backends that run on device, auto's pick first], {missing fast backend: reason})."""
    reasons = fusedloss.backends(device.type)
    preference = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    available = [b for b in preference if reasons.get(b) is None]
    return available, {b: reasons.get(b, "unknown backend") for b in preference if b not in available}


def peer(name: str, device: torch.device, load: Callable, gpu_only: bool = True) -> Impl:
    """An Impl for a peer library; load() imports it and returns x -> loss. A peer that is not
    installed or cannot run on this device is kept as a row with the reason."""
    try:
        fn = load()
    except ImportError as e:
        return Impl(name, "peer", skip=f"not installed ({e})")
    except Exception as e:  # some peers raise other errors at import without a GPU
        return Impl(name, "peer", skip=f"import failed ({error_text(e)})")
    if gpu_only and device.type != "cuda":
        return Impl(name, "peer", skip="Triton GPU kernels: needs a CUDA device")
    return Impl(name, "peer", fn=fn)


def first_line(e) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else "(no message)"


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def build_impls(s: Setup, device: torch.device, cfg: Config) -> list:
    """fusedloss on each fast backend (auto's pick first, with the setup's variants), eager
    PyTorch, torch.compile of the same eager function, then the peers."""
    available, _ = fast_backends(device)
    impls = []
    for i, b in enumerate(available or ["torch"]):  # no fast backend: the reference runs
        impls.append(Impl(f"fusedloss[{b}]", "fusedloss", functools.partial(s.fused, backend=b)))
        if i == 0:
            for label, kw in s.variants.items():
                impls.append(Impl(f"fusedloss[{b}] {label}", "fusedloss", functools.partial(s.fused, backend=b, **kw)))
    impls.append(Impl("eager", "eager", s.eager))
    if cfg.compile:
        impls.append(Impl("torch.compile", "compile", torch.compile(s.eager, dynamic=False)))
    else:
        impls.append(Impl("torch.compile", "compile", skip="disabled (--no-compile)"))
    return impls + list(s.peers)


# ----------------------------------------------------------------------------- timing
def _median_ms(times):
    return {"median_ms": statistics.median(times), "min_ms": min(times), "n": len(times)}


def time_cuda(step: Callable, cfg: Config, grad_to_none=None) -> dict:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        kw = dict(warmup=cfg.warmup_ms, rep=cfg.rep_ms, grad_to_none=grad_to_none)
        try:
            return _median_ms(list(do_bench(step, return_mode="all", **kw)))
        except (AssertionError, TypeError):  # an older triton without return_mode="all"
            median = do_bench(step, quantiles=[0.5], **kw)
            median = median[0] if isinstance(median, (list, tuple)) else median
            return {"median_ms": median, "min_ms": None, "n": None}
    for _ in range(cfg.warmup + 3):  # no triton: plain CUDA events
        step()
    times = []
    for _ in range(max(cfg.min_reps, 20)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return _median_ms(times)


# ----------------------------------------------------------------------------- memory
def cpu_peak_bytes(step: Callable) -> int:
    """Peak extra CPU memory of step(): with profile_memory=True, torch.profiler records one
    '[memory]' event per allocation (+bytes) and per free (-bytes) that goes through c10's CPU
    allocator (every tensor, in eager, compiled and extension code alike). Replaying them in
    time order from 0, the largest running sum is the peak over what was allocated before the
    call; frees of older tensors count negative. Checked by check_cpu_peak()."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())  # a stable sort keeps record order on equal stamps
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints two 'USDT ... profiler_start/stop' lines on fd 2 per profile, past Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_cpu_peak() -> dict:
    """cpu_peak_bytes on known allocations: 4 MiB and 1 MiB live, the 4 MiB freed, then 2 MiB:
    the peak is exactly 5 MiB."""

    def step():
        a = torch.empty(MB, dtype=torch.float32)
        b = torch.empty(MB // 4, dtype=torch.float32)
        del a
        c = torch.empty(MB // 2, dtype=torch.float32)
        return b, c

    measured = cpu_peak_bytes(step)
    return {"expected_bytes": 5 * MB, "measured_bytes": measured, "ok": measured == 5 * MB}


def cuda_peak_bytes(step: Callable) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ----------------------------------------------------------------------------- one case
def measure_cuda(fn: Callable, x0: torch.Tensor, cfg: Config) -> dict:
    """fwd and fwd+bwd medians (do_bench) and the fwd+bwd peak of fn, on its own copies of x0
    (peers such as Liger write the gradient into their input)."""
    out = {}
    x = x0.detach().clone()
    out["fwd"] = time_cuda(lambda: fn(x), cfg)
    del x  # at 16384 x 256000 every copy counts
    xg = x0.detach().clone().requires_grad_(True)

    def fwdbwd():
        xg.grad = None
        fn(xg).backward()

    out["fwdbwd"] = time_cuda(fwdbwd, cfg, grad_to_none=[xg])
    xg.grad = None
    out["peak_bytes"] = cuda_peak_bytes(fwdbwd)
    return out


class _Contender:
    """One implementation during a CPU case: its own copies of the input and its timings."""

    def __init__(self, impl: Impl, x0: torch.Tensor):
        self.impl, self.error = impl, None
        self.x = x0.detach().clone()
        self.xg = x0.detach().clone().requires_grad_(True)
        self.times = {"fwd": [], "fwdbwd": []}

    def fwd(self):
        self.impl.fn(self.x)

    def fwdbwd(self):
        self.xg.grad = None
        self.impl.fn(self.xg).backward()

    def call(self, mode: str, timed: bool = True):
        if self.error is not None:
            return
        try:
            t0 = time.perf_counter()
            getattr(self, mode)()
            if timed:
                self.times[mode].append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # a failing implementation is a row, not a crash
            self.error = error_text(e)


def measure_cpu(impls: list, x0: torch.Tensor, cfg: Config, log) -> dict:
    """{impl name: measures or {"error": why}}. After cfg.warmup untimed calls of each
    (torch.compile compiles there), the implementations take turns, one call each per round,
    so that load from other processes, bursty on a small shared machine, falls on all of them
    alike. Rounds go on until cfg.min_reps and the time budget are both reached. Then each
    one's peak, in a separate untimed call."""
    contenders = [_Contender(impl, x0) for impl in impls]
    for c in contenders:
        t0 = time.perf_counter()
        for _ in range(cfg.warmup):
            c.call("fwd", timed=False)
            c.call("fwdbwd", timed=False)
        log(f"    warm-up {c.impl.name}: {'error' if c.error else 'done'} in {time.perf_counter() - t0:.1f}s")
    for mode in ("fwd", "fwdbwd"):
        rounds, deadline = 0, time.perf_counter() + cfg.budget_s * len(contenders)
        while rounds < cfg.min_reps or (rounds < cfg.max_reps and time.perf_counter() < deadline):
            for c in contenders:
                c.call(mode)
            rounds += 1
    out = {}
    for c in contenders:
        if c.error is None:
            c.xg.grad = None
            try:
                peak = cpu_peak_bytes(c.fwdbwd)
                out[c.impl.name] = {"fwd": _median_ms(c.times["fwd"]), "fwdbwd": _median_ms(c.times["fwdbwd"]),
                                    "peak_bytes": peak}
            except Exception as e:
                c.error = error_text(e)
        if c.error is not None:
            out[c.impl.name] = {"error": c.error}
    return out


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_case(bench: LossBench, shape, dtype, cfg: Config, log=None) -> list:
    """Rows (dicts) of one shape/dtype: every implementation measured, or why not. Progress
    goes to `log` (default: stderr, so stdout holds the tables)."""
    log = log or progress
    torch.manual_seed(0)
    s = bench.setup(shape, dtype, cfg.device)
    torch._dynamo.reset()  # each case compiles afresh (no shape-generalised recompiles)
    base = {"loss": bench.name, "case": shape_label(shape), "shape": list(shape), "dtype": dtype_name(dtype)}
    impls = build_impls(s, cfg.device, cfg)
    runnable = [impl for impl in impls if impl.skip is None]
    t0 = time.perf_counter()
    log(f"  {bench.name} {base['case']} {base['dtype']}: {', '.join(i.name for i in runnable)}")
    if cfg.device.type == "cuda":
        results = {}
        for impl in runnable:
            try:
                results[impl.name] = measure_cuda(impl.fn, s.x, cfg)
            except Exception as e:  # OOM at the largest shapes, an unsupported dtype: a row, not a crash
                results[impl.name] = {"error": error_text(e)}
            _free()
    else:
        results = measure_cpu(runnable, s.x, cfg, log)
    log(f"    measured in {time.perf_counter() - t0:.1f}s")
    rows = []
    for impl in impls:
        row = dict(base, impl=impl.name, kind=impl.kind)
        r = results.get(impl.name)
        if impl.skip is not None:
            row["skip"] = impl.skip
        elif "error" in r:
            row["error"] = r["error"]
        else:
            row.update(
                fwd_ms=r["fwd"]["median_ms"], fwdbwd_ms=r["fwdbwd"]["median_ms"], peak_bytes=r["peak_bytes"],
                fwd_stats=r["fwd"], fwdbwd_stats=r["fwdbwd"],
                fwd_gbps=s.bytes_fwd / r["fwd"]["median_ms"] / 1e6,
                fwdbwd_gbps=s.bytes_fwdbwd / r["fwdbwd"]["median_ms"] / 1e6,
            )
        rows.append(row)
    add_ratios(rows)
    del s, results
    _free()
    return rows


def progress(line: str):
    print(line, file=sys.stderr, flush=True)


def add_ratios(rows: list):
    """Ratios against the first fusedloss row that ran: speed = impl time / fusedloss time
    (> 1: fusedloss is faster), memory = fusedloss peak / impl peak (< 1: fusedloss uses less)."""
    ref = next((r for r in rows if r["kind"] == "fusedloss" and "fwd_ms" in r), None)
    for r in rows:
        if ref is None or "fwd_ms" not in r or r is ref:
            continue
        r["vs_fused"] = {
            "fwd": r["fwd_ms"] / ref["fwd_ms"],
            "fwdbwd": r["fwdbwd_ms"] / ref["fwdbwd_ms"],
            "mem": ref["peak_bytes"] / r["peak_bytes"] if r["peak_bytes"] > 0 else None,
        }


def check_targets(bench: LossBench, rows: list) -> list:
    """The issue targets next to the measured ratios (reported, not asserted)."""
    out = []
    for (shape, dtype), t in bench.targets.items():
        case, dname = shape_label(shape), dtype_name(dtype)
        here = {r["impl"]: r for r in rows if r["case"] == case and r["dtype"] == dname}
        fused = next((r for r in here.values() if r["kind"] == "fusedloss" and "fwd_ms" in r), None)
        entry = {"loss": bench.name, "case": case, "dtype": dname, "checks": []}
        for label, impl, key, bound, at_least in (
            ("fwd+bwd eager/fusedloss", "eager", "fwdbwd", t.vs_eager, True),
            ("fwd+bwd compile/fusedloss", "torch.compile", "fwdbwd", t.vs_compile, True),
            ("peak mem fusedloss/eager", "eager", "mem", t.mem_vs_eager, False),
        ):
            r = here.get(impl)
            value = r.get("vs_fused", {}).get(key) if (r and fused) else None
            ok = None if value is None else (value >= bound if at_least else value <= bound)
            entry["checks"].append({"what": label, "value": value, "bound": bound, "at_least": at_least, "ok": ok})
        entry["ran"] = fused is not None
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(cfg: Config) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = cfg.device
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        device_name = f"{torch.cuda.get_device_name(dev)} (sm_{cap[0]}{cap[1]})"
    else:
        device_name = cpu_model()
    available, missing = fast_backends(dev)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": dev.type,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fusedloss": fusedloss.__version__,
        "git": _git_commit(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "backend": available[0] if available else "torch",
        "fast_backends": available,
        "missing_backends": missing,
    }


def header(env: dict, cfg: Config) -> str:
    backend = env["backend"]
    if not env["fast_backends"]:
        backend += " (reference fallback: no fast backend)"
    lines = [
        f"fusedloss benchmark  {env['date']}",
        f"  device   : {env['device']}: {env['device_name']}, {env['threads']} threads",
        f"  backend  : {backend}" + "".join(f"; also {b}" for b in env["fast_backends"][1:]),
    ]
    for b, why in env["missing_backends"].items():
        lines.append(f"             {b} not available: {why}")
    lines.append(f"  versions : torch {env['torch']}, triton {env['triton']}, fusedloss {env['fusedloss']}"
                 + (f" (git {env['git']})" if env["git"] else ""))
    if cfg.device.type == "cuda":
        lines.append(f"  timing   : triton do_bench median (warmup {cfg.warmup_ms} ms, rep {cfg.rep_ms} ms); "
                     "peak: torch.cuda.max_memory_allocated - allocated before")
    else:
        lines.append(f"  timing   : perf_counter median of >= {cfg.min_reps} calls after {cfg.warmup} warm-up, "
                     "implementations taking turns; peak: torch.profiler allocator events, replayed")
    load = env.get("load_average")
    if cfg.device.type == "cpu" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        lines.append(f"  WARNING  : load average {load:.1f} on {os.cpu_count()} cores before the run: "
                     "other work competes for the CPU, timings are noisy")
    lines.append("  ratios   : speed = impl time / fusedloss time (>1: fusedloss faster); "
                 "mem = fusedloss peak / impl peak (<1: fusedloss smaller)")
    lines.append("  GB/s     : minimal traffic (input and target read once, gradient written once) / median time")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tables
def format_table(columns, rows) -> str:
    """columns: [(title, align)], rows: [[str]]; align '<' or '>'."""
    widths = [max(len(c[0]), *(len(r[i]) for r in rows)) if rows else len(c[0]) for i, c in enumerate(columns)]
    fmt = lambda cells: "  ".join(f"{cell:{a}{w}}" for cell, (_, a), w in zip(cells, columns, widths)).rstrip()
    out = [fmt([c[0] for c in columns]), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in rows]
    return "\n".join(out)


def num(v, spec) -> str:
    return "-" if v is None else format(v, spec)


def loss_table(rows: list) -> str:
    columns = [("case", "<"), ("dtype", "<"), ("impl", "<"), ("fwd ms", ">"), ("fwd+bwd ms", ">"),
               ("peak MB", ">"), ("fwd GB/s", ">"), ("f+b GB/s", ">"),
               ("fwd x", ">"), ("f+b x", ">"), ("mem x", ">")]
    cells, skipped, errors, last = [], {}, {}, None
    for r in rows:
        if "skip" in r:
            skipped.setdefault((r["impl"], r["skip"]), []).append(r["case"])
            continue
        case = (r["case"], r["dtype"])
        lead = [r["case"], r["dtype"]] if case != last else ["", ""]
        last = case
        if "error" in r:
            cells.append(lead + [r["impl"], "error"] + ["-"] * 7)
            errors.setdefault((r["impl"], r["error"]), []).append(f"{r['case']} {r['dtype']}")
            continue
        v = r.get("vs_fused", {})
        cells.append(lead + [
            r["impl"], num(r["fwd_ms"], ".3f"), num(r["fwdbwd_ms"], ".3f"), num(r["peak_bytes"] / MB, ".1f"),
            num(r["fwd_gbps"], ".1f"), num(r["fwdbwd_gbps"], ".1f"),
            num(v.get("fwd"), ".2f"), num(v.get("fwdbwd"), ".2f"), num(v.get("mem"), ".2f"),
        ])
    text = format_table(columns, cells)
    for (impl, why), cases in skipped.items():
        text += f"\n  not run: {impl}: {why}"
    for (impl, why), cases in errors.items():
        text += f"\n  failed: {impl} ({', '.join(cases)}): {why}"
    return text


def targets_text(entries: list) -> str:
    lines = []
    for e in entries:
        head = f"  target {e['loss']} {e['dtype']} {e['case']}:"
        if not e["ran"]:
            lines.append(f"{head} not measured (shape not run, or fusedloss failed)")
            continue
        parts = []
        for c in e["checks"]:
            op = ">=" if c["at_least"] else "<="
            mark = "?" if c["ok"] is None else ("\u2713" if c["ok"] else "\u2717")
            value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
            parts.append(f"{c['what']} {value} ({op} {c['bound']:g}) {mark}")
        lines.append(head + " " + " | ".join(parts))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files
def save(results: dict, out_dir: Path, stem: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png"}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, default=str)
    try:
        plot(results, paths["png"])
    except Exception as e:  # matplotlib missing: the JSON is the result, the plot a convenience
        print(f"plot skipped: {error_text(e)}")
        paths.pop("png")
    return paths


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [name for name in results["losses"] if any("fwd_ms" in r for r in results["losses"][name]["rows"])]
    if not losses:
        return
    fig, axes = plt.subplots(len(losses), 2, figsize=(14, 3.6 * len(losses)), squeeze=False)
    for ax_row, name in zip(axes, losses):
        rows = [r for r in results["losses"][name]["rows"] if "fwd_ms" in r]
        cases = list(dict.fromkeys(f"{r['case']} {r['dtype']}" for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / len(impls)
        for ax, key, scale, title in ((ax_row[0], "fwdbwd_ms", 1.0, "fwd+bwd time (ms, log)"),
                                      (ax_row[1], "peak_bytes", 1.0 / MB, "fwd+bwd peak extra memory (MB)")):
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, case in enumerate(cases):
                    r = next((r for r in rows if r["impl"] == impl and f"{r['case']} {r['dtype']}" == case), None)
                    if r is not None:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(r[key] * scale)
                ax.bar(xs, ys, width, label=impl)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, fontsize=8)
            ax.set_title(f"{name}: {title}", fontsize=10)
            if key == "fwdbwd_ms":
                ax.set_yscale("log")
        ax_row[0].legend(fontsize=7)
    env = results["environment"]
    fig.suptitle(f"fusedloss on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, {env['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line
def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (CI smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG (default bench/results)")
    return p


def config_from(args) -> Config:
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(device=device, quick=args.quick, compile=not args.no_compile, threads=torch.get_num_threads())
    if args.quick:
        cfg.warmup, cfg.min_reps, cfg.max_reps, cfg.budget_s = 1, 3, 50, 0.2
        cfg.warmup_ms, cfg.rep_ms = 10, 30
    return cfg


def run(benches: list, cfg: Config, out_dir: Path, prelude: Optional[Callable] = None, log=None) -> dict:
    """Prints the header, runs prelude() (run_all's correctness summary and GPU report: a dict
    stored in the JSON as given), then every bench over its shapes with a table (and targets)
    per loss, and saves JSON and PNG."""
    env = environment(cfg)
    print(header(env, cfg), flush=True)
    results = {"environment": env, "config": {"quick": cfg.quick, "compile": cfg.compile, "threads": cfg.threads},
               "losses": {}}
    if cfg.device.type == "cpu":
        check = results["cpu_peak_check"] = check_cpu_peak()
        print(f"  peak check: {check['measured_bytes']} B measured for {check['expected_bytes']} B allocated "
              f"({'ok' if check['ok'] else 'MISMATCH: CPU peak figures are unreliable'})")
    print(flush=True)
    if prelude is not None:
        results.update(prelude())
    t_start = time.perf_counter()
    for bench in benches:
        rows = []
        for shape, dtype in bench.shapes(cfg.device.type, cfg.quick):
            rows += run_case(bench, shape, dtype, cfg, log=log)
        targets = check_targets(bench, rows)
        results["losses"][bench.name] = {"rows": rows, "targets": targets}
        print(f"\n== {bench.name} ==\n{loss_table(rows)}", flush=True)
        if targets and not cfg.quick:
            print(targets_text(targets), flush=True)
        print(flush=True)
    results["elapsed_s"] = time.perf_counter() - t_start
    stem = f"{cfg.device.type}-{time.strftime('%Y%m%d-%H%M%S')}" + ("-quick" if cfg.quick else "")
    paths = save(results, out_dir, stem)
    print("saved " + ", ".join(str(p) for p in paths.values()) + f"  (benchmarks: {results['elapsed_s']:.0f} s)")
    return results


def main(benches: list, description: str):
    """Entry point of a single runner: python bench/bench_<loss>.py [--device ...]."""
    args = arg_parser(description).parse_args()
    run(benches, config_from(args), args.out)
