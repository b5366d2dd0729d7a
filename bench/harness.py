"""Shared benchmark machinery: implementations, measuring, peak memory, tables, targets, JSON.

Each loss has one runner (bench_<loss>.py) whose setup factory builds the inputs and the
callables to compare on them (a `Setup`); everything else lives here, so the runners share
one way of measuring.

What is measured, for every implementation, on the same inputs, in one process:
  fwd      the loss only; no input requires grad.
  fwd+bwd  loss.backward(), the inputs leaves whose .grad is reset before each call, so the
           gradients are allocated inside the measured call as they are in training.
  peak     peak bytes allocated during one fwd+bwd call minus the bytes allocated just
           before it (the gradients included), in a separate untimed call.
Timing is not ours:
  CPU:  pytest-benchmark (bench/test_bench_cpu.py, driven in-process by run_cpu_pytest):
        calibrated rounds, median, JSON that `pytest-benchmark compare` reads across commits.
  CUDA: triton.testing.do_bench (CUDA events, L2 flushed between calls), median.
  Dry runs of the GPU scripts on a CPU (--dry-run): torch.utils.benchmark.Timer.
Peak: CUDA torch.cuda.max_memory_allocated after reset_peak_memory_stats; CPU the allocator
events torch.profiler records (cpu_peak_bytes), checked on known allocations.
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
BENCH_DIR = ROOT / "bench"
if str(ROOT) not in sys.path:  # `python bench/run_all.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fusedloss  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MB = 1024 * 1024
MODES = ("fwd", "fwdbwd")


# ----------------------------------------------------------------------------- descriptions
@dataclass
class Impl:
    """One row of a table: an implementation, run (fn) or not (skip says why)."""

    name: str
    kind: str  # "fusedloss" | "eager" | "compile" | "peer"
    fn: Optional[Callable] = None  # (*inputs) -> scalar loss
    skip: Optional[str] = None


@dataclass
class Setup:
    """What a runner's setup factory returns: the inputs and the callables to compare on them."""

    x: torch.Tensor  # the first differentiated input (logits; h for the linear flow), not requiring grad
    fused: Callable  # fused(*inputs, backend=..., **variant_kwargs) -> loss
    eager: Callable  # (*inputs) -> loss in PyTorch ops; also valid on float64 inputs (the reference)
    bytes_fwd: Optional[int]  # minimal traffic of the forward (input and target read once); None: no GB/s
    bytes_fwdbwd: Optional[int]  # ... and of forward+backward (plus the gradient written once)
    peers: list = field(default_factory=list)  # Impl rows for peer libraries, run or skipped
    variants: dict = field(default_factory=dict)  # extra fusedloss rows: label -> fused kwargs
    extra: list = field(default_factory=list)  # further differentiated inputs (the linear flow's weight)

    @property
    def inputs(self) -> list:
        return [self.x, *self.extra]


@dataclass(frozen=True)
class Case:
    """One shape of a runner: shape, dtype and memory layout of the input."""

    shape: tuple
    dtype: torch.dtype
    layout: str = ""  # "" (contiguous) or "channels_last"

    @property
    def label(self) -> str:
        return shape_label(self.shape) + (f" {self.layout}" if self.layout else "")

    def setup_kwargs(self) -> dict:
        return {"layout": self.layout} if self.layout else {}


def as_case(c) -> Case:
    """A runner's shapes() entries: Case, or (shape, dtype[, layout])."""
    return c if isinstance(c, Case) else Case(tuple(c[0]), *c[1:])


@dataclass
class Check:
    """One issue target (reported, never asserted): value = num[key] / den[key] of two rows of
    the same case, at least (at_least) or at most `bound`. Rows by name: "fusedloss" is the
    first fusedloss row that ran (the reference of the ratios), "fusedloss+LABEL" its variant
    row LABEL, "copy" the run's device-to-device copy (context["copy"]), any other name the row
    of that name."""

    what: str
    num: str
    den: str
    key: str  # "fwd_ms" | "fwdbwd_ms" | "peak_bytes" | "fwd_gbps"
    bound: float
    at_least: bool


def speed_memory_targets(vs_eager: float, vs_compile: float, mem_vs_eager: float) -> list:
    """The usual three: fwd+bwd speed-ups over eager and torch.compile (at least), peak extra
    memory as a fraction of eager's (at most)."""
    return [
        Check("fwd+bwd eager/fusedloss", "eager", "fusedloss", "fwdbwd_ms", vs_eager, True),
        Check("fwd+bwd compile/fusedloss", "torch.compile", "fusedloss", "fwdbwd_ms", vs_compile, True),
        Check("peak mem fusedloss/eager", "fusedloss", "eager", "peak_bytes", mem_vs_eager, False),
    ]


