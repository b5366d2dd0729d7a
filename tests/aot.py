"""Ahead-of-time compile check of every Triton launch config, for GPUs we may not have.

`launch_configs()` enumerates each (kernel, signature, constexprs, num_warps) the
launchers can launch: block sizes and warps come from the same tables the launchers read
(fusedloss/triton/_launch.py), option flags and absent operands (a None pointer is a
constant) in every combination, and the signatures mirror Triton's JIT specialization (an
integer argument equal to 1 becomes a constant), for the two layouts the launchers see:
"rows" ((N, C) logits, D = 1, class stride 1) and "dense" ((N, C, d1..dK) logits, class
stride D, position stride 1). The K-dim kernels (one program per block of positions) serve
the "dense" layout only, at the tiles of _launch.KDIM_TIERS.

`compile_all(arch)` compiles them with `triton.compile` for a CUDA target (no GPU needed)
and runs `ptxas -v` on each PTX to report registers, spills and shared memory:

    python tests/aot.py 90                 # table for sm_90
    python tests/aot.py 90 --spill-prone   # the configs most likely to spill
"""
import dataclasses
import inspect
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedloss.triton import _launch, _rows  # noqa: E402
from fusedloss.triton.binary import _binary_bwd_kernel, _binary_fwd_kernel, _scale_grad_kernel  # noqa: E402
from fusedloss.triton.cross_entropy import (  # noqa: E402
    _ce_fwd_kdim_kernel, _ce_fwd_kernel, _ce_prob_fwd_kdim_kernel, _ce_prob_fwd_kernel,
)
from fusedloss.triton.focal import _focal_fwd_kdim_kernel, _focal_fwd_kernel  # noqa: E402
from fusedloss.triton.softmax_bwd import (  # noqa: E402
    _softmax_bwd_kdim_kernel, _softmax_bwd_kernel, _softmax_prob_bwd_kdim_kernel, _softmax_prob_bwd_kernel,
)

DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
LAYOUTS = ("rows", "dense")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    kernel: object  # the @triton.jit function
    signature: dict  # arg name -> Triton type ("*fp32", "i32", "fp64", "constexpr")
    constexprs: dict  # arg name -> value (meta-parameters, specialized 1s and Nones)
    num_warps: int
    tag: str  # human-readable summary for tables and test ids
    divisible: tuple = ()  # arguments the JIT would see as multiples of 16 (tt.divisibility)

    @property
    def name(self):
        return f"{self.kernel.__name__}[{self.tag}]"


def _acc(dtype):
    return "fp64" if dtype == torch.float64 else "fp32"


def _config(kernel, given, num_warps, tag, divisible_except=None):
    """given: arg name -> a Triton type string, or ("const", value) for a specialized
    argument (meta-parameters, None pointers, strides equal to 1). Arguments not given are
    scalars: fp64 where the kernel annotates them so, else i32 (sizes, strides).
    divisible_except: None, or the integer arguments that are NOT multiples of 16 while
    every other pointer and integer is (what the JIT specializes on a GPU: it decides the
    vector width of the loads, and with it the layout of a 2-D tile)."""
    # the kernel's own Python signature: the same under the interpreter (conftest sets
    # TRITON_INTERPRET=1, where kernels have no JIT .params) and for the compiler
    params = inspect.signature(kernel.fn).parameters.values()
    unknown = set(given) - {p.name for p in params}
    assert not unknown, (kernel.__name__, unknown)
    signature, constexprs = {}, {}
    for p in params:
        is_constexpr = p.annotation is tl.constexpr
        v = given.get(p.name, "fp64" if p.annotation == tl.float64 else "i32")
        assert not (is_constexpr and not isinstance(v, tuple)), (kernel.__name__, p.name, "constexpr not given")
        if isinstance(v, tuple):
            signature[p.name] = "constexpr"
            constexprs[p.name] = v[1]
        else:
            signature[p.name] = v
    divisible = ()
    if divisible_except is not None:
        divisible = tuple(k for k, v in signature.items() if (v.startswith("*") or v == "i32") and k not in divisible_except)
    return LaunchConfig(kernel, signature, constexprs, num_warps, tag, divisible)


def _const(v):
    return ("const", v)


def _ptr(dtype, present=True):
    return f"*{dtype}" if present else _const(None)


