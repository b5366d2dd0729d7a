"""Ahead-of-time compile check of every Triton launch config, for GPUs we may not have.

`launch_configs()` enumerates each (kernel, signature, constexprs, num_warps) the
launchers can launch: block sizes and warps come from the same table the launchers read
(fusedloss/triton/_launch.py), and the signatures mirror Triton's JIT specialization (an
integer argument equal to 1 becomes a constant, a None pointer a constant None), for the
two layouts the launchers see: "rows" ((N, C) logits, D = 1, class stride 1) and "dense"
((N, C, d1..dK) logits, class stride D, position stride 1).

`compile_all(arch)` compiles them with `triton.compile` for a CUDA target (no GPU needed)
and runs `ptxas -v` on each PTX to report registers, spills and shared memory:

    python -m fusedloss.triton.aot 90          # table for sm_90
"""
import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedloss.triton import _launch
from fusedloss.triton.binary import _binary_fwd_kernel
from fusedloss.triton.cross_entropy import _ce_fwd_kernel, _ce_prob_fwd_kernel
from fusedloss.triton.focal import _focal_fwd_kernel

DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
LAYOUTS = ("rows", "dense")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    kernel: object  # the @triton.jit function
    signature: dict  # arg name -> Triton type ("*fp32", "i32", "fp64", "constexpr")
    constexprs: dict  # arg name -> value (meta-parameters, specialized 1s and Nones)
    num_warps: int
    tag: str  # human-readable summary for tables and test ids

    @property
    def name(self):
        return f"{self.kernel.__name__}[{self.tag}]"


def _acc(dtype):
    return "fp64" if dtype == torch.float64 else "fp32"


def _config(kernel, args, num_warps, tag):
    """args: name -> a Triton type string, or ("const", value) for a specialized argument."""
    assert list(args) == kernel.arg_names, (kernel.__name__, list(args), kernel.arg_names)
    signature, constexprs = {}, {}
    for name, v in args.items():
        if isinstance(v, tuple):
            signature[name] = "constexpr"
            constexprs[name] = v[1]
        else:
            signature[name] = v
    return LaunchConfig(kernel, signature, constexprs, num_warps, tag)


def _const(v):
    return ("const", v)


def _row_strides(prefix, layout, has=True, dims=("n", "c", "d")):
    """Strides of an (N, C, D) operand as the JIT sees them: 1 -> a constant."""
    if not has:  # absent operand: the launcher passes zeros
        return {f"stride_{prefix}{d}": "i32" for d in dims}
    if layout == "rows":  # (N, C) contiguous, D = 1
        ones = {"c", "d"}
    else:  # (N, C, D) contiguous, D > 1
        ones = {"d"}
    return {f"stride_{prefix}{d}": (_const(1) if d in ones else "i32") for d in dims}


def _row_kernel_configs():
    out = []
    flags = itertools.product((False, True), repeat=3)  # weight/alpha, mask, grad
    for (dtype, dt), layout, (has_w, has_m, grad) in itertools.product(DTYPES.items(), LAYOUTS, flags):
        acc = _acc(dtype)
        for limit, block_c, num_warps in _launch.ROW_TIERS[dtype]:
            meta = {"WRITE_GRAD": _const(grad), "BLOCK_C": _const(block_c)}
            common_ptrs = {
                "mask_ptr": "*i1" if has_m else _const(None),
                "grad_ptr": f"*{dt}" if grad else _const(None),
                "loss_ptr": f"*{acc}",
                "count_ptr": f"*{acc}",
            }
            strides_x = _row_strides("x", layout)
            strides_m = _row_strides("m", layout, has_m)
            strides_g = _row_strides("g", layout, grad)
            # the target (N, D) int64 view: (N, 1) from an (N,) target has strides (1, 1)
            strides_t = {"stride_tn": _const(1) if layout == "rows" else "i32", "stride_td": _const(1)}
            sizes = {"C": "i32", "D": _const(1) if layout == "rows" else "i32"}
            tag = f"{dt},{layout},BLOCK_C={block_c},w={int(has_w)},mask={int(has_m)},grad={int(grad)}"
            w = {"weight_ptr": f"*{acc}" if has_w else _const(None)}
            ce = {"x_ptr": f"*{dt}", "target_ptr": "*i64", **w, **common_ptrs, **strides_x, **strides_t,
                  **strides_m, **strides_g, **sizes, "ignore_index": "i32", "label_smoothing": "fp64",
                  "z_loss": "fp64", "softcap": "fp64", **meta}  # fmt: skip
            out.append(_config(_ce_fwd_kernel, ce, num_warps, tag))
            prob = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", **w, **common_ptrs, **strides_x,
                    **_row_strides("y", layout), **strides_m, **strides_g, **sizes,
                    "label_smoothing": "fp64", "z_loss": "fp64", "softcap": "fp64", **meta}  # fmt: skip
            out.append(_config(_ce_prob_fwd_kernel, prob, num_warps, tag))
            focal = {"x_ptr": f"*{dt}", "target_ptr": "*i64", "alpha_ptr": w["weight_ptr"], **common_ptrs,
                     **strides_x, **strides_t, **strides_m, **strides_g, **sizes, "ignore_index": "i32",
                     "gamma": "fp64", **meta}  # fmt: skip
            out.append(_config(_focal_fwd_kernel, focal, num_warps, tag))
    return out