@dataclass
class LossBench:
    """A runner: its setup factory, its cases and the targets that apply to them."""

    name: str
    setup: Callable  # (shape, dtype, device[, layout=]) -> Setup
    shapes: Callable  # (device_type, quick) -> [Case or (shape, dtype[, layout])]
    check_shape: Optional[tuple] = None  # small case of the correctness summary (None: not checked)
    targets: dict = field(default_factory=dict)  # (shape, dtype[, layout]) -> [Check]
    extra_checks: list = field(default_factory=list)  # (device, backend) -> check row (run_all)
    threads: Optional[int] = None  # CPU threads for this runner (default: the run's)
    title: str = ""  # one line under the table's heading


@dataclass
class Config:
    device: torch.device
    quick: bool = False
    compile: bool = True
    threads: Optional[int] = None
    warmup: int = 2  # untimed calls before measuring (torch.compile compiles there)
    # CPU, pytest-benchmark: at least min_rounds rounds, as many as fit in max_time seconds
    min_rounds: int = 5
    max_time: float = 1.0
    # CUDA, do_bench
    warmup_ms: int = 25
    rep_ms: int = 100
    # time with torch.utils.benchmark in this process instead of pytest-benchmark (GPU dry runs on a CPU)
    dry_run: bool = False


def shape_label(shape) -> str:
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
    """An Impl for a peer library; load() imports it and returns (*inputs) -> loss. A peer that
    is not installed or cannot run on this device is kept as a row with the reason."""
    try:
        fn = load()
    except ImportError as e:
        return Impl(name, "peer", skip=f"not installed ({first_line(e)})")
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


def make_setup(bench: LossBench, case: Case, device: torch.device) -> Setup:
    torch.manual_seed(0)
    return bench.setup(case.shape, case.dtype, device, **case.setup_kwargs())


def plan_impls(bench: LossBench, case: Case, cfg: Config) -> list:
    """The rows a case will have (names, kinds, skip reasons), from a tiny setup of the same
    rank and layout: pytest collects one test per row before any real input exists."""
    tiny = Case(tuple(min(s, 8) for s in case.shape), case.dtype, case.layout)
    impls = build_impls(make_setup(bench, tiny, cfg.device), cfg.device, cfg)
    return [Impl(i.name, i.kind, skip=i.skip) for i in impls]


# ----------------------------------------------------------------------------- steps
def fresh_inputs(s: Setup, grad: bool) -> list:
    """Each implementation's own copies of the inputs (peers such as Liger write the gradient
    into their input); leaves requiring grad for fwd+bwd."""
    return [t.detach().clone().requires_grad_(grad) for t in s.inputs]


def reset_grads(inputs):
    for t in inputs:
        t.grad = None


def make_step(fn: Callable, inputs: list, mode: str) -> Callable:
    """The measured call: fwd is the loss alone; fwd+bwd resets the gradients, then backward,
    so each call allocates its gradients as a training step does."""
    if mode == "fwd":
        return lambda: fn(*inputs)

    def fwdbwd():
        reset_grads(inputs)
        fn(*inputs).backward()

    return fwdbwd


# ----------------------------------------------------------------------------- timing
def _stats_ms(times_ms) -> dict:
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "n": len(times_ms)}


def time_step(step: Callable, cfg: Config, grad_to_none=None) -> dict:
    """Median time of step(): do_bench on CUDA; torch.utils.benchmark on a CPU (dry runs)."""
    if cfg.device.type == "cuda":
        from triton.testing import do_bench

        kw = dict(warmup=cfg.warmup_ms, rep=cfg.rep_ms, grad_to_none=grad_to_none)
        try:
            return _stats_ms(list(do_bench(step, return_mode="all", **kw)))
        except (AssertionError, TypeError):  # a triton without return_mode="all"
            median = do_bench(step, quantiles=[0.5], **kw)
            median = median[0] if isinstance(median, (list, tuple)) else median
            return {"median_ms": median, "min_ms": None, "n": None}
    from torch.utils.benchmark import Timer

    for _ in range(cfg.warmup):
        step()
    m = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=cfg.max_time)
    return _stats_ms([t * 1e3 for t in m.times])