def _row_strides(prefix, layout, dims=("n", "c", "d")):
    """Strides of an (N, C, D) operand as the JIT sees them: 1 -> a constant."""
    ones = {"c", "d"} if layout == "rows" else {"d"}  # rows: (N, C) contiguous, D = 1
    return {f"stride_{prefix}{d}": _const(1) for d in dims if d in ones}


def _target_strides(layout):
    # the (N, D) int64 view: (N, 1) from an (N,) target has strides (1, 1)
    return {"stride_tn": _const(1), "stride_td": _const(1)} if layout == "rows" else {"stride_td": _const(1)}


def _flags(*names):
    """Every combination of the boolean options `names`, as dicts."""
    return [dict(zip(names, v)) for v in itertools.product((False, True), repeat=len(names))]


def _row_kernel_configs():
    out = []
    for (dtype, dt), layout in itertools.product(DTYPES.items(), LAYOUTS):
        acc = _acc(dtype)
        sizes = {"D": _const(1)} if layout == "rows" else {}
        base = {"x_ptr": f"*{dt}", **_row_strides("x", layout), **sizes}
        for _, block_c, num_warps in _launch.ROW_TIERS[dtype]:
            for f in _flags("weight", "mask", "smoothing", "zloss", "softcap"):
                tag = f"{dt},{layout},BLOCK_C={block_c}," + ",".join(f"{k}={int(v)}" for k, v in f.items())
                opts = {"weight_ptr": _ptr(acc, f["weight"]), "mask_ptr": _ptr("i1", f["mask"]),
                        **(_row_strides("m", layout) if f["mask"] else {}),
                        "HAS_SMOOTHING": _const(f["smoothing"]), "HAS_ZLOSS": _const(f["zloss"]),
                        "HAS_SOFTCAP": _const(f["softcap"]), "BLOCK_C": _const(block_c)}  # fmt: skip
                rows_out = {"loss_ptr": f"*{acc}", "count_ptr": f"*{acc}", "stats_ptr": f"*{acc}"}
                out.append(_config(_ce_fwd_kernel, {**base, **opts, **rows_out, "target_ptr": "*i64",
                                                    **_target_strides(layout)}, num_warps, tag))  # fmt: skip
                out.append(_config(_ce_prob_fwd_kernel, {**base, **opts, **rows_out, "y_ptr": f"*{dt}",
                                                         **_row_strides("y", layout)}, num_warps, tag))  # fmt: skip
                if not (f["smoothing"] or f["zloss"]):  # focal: alpha and mask only; bwd: softcap too
                    if not f["softcap"]:
                        focal = {**base, "target_ptr": "*i64", **_target_strides(layout),
                                 "alpha_ptr": _ptr(acc, f["weight"]), "mask_ptr": opts["mask_ptr"],
                                 **(_row_strides("m", layout) if f["mask"] else {}), **rows_out,
                                 "BLOCK_C": _const(block_c)}  # fmt: skip
                        out.append(_config(_focal_fwd_kernel, focal, num_warps, tag))
                    for reduction in (0, 1, 2):
                        bwd = {**base, "weight_ptr": opts["weight_ptr"], "mask_ptr": opts["mask_ptr"],
                               **(_row_strides("m", layout) if f["mask"] else {}), "stats_ptr": f"*{acc}",
                               "go_ptr": f"*{dt}", "denom_ptr": f"*{acc}", "grad_ptr": f"*{dt}",
                               **_row_strides("g", layout), "REDUCTION": _const(reduction),
                               "HAS_SOFTCAP": opts["HAS_SOFTCAP"], "BLOCK_C": _const(block_c)}  # fmt: skip
                        if reduction == 0:
                            bwd["stride_god"] = _const(1)
                        btag = f"{tag},reduction={reduction}"
                        out.append(_config(_softmax_bwd_kernel, {**bwd, "target_ptr": "*i64", **_target_strides(layout)},
                                           num_warps, btag))  # fmt: skip
                        out.append(_config(_softmax_prob_bwd_kernel, {**bwd, "y_ptr": f"*{dt}", **_row_strides("y", layout)},
                                           num_warps, btag))  # fmt: skip
    return out


KDIM_KERNELS = (_ce_fwd_kdim_kernel, _ce_prob_fwd_kdim_kernel, _focal_fwd_kdim_kernel, _softmax_bwd_kdim_kernel,
                _softmax_prob_bwd_kdim_kernel)