def _binary_configs():
    out = []
    flags = itertools.product((False, True), repeat=5)  # weight, pos_weight, grad, reduce, focal
    widths = _launch.BINARY_WIDTHS + (None,)
    for (dtype, dt), width, (has_w, has_pw, grad, reduce, focal) in itertools.product(DTYPES.items(), widths, flags):
        acc = _acc(dtype)
        block, num_warps = _launch.BINARY_BLOCK[dtype.itemsize]
        block_l = block if width is None else width
        block_m = block // block_l
        # column stride 1 (contiguous last dim); a (N, 1) input has row stride 1 too
        row_stride = _const(1) if block_l == 1 else "i32"

        def strides(p, has=True):
            return {f"stride_{p}m": row_stride if has else "i32", f"stride_{p}l": _const(1) if has else "i32"}

        out_strides = {"stride_om": (_const(1) if reduce else row_stride), "stride_ol": (_const(1) if not reduce else "i32")}
        args = {
            "x_ptr": f"*{dt}", "y_ptr": f"*{dt}",
            "w_ptr": f"*{acc}" if has_w else _const(None),
            "pw_ptr": f"*{acc}" if has_pw else _const(None),
            "grad_ptr": f"*{dt}" if grad else _const(None),
            "out_ptr": f"*{acc}",
            **strides("x"), **strides("y"), **strides("w", has_w), **strides("p", has_pw), **strides("g", grad),
            **out_strides,
            "M": "i32", "L": _const(1) if block_l == 1 else "i32", "tiles": "i32",
            "gamma": "fp64", "alpha": "fp64",
            "FOCAL": _const(focal), "WRITE_GRAD": _const(grad), "REDUCE": _const(reduce),
            "BLOCK_M": _const(block_m), "BLOCK_L": _const(block_l),
        }  # fmt: skip
        tag = f"{dt},BLOCK={block_m}x{block_l},w={int(has_w)},pw={int(has_pw)},grad={int(grad)},reduce={int(reduce)},focal={int(focal)}"
        out.append(_config(_binary_fwd_kernel, args, num_warps, tag))
    return out


def launch_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers can launch."""
    return _row_kernel_configs() + _binary_configs()


# ----------------------------------------------------------------------------- compile
def ptxas_paths(arch: int = 90):
    """ptxas binaries to try, in order: $FUSEDLOSS_PTXAS, CUDA's (the one a user's toolchain
    has), then Triton's bundled one (always new enough for the PTX version Triton emits)."""
    out = []
    for p in (os.environ.get("FUSEDLOSS_PTXAS"), "/usr/local/cuda/bin/ptxas", shutil.which("ptxas")):
        if p and os.path.exists(p) and p not in out:
            out.append(p)
    try:
        from triton.backends.nvidia import compiler as nv

        out.append(nv.get_ptxas(arch).path)
    except Exception:  # no bundled ptxas: the system ones must do
        pass
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
    src = ASTSource(cfg.kernel, cfg.signature, cfg.constexprs)
    compiled = triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "enable_fp_fusion": True})
    ptx = compiled.asm["ptx"]
    exe, regs, st, ld, stack, smem = _ptxas_report(ptx, ptxas or ptxas_paths(arch))
    return CompileReport(
        cfg.name, arch, cfg.num_warps, regs, st, ld, stack, smem, compiled.metadata.shared, exe, ptx, compiled.asm["cubin"]
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
# optional operand and the gradient on (the most live registers), the dense (K-dim) layout
# in float32, and the elementwise kernel at its widest and narrowest tiles.
_ALL_ON = ("w=1,mask=1,grad=1", "w=1,pw=1,grad=1,reduce=1,focal=1")


def spill_prone_configs():
    picked = []
    for c in launch_configs():
        if not c.tag.endswith(_ALL_ON):
            continue
        if c.kernel.__name__ == "_binary_fwd_kernel":
            keep = c.constexprs["BLOCK_M"] == 1 or c.constexprs["BLOCK_L"] == 1
        else:
            dtype = next(d for d, name in DTYPES.items() if name in c.tag)
            largest = max(block for _, block, _ in _launch.ROW_TIERS[dtype])
            keep = c.constexprs["BLOCK_C"] == largest and ("rows" in c.tag or "fp32" in c.tag)
        if keep:
            picked.append(c)
    return picked


if __name__ == "__main__":
    # python -m fusedloss.triton.aot [ARCH] [--spill-prone]; exit status 1 when ptxas spills.
    # Must run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arch", type=int, nargs="?", default=90)
    parser.add_argument("--spill-prone", action="store_true", help="only the configs most likely to spill")
    args = parser.parse_args()
    reports = compile_all(args.arch, spill_prone_configs() if args.spill_prone else None)
    print(format_table(reports))
    spilled = [r.name for r in reports if r.spill_stores or r.spill_loads]
    print(f"{len(reports)} configs compiled for sm_{args.arch}; {len(spilled)} spill")
    sys.exit(1 if spilled else 0)