# ----------------------------------------------------------------------------- memory
def cpu_peak_bytes(step: Callable) -> int:
    """Peak extra CPU memory of step(): with profile_memory=True, torch.profiler records one
    '[memory]' event per allocation (+bytes) and per free (-bytes) that goes through c10's CPU
    allocator (every tensor, in eager, compiled and extension code alike). Replaying them in
    time order from 0, the largest running sum is the peak over what was allocated before the
    call; frees of older tensors count negative. Checked by check_cpu_peak()."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
def quiet_stderr():
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


def peak_bytes(step: Callable, inputs: list, device: torch.device) -> int:
    """Peak extra memory of one fwd+bwd step, its inputs' gradients freed first (so the step's
    own reset frees nothing that the replay would count negative)."""
    reset_grads(inputs)
    return cuda_peak_bytes(step) if device.type == "cuda" else cpu_peak_bytes(step)


# ----------------------------------------------------------------------------- one case, in process
def measure(fn: Callable, s: Setup, cfg: Config) -> dict:
    """fwd and fwd+bwd medians and the fwd+bwd peak of fn, on its own copies of the inputs."""
    out = {}
    inputs = fresh_inputs(s, grad=False)
    out["fwd"] = time_step(make_step(fn, inputs, "fwd"), cfg)
    del inputs  # at 16384 x 256000 every copy counts
    inputs = fresh_inputs(s, grad=True)
    step = make_step(fn, inputs, "fwdbwd")
    out["fwdbwd"] = time_step(step, cfg, grad_to_none=inputs)
    out["peak_bytes"] = peak_bytes(step, inputs, cfg.device)
    return out


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def case_base(bench: LossBench, case: Case) -> dict:
    return {"loss": bench.name, "case": case.label, "shape": list(case.shape), "dtype": dtype_name(case.dtype),
            "layout": case.layout or "contiguous"}


def make_rows(base: dict, impls: list, results: dict, bytes_fwd, bytes_fwdbwd) -> list:
    """Rows of one case: impls (Impl: name, kind, skip) in order; results {name: {"fwd": stats,
    "fwdbwd": stats, "peak_bytes": int} or {"error": why}}."""
    rows = []
    for impl in impls:
        row = dict(base, impl=impl.name, kind=impl.kind)
        r = results.get(impl.name) or {"error": "not measured"}
        if impl.skip is not None:
            row["skip"] = impl.skip
        elif "error" in r:
            row["error"] = r["error"]
        else:
            fwd, fb = r["fwd"]["median_ms"], r["fwdbwd"]["median_ms"]
            row.update(fwd_ms=fwd, fwdbwd_ms=fb, peak_bytes=r["peak_bytes"],
                       fwd_stats=r["fwd"], fwdbwd_stats=r["fwdbwd"],
                       fwd_gbps=bytes_fwd / fwd / 1e6 if bytes_fwd else None,
                       fwdbwd_gbps=bytes_fwdbwd / fb / 1e6 if bytes_fwdbwd else None)
        rows.append(row)
    add_ratios(rows)
    return rows


def run_case(bench: LossBench, case, cfg: Config, log=None) -> list:
    """Rows (dicts) of one case, measured in this process with time_step (CUDA: do_bench; CPU
    dry runs: torch.utils.benchmark). Progress goes to `log` (default: stderr)."""
    log = log or progress
    case = as_case(case)
    s = make_setup(bench, case, cfg.device)
    torch._dynamo.reset()  # each case compiles afresh (no shape-generalised recompiles)
    impls = build_impls(s, cfg.device, cfg)
    t0 = time.perf_counter()
    log(f"  {bench.name} {case.label} {dtype_name(case.dtype)}: "
        + ", ".join(i.name for i in impls if i.skip is None))
    results = {}
    with _threads(bench.threads if cfg.device.type == "cpu" else None):
        for impl in impls:
            if impl.skip is not None:
                continue
            try:
                results[impl.name] = measure(impl.fn, s, cfg)
            except Exception as e:  # OOM at the largest shapes, an unsupported dtype: a row, not a crash
                results[impl.name] = {"error": error_text(e)}
            free()
    log(f"    measured in {time.perf_counter() - t0:.1f}s")
    rows = make_rows(case_base(bench, case), impls, results, s.bytes_fwd, s.bytes_fwdbwd)
    del s, results
    free()
    return rows


@contextlib.contextmanager
def _threads(n: Optional[int]):
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def progress(line: str):
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- CPU: pytest-benchmark
@dataclass
class PlanItem:
    """One pytest-benchmark test of bench/test_bench_cpu.py: one implementation, case and mode."""

    bench: LossBench
    case: Case
    impl: str
    kind: str
    mode: str
    skip: Optional[str] = None

    @property
    def id(self) -> str:
        text = f"{self.bench.name}-{self.case.label}-{dtype_name(self.case.dtype)}-{self.impl}-{self.mode}"
        return text.replace(" ", "_")

    def meta(self) -> dict:
        return dict(case_base(self.bench, self.case), impl=self.impl, kind=self.kind, mode=self.mode)


def plan(benches: list, cfg: Config) -> list:
    """Every test, case by case: within a case fwd of each implementation, then fwd+bwd."""
    items = []
    for bench in benches:
        for case in map(as_case, bench.shapes(cfg.device.type, cfg.quick)):
            impls = plan_impls(bench, case, cfg)
            items += [PlanItem(bench, case, i.name, i.kind, mode, i.skip) for mode in MODES for i in impls]
    return items


class Collector:
    """pytest plugin: the fusedloss metadata, outcome and error of every test, in order."""

    def __init__(self):
        self.records = []

    def pytest_runtest_logreport(self, report):
        meta = dict(report.user_properties).get("fusedloss")
        if meta is None or report.when != "call":
            return
        rec = dict(meta, outcome=report.outcome)
        if report.failed and "error" not in rec:  # test_bench_cpu records its own errors; this is a fallback
            lines = report.longreprtext.strip().splitlines()
            rec["error"] = first_line(lines[-1] if lines else "failed")
        self.records.append(rec)


def pytest_benchmark_args(cfg: Config, benches: list, json_path: Path, storage: Path) -> list:
    args = [str(BENCH_DIR / "test_bench_cpu.py"), "-s", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
            f"--fl-losses={','.join(b.name for b in benches)}", f"--fl-threads={cfg.threads}",
            f"--fl-warmup={cfg.warmup}",
            f"--benchmark-json={json_path}", f"--benchmark-min-rounds={cfg.min_rounds}",
            f"--benchmark-max-time={cfg.max_time}", "--benchmark-autosave", f"--benchmark-storage=file://{storage}",
            "--benchmark-group-by=group", "--benchmark-sort=name",
            "--benchmark-columns=median,iqr,min,rounds,iterations"]
    return args + (["--fl-quick"] if cfg.quick else []) + ([] if cfg.compile else ["--fl-no-compile"])


def run_cpu_pytest(benches: list, cfg: Config, out_dir: Path, stem: str, extra_args=()) -> dict:
    """Runs bench/test_bench_cpu.py under pytest-benchmark in this process (its output on
    stderr), then reads its JSON back into rows: ({loss: rows}, path of the JSON). Also
    autosaves into out_dir/pytest-benchmark/, where --benchmark-compare and
    `pytest-benchmark compare` find earlier runs."""
    try:
        import pytest
        import pytest_benchmark  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"CPU timings need pytest-benchmark ({e}): pip install pytest-benchmark "
                         "(bash run.sh setup installs it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.pytest-benchmark.json"
    args = pytest_benchmark_args(cfg, benches, json_path, out_dir / "pytest-benchmark") + list(extra_args)
    collector = Collector()
    progress("  pytest " + " ".join(args[1:]))
    with contextlib.redirect_stdout(sys.stderr):
        code = pytest.main(args, plugins=[collector])
    progress(f"  pytest exit status {int(code)}; pytest-benchmark JSON: {json_path}")
    stats = {}
    if json_path.exists():
        for b in json.loads(json_path.read_text())["benchmarks"]:
            meta = b["extra_info"].get("fusedloss")
            if meta is not None:
                s = b["stats"]
                stats[_record_key(meta)] = {"median_ms": s["median"] * 1e3, "min_ms": s["min"] * 1e3,
                                            "iqr_ms": s["iqr"] * 1e3, "rounds": s["rounds"],
                                            "iterations": s["iterations"]}
    return rows_from_records(benches, collector.records, stats), json_path


def _record_key(meta: dict) -> tuple:
    return meta["loss"], meta["case"], meta["dtype"], meta["impl"], meta["mode"]


def rows_from_records(benches: list, records: list, stats: dict) -> dict:
    """{loss: rows} from the collector's records (test order) and the pytest-benchmark stats."""
    cases = {}  # (loss, case, dtype) -> {"base", "impls": {name: Impl}, "results", "bytes"}
    for rec in records:
        key = (rec["loss"], rec["case"], rec["dtype"])
        c = cases.setdefault(key, {"base": {k: rec[k] for k in ("loss", "case", "shape", "dtype", "layout")},
                                   "impls": {}, "results": {}, "bytes": (None, None)})
        c["impls"].setdefault(rec["impl"], Impl(rec["impl"], rec["kind"]))
        if "bytes_fwd" in rec:
            c["bytes"] = (rec["bytes_fwd"], rec["bytes_fwdbwd"])
        r = c["results"].setdefault(rec["impl"], {})
        if rec["outcome"] == "skipped":
            c["impls"][rec["impl"]].skip = rec.get("skip", "skipped")
        elif "error" in rec:
            r["error"] = f"{'fwd+bwd' if rec['mode'] == 'fwdbwd' else 'fwd'}: {rec['error']}"
        elif _record_key(rec) in stats:
            r[rec["mode"]] = stats[_record_key(rec)]
            if "peak_bytes" in rec:
                r["peak_bytes"] = rec["peak_bytes"]
    out = {b.name: [] for b in benches}
    for c in cases.values():
        for r in c["results"].values():
            if "error" not in r and not all(k in r for k in (*MODES, "peak_bytes")):
                r["error"] = "not measured"
        out.setdefault(c["base"]["loss"], []).extend(
            make_rows(c["base"], list(c["impls"].values()), c["results"], *c["bytes"]))
    return out


