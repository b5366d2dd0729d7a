"""Ahead-of-time compile check of the Triton kernels for sm_80 (A100) and sm_90 (H100):
no GPU needed (triton.compile + ptxas). Every launch config of fusedloss.triton.aot is
compiled when FUSEDLOSS_AOT_FULL=1 (about 1100 per arch, ~2 s each on a small CPU); by
default the configs most likely to spill: each kernel x dtype at its largest tile with
every optional operand and the gradient on (the most live registers), the dense (K-dim)
layout in float32, and the elementwise kernel at its widest and narrowest tiles."""
import os

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from fusedloss.triton import _launch, aot  # noqa: E402

FULL = os.environ.get("FUSEDLOSS_AOT_FULL", "0") == "1"
ALL_ON = ("w=1,mask=1,grad=1", "w=1,pw=1,grad=1,reduce=1,focal=1")


def _largest_block(tag):
    size = 8 if "fp64" in tag else 4 if "fp32" in tag else 2
    return max(block for _, block, _ in _launch.ROW_TIERS[size])


def _selected():
    configs = aot.launch_configs()
    if FULL:
        return configs
    picked = []
    for c in configs:
        if not c.tag.endswith(ALL_ON):
            continue
        if c.kernel.__name__ == "_binary_fwd_kernel":
            keep = c.constexprs["BLOCK_M"] == 1 or c.constexprs["BLOCK_L"] == 1
        else:
            keep = c.constexprs["BLOCK_C"] == _largest_block(c.tag) and ("rows" in c.tag or "fp32" in c.tag)
        if keep:
            picked.append(c)
    return picked


@pytest.mark.parametrize("arch", [80, 90])
def test_launch_configs_compile_without_spills(arch):
    reports = aot.compile_all(arch, _selected())
    bad = [r for r in reports if r.spill_stores or r.spill_loads]
    assert not bad, f"ptxas reports spills on sm_{arch}:\n" + aot.format_table(reports)


def test_launchers_pick_enumerated_configs():
    """Every block size / warp count the launchers pick is one aot enumerates (same table)."""
    import torch

    enumerated = {(c.constexprs.get("BLOCK_C"), c.num_warps) for c in aot.launch_configs()}
    enumerated_bin = {(c.constexprs.get("BLOCK_M"), c.constexprs.get("BLOCK_L"), c.num_warps) for c in aot.launch_configs()}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for num_classes in (2, 128, 129, 1000, 1024, 1025, 32000, 262144):
            assert _launch.row_config(num_classes, dtype) in enumerated
        for row_len in (1, 2, 8, 9, 64, 65, 100000):
            assert _launch.binary_config(row_len, dtype)[:3] in enumerated_bin
