"""Ahead-of-time compile check of the Triton kernels for sm_80 (A100) and sm_90 (H100):
no GPU needed (triton.compile + ptxas). By default the launch configs most likely to spill
(fusedloss.triton.aot.spill_prone_configs); every launch config with FUSEDLOSS_AOT_FULL=1
(about 1100 per arch, ~2 s each on a small CPU).

The compile runs in a subprocess without TRITON_INTERPRET, which conftest.py sets for the
rest of the suite (interpreted kernels cannot be compiled)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from fusedloss.triton import _launch, aot  # noqa: E402

FULL = os.environ.get("FUSEDLOSS_AOT_FULL", "0") == "1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", [80, 90])
def test_launch_configs_compile_without_spills(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fusedloss.triton.aot", str(arch)] + ([] if FULL else ["--spill-prone"])
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"sm_{arch}: compile failed or ptxas reports spills:\n{done.stdout}\n{done.stderr[-3000:]}"
    assert " 0 spill" in done.stdout.splitlines()[-1], done.stdout


def test_launchers_pick_enumerated_configs():
    """Every block size / warp count the launchers pick is one aot enumerates (same table)."""
    import torch

    configs = aot.launch_configs()
    enumerated = {(c.constexprs.get("BLOCK_C"), c.num_warps) for c in configs}
    enumerated_bin = {(c.constexprs.get("BLOCK_M"), c.constexprs.get("BLOCK_L"), c.num_warps) for c in configs}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for num_classes in (2, 128, 129, 1000, 1024, 1025, 32000, 262144):
            assert _launch.row_config(num_classes, dtype) in enumerated
        for row_len in (1, 2, 8, 9, 32, 33, 64, 65, 80, 128, 129, 100000):
            assert _launch.binary_config(row_len, dtype)[:3] in enumerated_bin
    assert aot.spill_prone_configs(), "no spill-prone configs selected"
