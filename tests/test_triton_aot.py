"""Ahead-of-time compile check of the Triton kernels for sm_80 (A100) and sm_90 (H100):
no GPU needed (triton.compile + ptxas). By default the launch configs most likely to spill
(tests/aot.py spill_prone_configs); every launch config with FUSEDLOSS_AOT_FULL=1.

The compile runs in a subprocess without TRITON_INTERPRET, which conftest.py sets for the
rest of the suite (interpreted kernels cannot be compiled)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

import aot  # noqa: E402  (tests/aot.py)
from fusedloss.triton import _launch  # noqa: E402

FULL = os.environ.get("FUSEDLOSS_AOT_FULL", "0") == "1"
HERE = Path(__file__).resolve().parent
# The plain bf16 cross-entropy step at sm_90 (no smoothing, z-loss, softcap, weight or
# mask): options that are off must cost nothing in the kernel that runs. The kernel that
# carried every option at run time used 58 registers; the specialized one needs far fewer.
PLAIN_REGISTER_BUDGET = 40
# The plain bf16 segmentation step's K-dim kernels (NCHW, D > 32) at sm_90: forward 72
# registers, backward 104 (each thread holds 8 positions -- the 16-byte vector of bf16 -- and
# their per-row numbers). The budget catches a regression (an option that leaks into the
# plain kernel, a per-step shared-memory merge), not a tuned figure.
PLAIN_KDIM_REGISTER_BUDGET = 112


def _compile(arch, *flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(HERE / "aot.py"), str(arch), *flags], cwd=HERE.parent, env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    return done


# Spill bytes tolerated per config. sm_90: none. sm_80: ptxas keeps one 8-byte value on
# the stack in the all-options float32 sigmoid focal kernel on (N, 1) rows (both weights,
# the gradient, the reduction) at 64 registers, far below any register cap -- not
# pressure, and no plain configuration.
SPILL_ALLOWANCE = {80: 8, 90: 0}


def _report_rows(stdout):
    """(name, registers, spill store bytes) per config of aot.py's table."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("_"):
            parts = line.split()
            rows.append((parts[0], int(parts[3]), int(parts[4].split("/")[0])))
    return rows


@pytest.mark.parametrize("arch", [80, 90])
def test_launch_configs_compile_without_spills(arch):
    done = _compile(arch, *([] if FULL else ["--spill-prone"]))
    assert "configs compiled" in done.stdout, f"sm_{arch}: compile failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    rows = _report_rows(done.stdout)
    assert rows, done.stdout
    spilled = [(name, st) for name, _, st in rows if st > SPILL_ALLOWANCE[arch]]
    assert not spilled, f"sm_{arch}: spills beyond {SPILL_ALLOWANCE[arch]} B: {spilled}\n{done.stdout}"


def _compile_step(flag, budget, *more):
    """aot.py's forward and backward of a plain step at sm_90: each within `budget`
    registers, no spills. Returns the compile's output."""
    done = _compile(90, flag, *more)
    assert done.returncode == 0, f"compile failed or spills:\n{done.stdout}\n{done.stderr[-3000:]}"
    rows = _report_rows(done.stdout)
    assert len(rows) == 2, done.stdout  # forward and backward
    for name, regs, spill in rows:
        assert regs <= budget, f"{name}: {regs} registers > {budget}\n{done.stdout}"
        assert spill == 0, f"{name}: {spill} B spilled\n{done.stdout}"
    return done


def test_plain_cross_entropy_step_registers():
    """The plain bf16 step's forward and backward kernels at sm_90: at most 40 registers,
    no spills (issue: specialized kernels)."""
    _compile_step("--plain", PLAIN_REGISTER_BUDGET)


def test_plain_kdim_step_registers_and_layout():
    """The plain bf16 segmentation step's K-dim forward and backward at sm_90: within the
    register budget, no spills, and the forward's (classes, groups, positions) tile laid out
    with every class of a group in one thread (threadsPerWarp and warpsPerCTA 1 on axis 0):
    the reduction over a step's classes never leaves the thread (_launch.py, K-dim kernels)."""
    done = _compile_step("--plain-kdim", PLAIN_KDIM_REGISTER_BUDGET, "--layouts")
    tiles = [line for line in done.stdout.splitlines() if line.startswith("layout _ce_fwd_kdim_kernel") and "order = [2, 1, 0]" in line]
    assert tiles, done.stdout
    for line in tiles:
        threads = re.search(r"threadsPerWarp = \[(\d+),", line).group(1)
        warps = re.search(r"warpsPerCTA = \[(\d+),", line).group(1)
        assert threads == "1" and warps == "1", f"the class axis is split across threads:\n{line}"


def test_launchers_pick_enumerated_configs():
    """Every block size / warp count the launchers pick is one aot enumerates (same table)."""
    import torch

    configs = aot.launch_configs()
    enumerated = {(c.constexprs.get("BLOCK_C"), c.num_warps) for c in configs}
    enumerated_bin = {(c.constexprs.get("BLOCK_M"), c.constexprs.get("BLOCK_L"), c.num_warps) for c in configs}
    enumerated_kdim = {(c.constexprs["BLOCK_C"], c.constexprs["BLOCK_D"], c.num_warps) for c in configs if "BLOCK_D" in c.constexprs}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for num_classes in (2, 128, 129, 1000, 1024, 1025, 32000, 262144):
            assert _launch.row_config(num_classes, dtype) in enumerated
        for row_len in (1, 2, 8, 9, 32, 33, 64, 65, 80, 128, 129, 100000):
            assert _launch.binary_config(row_len, dtype)[:3] in enumerated_bin
        for num_positions in (2, 32, 33, 4096):
            block_c, block_d, warps, groups = _launch.kdim_config(num_positions, dtype)
            assert (block_c, block_d, warps) in enumerated_kdim
            assert (groups, block_d, warps) in enumerated_kdim  # a heavy forward's (heavy_fwd)
            assert block_c % groups == 0
    assert aot.spill_prone_configs(), "no spill-prone configs selected"
    assert len(aot.plain_ce_configs()) == 2
    assert len(aot.plain_kdim_configs()) == 2