def _kdim_kernel_configs():
    """The K-dim kernels on NCHW logits: position stride 1 for every (N, C, D) operand and
    the (N, D) target / grad_output, classes D apart; D and every stride multiples of 16, C
    not (a segmentation map: 150 classes of 128 x 128 positions), so the loads vectorize as
    they would there and the tile gets that layout."""
    out = []
    odd = ("C", "ignore_index")
    for dtype, dt in DTYPES.items():
        acc = _acc(dtype)
        base = {"x_ptr": f"*{dt}", "stride_xd": _const(1)}
        for _, block_c, block_d, num_warps, groups in _launch.KDIM_TIERS[dtype]:
            blocks = {"BLOCK_C": _const(block_c), "BLOCK_D": _const(block_d)}
            fwd_blocks = {**blocks, "GROUPS": _const(groups)}
            heavy_blocks = {**fwd_blocks, "BLOCK_C": _const(groups)}  # _launch.kdim_config(heavy=True)
            for f in _flags("weight", "mask", "smoothing", "zloss", "softcap"):
                flags = ",".join(f"{k}={int(v)}" for k, v in f.items())
                tag, heavy_tag = (f"{dt},kdim,BLOCK={bc}x{block_d},{flags}" for bc in (block_c, groups))
                mask = {"mask_ptr": _ptr("i1", f["mask"]), **({"stride_md": _const(1)} if f["mask"] else {})}
                rows_out = {"loss_ptr": f"*{acc}", "count_ptr": f"*{acc}", "stats_ptr": f"*{acc}"}
                heavy = f["smoothing"] or f["softcap"]  # the launcher's `heavy` (probability targets: always)
                opts = {"weight_ptr": _ptr(acc, f["weight"]), **mask, "HAS_SMOOTHING": _const(f["smoothing"]),
                        "HAS_ZLOSS": _const(f["zloss"]), "HAS_SOFTCAP": _const(f["softcap"]),
                        **(heavy_blocks if heavy else fwd_blocks)}  # fmt: skip
                target = {"target_ptr": "*i64", "stride_td": _const(1)}
                out.append(_config(_ce_fwd_kdim_kernel, {**base, **opts, **rows_out, **target}, num_warps,
                                   heavy_tag if heavy else tag, odd))  # fmt: skip
                out.append(_config(_ce_prob_fwd_kdim_kernel, {**base, **opts, **heavy_blocks, **rows_out, "y_ptr": f"*{dt}",
                                                              "stride_yd": _const(1)}, num_warps, heavy_tag, odd))  # fmt: skip
                if f["smoothing"] or f["zloss"]:
                    continue
                if not f["softcap"]:
                    focal = {**base, **target, "alpha_ptr": _ptr(acc, f["weight"]), **mask, **rows_out, **fwd_blocks}
                    out.append(_config(_focal_fwd_kdim_kernel, focal, num_warps, tag, odd))
                for reduction in (0, 1, 2):
                    bwd = {**base, "weight_ptr": opts["weight_ptr"], **mask, "stats_ptr": f"*{acc}", "go_ptr": f"*{dt}",
                           "denom_ptr": f"*{acc}", "grad_ptr": f"*{dt}", "stride_gd": _const(1),
                           "REDUCTION": _const(reduction), "HAS_SOFTCAP": opts["HAS_SOFTCAP"], **blocks}  # fmt: skip
                    if reduction == 0:
                        bwd["stride_god"] = _const(1)
                    btag, heavy_btag = f"{tag},reduction={reduction}", f"{heavy_tag},reduction={reduction}"
                    heavy_bwd = {"BLOCK_C": _const(groups)}  # softcap, probability targets: kdim_config(heavy=True)
                    out.append(_config(_softmax_bwd_kdim_kernel, {**bwd, **target, **(heavy_bwd if f["softcap"] else {})},
                                       num_warps, heavy_btag if f["softcap"] else btag, odd))  # fmt: skip
                    out.append(_config(_softmax_prob_bwd_kdim_kernel, {**bwd, **heavy_bwd, "y_ptr": f"*{dt}",
                                                                      "stride_yd": _const(1)}, num_warps, heavy_btag, odd))  # fmt: skip
    return out