# ----------------------------------------------------------------------------- ratios and targets
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


def _select(rows: list, name: str, context: dict):
    if name == "copy":
        return context.get("copy")
    ref = next((r for r in rows if r["kind"] == "fusedloss" and "fwd_ms" in r), None)
    if name == "fusedloss":
        return ref
    if name.startswith("fusedloss+"):
        name = f"{ref['impl']} {name[len('fusedloss+'):]}" if ref else None
    return next((r for r in rows if r["impl"] == name and "fwd_ms" in r), None)


def check_targets(bench: LossBench, rows: list, context: Optional[dict] = None) -> list:
    """The issue targets next to the measured values (reported, not asserted)."""
    out = []
    for key, checks in bench.targets.items():
        case = as_case(key)
        here = [r for r in rows if r["case"] == case.label and r["dtype"] == dtype_name(case.dtype)]
        entry = {"loss": bench.name, "case": case.label, "dtype": dtype_name(case.dtype), "checks": [],
                 "ran": _select(here, "fusedloss", {}) is not None}
        for c in checks:
            num, den = _select(here, c.num, context or {}), _select(here, c.den, context or {})
            a, b = (num or {}).get(c.key), (den or {}).get(c.key)
            value = a / b if (a is not None and b) else None
            ok = None if value is None else (value >= c.bound if c.at_least else value <= c.bound)
            entry["checks"].append({"what": c.what, "value": value, "bound": c.bound, "at_least": c.at_least, "ok": ok})
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
    elif cfg.dry_run:
        lines.append("  timing   : DRY RUN on the CPU, torch.utils.benchmark median "
                     "(a check of the script, not a figure)")
    else:
        lines.append(f"  timing   : pytest-benchmark median (>= {cfg.min_rounds} rounds, up to {cfg.max_time:g} s "
                     f"per test, after {cfg.warmup} warm-up calls); peak: torch.profiler allocator events, replayed")
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