def _binary_configs():
    out = []
    widths = _launch.BINARY_WIDTHS + (None,)
    for (dtype, dt), width in itertools.product(DTYPES.items(), widths):
        acc = _acc(dtype)
        block, num_warps = _launch.BINARY_BLOCK[dtype.itemsize]
        block_l = block if width is None else width
        block_m = block // block_l
        # column stride 1 (contiguous last dim); a (N, 1) input has row stride 1 too

        def strides(p):
            return {f"stride_{p}m": _const(1), f"stride_{p}l": _const(1)} if block_l == 1 else {f"stride_{p}l": _const(1)}

        sizes = {"L": _const(1)} if block_l == 1 else {}
        blocks = {"BLOCK_M": _const(block_m), "BLOCK_L": _const(block_l)}
        for f in _flags("weight", "pos_weight", "focal", "grad", "reduce"):
            tag = f"{dt},BLOCK={block_m}x{block_l}," + ",".join(f"{k}={int(v)}" for k, v in f.items())
            ops = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": _ptr(acc, f["weight"]), "pw_ptr": _ptr(acc, f["pos_weight"]),
                   **strides("x"), **strides("y"), **(strides("w") if f["weight"] else {}),
                   **(strides("p") if f["pos_weight"] else {}), **sizes, "FOCAL": _const(f["focal"]), **blocks}  # fmt: skip
            fwd = {**ops, "grad_ptr": _ptr(dt, f["grad"]), **(strides("g") if f["grad"] else {}),
                   "out_ptr": f"*{acc}" if f["reduce"] else f"*{dt}", "REDUCE": _const(f["reduce"])}  # fmt: skip
            out.append(_config(_binary_fwd_kernel, fwd, num_warps, tag))
            if not f["grad"] and not f["reduce"]:  # backward: grad_output per element, or 0-dim
                for per_element in (False, True):
                    bwd = {**ops, "go_ptr": f"*{dt}", "grad_ptr": f"*{dt}", **strides("g"),
                           **(strides("o") if per_element else {})}  # fmt: skip
                    out.append(_config(_binary_bwd_kernel, bwd, num_warps, f"{tag},per_element_go={int(per_element)}"))
            # bool / uint8 label maps read as they are (the dense-detection step, no float copy)
            if width is None and f["focal"] and f["weight"] and not f["pos_weight"] and f["grad"] == f["reduce"]:
                yt = "i1" if f["grad"] else "u8"
                label = {**fwd, "y_ptr": f"*{yt}"}
                out.append(_config(_binary_fwd_kernel, label, num_warps, f"{tag},target={yt}"))
    return out


def _small_kernel_configs():
    out = []
    for dtype, dt in DTYPES.items():
        acc = _acc(dtype)
        out.append(_config(_scale_grad_kernel, {"go_ptr": f"*{dt}", "grad_ptr": f"*{dt}", "BLOCK": _const(4096)}, 4, dt))
        for count in (False, True):
            for mean in (False, True):
                args = {"loss_ptr": f"*{acc}", "count_ptr": _ptr(acc, count), "out_ptr": f"*{dt}", "denom_ptr": f"*{acc}",
                        "numel": "fp64", "MEAN": _const(mean), "BLOCK": _const(_rows.REDUCE_BLOCK)}  # fmt: skip
                out.append(_config(_rows._reduce_kernel, args, 4, f"{dt},count={int(count)},mean={int(mean)}"))
    return out


def launch_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers can launch."""
    return _row_kernel_configs() + _kdim_kernel_configs() + _binary_configs() + _small_kernel_configs()


# ----------------------------------------------------------------------------- compile
def ptxas_paths(arch: int = 90):
    """ptxas binaries to try, in order: $FUSEDLOSS_PTXAS, Triton's bundled one (what Triton
    itself assembles with on a GPU machine, so the registers and spills it reports are the
    ones that run), then CUDA's."""
    out = []
    try:
        from triton.backends.nvidia import compiler as nv

        bundled = nv.get_ptxas(arch).path
    except Exception:  # no bundled ptxas: the system ones must do
        bundled = None
    for p in (os.environ.get("FUSEDLOSS_PTXAS"), bundled, "/usr/local/cuda/bin/ptxas", shutil.which("ptxas")):
        if p and os.path.exists(p) and p not in out:
            out.append(p)
    return out


@dataclasses.dataclass
class CompileReport:
    name: str
    arch: int
    num_warps: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame
    smem_static: int  # bytes, from ptxas
    smem_triton: int  # bytes, Triton's dynamic shared memory (reduction scratch)
    ptxas: str  # the ptxas that assembled it
    ptx: str = dataclasses.field(repr=False, default="")
    cubin: bytes = dataclasses.field(repr=False, default=b"")
    ttgir: str = dataclasses.field(repr=False, default="")

    def layouts(self):
        """The distinct blocked layouts of the kernel's tensors (Triton GPU IR)."""
        return sorted(set(re.findall(r"#ttg\.blocked<\{[^}]*\}>", self.ttgir)))


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, ptxas: list):
    """(ptxas used, registers, spill stores, spill loads, stack, static smem) from `ptxas -v`.
    A ptxas older than the PTX Triton emitted ("Unsupported .version") is skipped."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).split(",")[0]
    errors = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for exe in ptxas:
            res = subprocess.run(
                [exe, "-v", f"--gpu-name={target}", src, "-o", os.path.join(d, "k.cubin")],
                capture_output=True,
                text=True,
            )
            if res.returncode == 0:
                break
            errors.append(f"{exe}: {res.stderr.strip()}")
        else:
            raise RuntimeError(f"no ptxas could assemble the {target} PTX:\n" + "\n".join(errors))
    log = res.stderr + res.stdout
    regs = int(_RE_REGS.search(log).group(1))
    smem = _RE_SMEM.search(log)
    spill = _RE_SPILL.search(log)
    stack, st, ld = (int(g) for g in spill.groups()) if spill else (0, 0, 0)
    return exe, regs, st, ld, stack, int(smem.group(1)) if smem else 0


def compile_config(cfg: LaunchConfig, arch: int, ptxas: list = None) -> CompileReport:
    """Compile one launch config for sm_<arch> and report ptxas's resource usage."""
    target = GPUTarget("cuda", arch, 64 if arch >= 90 else 32)
    names = list(inspect.signature(cfg.kernel.fn).parameters)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in cfg.divisible}
    src = ASTSource(cfg.kernel, cfg.signature, cfg.constexprs, attrs)
    compiled = triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "enable_fp_fusion": True})
    ptx = compiled.asm["ptx"]
    exe, regs, st, ld, stack, smem = _ptxas_report(ptx, ptxas or ptxas_paths(arch))
    return CompileReport(
        cfg.name, arch, cfg.num_warps, regs, st, ld, stack, smem, compiled.metadata.shared, exe, ptx, compiled.asm["cubin"],
        compiled.asm["ttgir"],
    )


def compile_all(arch: int, configs=None):
    """Compile every launch config (or `configs`) for sm_<arch>; a list of CompileReport."""
    ptxas = ptxas_paths(arch)
    return [compile_config(c, arch, ptxas) for c in (configs if configs is not None else launch_configs())]


def format_table(reports) -> str:
    rows = [f"{'kernel':<100} {'sm':>3} {'warps':>5} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}"]
    for r in reports:
        rows.append(
            f"{r.name:<100} {r.arch:>3} {r.num_warps:>5} {r.registers:>4} "
            f"{f'{r.spill_stores}/{r.spill_loads}':>11} {r.stack:>5} {r.smem_static + r.smem_triton:>6}"
        )
    return "\n".join(rows)