def ms(v) -> str:
    """Milliseconds with 3 significant digits or more (0.0123, 1.23, 84.1, 678)."""
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


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
            r["impl"], ms(r["fwd_ms"]), ms(r["fwdbwd_ms"]), num(r["peak_bytes"] / MB, ".1f"),
            num(r["fwd_gbps"], ".1f"), num(r["fwdbwd_gbps"], ".1f"),
            num(v.get("fwd"), ".2f"), num(v.get("fwdbwd"), ".2f"), num(v.get("mem"), ".2f"),
        ])
    text = format_table(columns, cells)
    for (impl, why), cases in skipped.items():
        text += f"\n  not run: {impl}: {why}"
    for (impl, why), cases in errors.items():
        text += f"\n  failed: {impl} ({', '.join(cases)}): {why}"
    return text


def targets_text(entries: list, quick: bool = False) -> str:
    lines = []
    for e in entries:
        head = f"  target {e['loss']} {e['dtype']} {e['case']}:"
        if not e["ran"]:
            if not quick:  # quick runs measure other shapes: say nothing of the targets they skip
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
    """JSON, and the PNG of plot.py (skipped with a note where matplotlib is missing: the PNG
    can be drawn later from the JSON with `python bench/plot.py FILE.json`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png"}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, default=str)
    try:
        import plot

        plot.plot(results, paths["png"])
    except Exception as e:
        print(f"plot skipped ({error_text(e)}); later: python bench/plot.py {paths['json']}")
        paths.pop("png")
    return paths


# ----------------------------------------------------------------------------- command line
def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (CI smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG (default bench/results)")
    p.add_argument("--compare", nargs="?", const="", default=None, metavar="RUN",
                   help="CPU: compare with an earlier run saved under OUT/pytest-benchmark (the latest, or RUN: "
                        "a number such as 0003, or a file); pytest-benchmark prints the comparison on stderr")
    p.add_argument("--pytest-args", default="", metavar="ARGS",
                   help="CPU: more pytest / pytest-benchmark options, "
                        'e.g. --pytest-args="--benchmark-compare-fail=median:10%%"')
    return p


def quick_config(cfg: Config) -> Config:
    cfg.quick = True
    cfg.warmup, cfg.min_rounds, cfg.max_time = 1, 3, 0.2
    cfg.warmup_ms, cfg.rep_ms = 10, 30
    return cfg


def config_from(args) -> Config:
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(device=device, compile=not args.no_compile, threads=torch.get_num_threads())
    return quick_config(cfg) if args.quick else cfg


def pytest_extra_args(args) -> list:
    import shlex

    extra = shlex.split(getattr(args, "pytest_args", "") or "")
    compare = getattr(args, "compare", None)
    if compare is not None:
        extra.append("--benchmark-compare" + (f"={compare}" if compare else ""))
    return extra


def run(benches: list, cfg: Config, out_dir: Path, prelude: Optional[Callable] = None, log=None,
        pytest_args=(), stem: Optional[str] = None, context: Optional[dict] = None) -> dict:
    """Prints the header, runs prelude() (run_all's correctness summary and GPU report: a dict
    stored in the JSON as given), then every bench over its cases with a table (and targets)
    per loss, and saves JSON and PNG. CPU: the timings come from one pytest-benchmark session
    over all benches; CUDA (and dry runs): case by case in this process."""
    env = environment(cfg)
    print(header(env, cfg), flush=True)
    results = {"environment": env, "losses": {},
               "config": {"quick": cfg.quick, "compile": cfg.compile, "threads": cfg.threads, "dry_run": cfg.dry_run}}
    if cfg.device.type == "cpu":
        check = results["cpu_peak_check"] = check_cpu_peak()
        print(f"  peak check: {check['measured_bytes']} B measured for {check['expected_bytes']} B allocated "
              f"({'ok' if check['ok'] else 'MISMATCH: CPU peak figures are unreliable'})")
    print(flush=True)
    if prelude is not None:
        results.update(prelude())
    stem = stem or f"{cfg.device.type}-{time.strftime('%Y%m%d-%H%M%S')}" + ("-quick" if cfg.quick else "")
    t_start = time.perf_counter()
    if cfg.device.type == "cpu" and not cfg.dry_run:
        by_loss, bench_json = run_cpu_pytest(benches, cfg, out_dir, stem, pytest_args)
        results["pytest_benchmark_json"] = str(bench_json)
    else:
        by_loss = {b.name: [row for case in b.shapes(cfg.device.type, cfg.quick)
                            for row in run_case(b, case, cfg, log=log)] for b in benches}
    for bench in benches:
        rows = by_loss.get(bench.name, [])
        targets = check_targets(bench, rows, context)
        results["losses"][bench.name] = {"rows": rows, "targets": targets, "title": bench.title}
        print(f"\n== {bench.name} ==" + (f"  ({bench.title})" if bench.title else "") + f"\n{loss_table(rows)}",
              flush=True)
        text = targets_text(targets, cfg.quick)
        if text:
            print(text, flush=True)
        print(flush=True)
    results["elapsed_s"] = time.perf_counter() - t_start
    paths = save(results, out_dir, stem)
    print("saved " + ", ".join(str(p) for p in paths.values()) + f"  (benchmarks: {results['elapsed_s']:.0f} s)")
    return results


def main(benches: list, description: str):
    """Entry point of a single runner: python bench/bench_<loss>.py [--device ...]."""
    args = arg_parser(description).parse_args()
    run(benches, config_from(args), args.out, pytest_args=pytest_extra_args(args))