# The configs most likely to spill: each kernel x dtype at its largest tile with every
# option and optional operand on (the most live registers), the dense (K-dim) layout in
# float32 too, the K-dim kernels at their wide-map tile (D > 32; the short-map tile holds
# as many elements per thread) with every option and, in bf16 / fp32, with the most the
# ordinary (not heavy) tile carries, the elementwise kernels at their widest and narrowest
# tiles, and the small kernels.
def spill_prone_configs():
    picked = []
    for c in launch_configs():
        name = c.kernel.__name__
        if name in ("_binary_fwd_kernel", "_binary_bwd_kernel"):
            keep = (c.constexprs["BLOCK_M"] == 1 or c.constexprs["BLOCK_L"] == 1) and "weight=1,pos_weight=1,focal=1" in c.tag
        elif name in ("_scale_grad_kernel", "_reduce_kernel"):
            keep = True
        elif c.kernel in KDIM_KERNELS:
            # every option on (the heavy tile: one class per group and step), and in bf16 /
            # fp32 also the most an ordinary tile carries (z-loss, weight, mask; no softcap)
            dtype = next(d for d, dt in DTYPES.items() if c.tag.startswith(dt))
            all_on = all(c.constexprs.get(k, True) for k in ("HAS_SMOOTHING", "HAS_ZLOSS", "HAS_SOFTCAP"))
            light_max = (dtype in (torch.bfloat16, torch.float32) and c.kernel is not _ce_prob_fwd_kdim_kernel
                         and not c.constexprs.get("HAS_SMOOTHING") and not c.constexprs.get("HAS_SOFTCAP")
                         and c.constexprs.get("HAS_ZLOSS", True))  # fmt: skip
            keep = (all_on or light_max) and "weight=1,mask=1" in c.tag and c.constexprs.get("REDUCTION", 0) == 0
            keep = keep and c.constexprs["BLOCK_D"] == _launch.KDIM_TIERS[dtype][-1][2]
        else:
            dtype = next(d for d, dt in DTYPES.items() if c.tag.startswith(dt))
            largest = max(block for _, block, _ in _launch.ROW_TIERS[dtype])
            all_on = all(c.constexprs.get(k, True) for k in ("HAS_SMOOTHING", "HAS_ZLOSS", "HAS_SOFTCAP"))
            all_on = all_on and "weight=1,mask=1" in c.tag and c.constexprs.get("REDUCTION", 0) == 0
            keep = all_on and c.constexprs["BLOCK_C"] == largest and ("rows" in c.tag or "fp32" in c.tag)
        if keep:
            picked.append(c)
    return picked


def plain_ce_configs(dtype=torch.bfloat16):
    """The kernels of a plain LLM step (no option, no weight or mask, (N, C) rows, the
    largest tile): cross-entropy forward and backward with reduction "mean"."""
    dt = DTYPES[dtype]
    largest = max(block for _, block, _ in _launch.ROW_TIERS[dtype])
    plain = "weight=0,mask=0,smoothing=0,zloss=0,softcap=0"
    return [
        c for c in launch_configs()
        if c.kernel in (_ce_fwd_kernel, _softmax_bwd_kernel) and c.tag.startswith(f"{dt},rows,BLOCK_C={largest},{plain}")
        and c.constexprs.get("REDUCTION", 1) == 1
    ]  # fmt: skip


def plain_kdim_configs(dtype=torch.bfloat16):
    """The kernels of a plain segmentation step (NCHW logits, D > 32, no option, weight or
    mask): the K-dim cross-entropy forward and backward with reduction "mean"."""
    dt = DTYPES[dtype]
    block_c, block_d = _launch.KDIM_TIERS[dtype][-1][1:3]
    plain = "weight=0,mask=0,smoothing=0,zloss=0,softcap=0"
    return [
        c for c in launch_configs()
        if c.kernel in (_ce_fwd_kdim_kernel, _softmax_bwd_kdim_kernel)
        and c.tag.startswith(f"{dt},kdim,BLOCK={block_c}x{block_d},{plain}") and c.constexprs.get("REDUCTION", 1) == 1
    ]  # fmt: skip


if __name__ == "__main__":
    # python tests/aot.py [ARCH] [--spill-prone | --plain | --plain-kdim]; exit status 1 when ptxas spills.
    # Must run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arch", type=int, nargs="?", default=90)
    parser.add_argument("--spill-prone", action="store_true", help="only the configs most likely to spill")
    parser.add_argument("--plain", action="store_true", help="only the plain bf16 cross-entropy step's kernels")
    parser.add_argument("--plain-kdim", action="store_true", help="only the plain bf16 segmentation step's kernels")
    parser.add_argument("--layouts", action="store_true", help="print each kernel's blocked layouts (lines 'layout ...')")
    args = parser.parse_args()
    configs = (
        spill_prone_configs() if args.spill_prone else plain_ce_configs() if args.plain
        else plain_kdim_configs() if args.plain_kdim else None
    )  # fmt: skip
    reports = compile_all(args.arch, configs)
    print(format_table(reports))
    if args.layouts:
        for r in reports:
            print("\n".join(f"layout {r.name} {lay}" for lay in r.layouts()))
    spilled = [r.name for r in reports if r.spill_stores or r.spill_loads]
    print(f"{len(reports)} configs compiled for sm_{args.arch}; {len(spilled)} spill")
    sys.exit(1 if spilled else 0)
