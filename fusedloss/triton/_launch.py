"""Launch configurations: the one table the launchers pick from and aot.py enumerates.

Row kernels (cross-entropy, focal): one program per row, BLOCK_C classes per tile. The
kernels are memory bound; a large-C tile is 8 elements per thread (2048 x 2 B or 2048 x
4 B over 256 threads, 1024 x 8 B over 128). ptxas caps these at 128 registers on sm_80;
larger tiles (4096 x 4 B, or 16 warps) make the probability-target kernel spill
(tests/test_triton_aot.py checks). Measured on an H100 (class-index kernel, forward with
gradient, 16384 x 128256 bf16): 2048 x 8 warps 5.2 ms, 4096 x 8 warps 6.8 ms, 16384 x 32
warps 5.9 ms; fp32 4096 x 32000: 0.58 / 0.60 / 0.48 ms. Small vocabularies (vision,
C <= 1024) get a narrower tile and fewer warps so most lanes hold a class.

Elementwise kernel (BCE / sigmoid focal): a fixed number of elements per tile, a fixed
number of tiles per program (so a program's partial sums have a fixed, shape-determined
order).
"""
import contextlib

import torch

# (largest C the tier serves, BLOCK_C, num_warps); the last tier serves every larger C
# with a BLOCK_C loop. Keyed by dtype: fp16 keeps the 4096 tile, whose 2048 form spills 4 B
# on sm_80 (tests/test_triton_aot.py), while bf16 2048 is measured faster and spill-free.
ROW_TIERS = {
    torch.float16: ((128, 128, 1), (1024, 1024, 4), (None, 4096, 8)),
    torch.bfloat16: ((128, 128, 1), (1024, 1024, 4), (None, 2048, 8)),
    torch.float32: ((128, 128, 1), (1024, 1024, 4), (None, 2048, 8)),
    torch.float64: ((128, 128, 1), (None, 1024, 4)),
}

# Elementwise: elements per tile and num_warps by element size; the tile is BLOCK_M rows x
# BLOCK_L columns with BLOCK_L the smallest of BINARY_WIDTHS that holds a row (capped at
# the tile size), so short rows ((N, 1) targets, small last dims) still fill a tile.
BINARY_BLOCK = {2: (1024, 4), 4: (512, 4), 8: (256, 4)}
BINARY_WIDTHS = (1, 8, 32, 128)
BINARY_TILES_PER_PROGRAM = 8

_override = None  # test hook: a tier tuple replacing ROW_TIERS for every dtype
_override_binary = None  # test hook: replaces BINARY_BLOCK


def row_config(num_classes: int, dtype: torch.dtype):
    """(BLOCK_C, num_warps) for a row kernel over `num_classes` classes of `dtype`."""
    tiers = _override or ROW_TIERS[dtype]
    for limit, block, warps in tiers:
        if limit is None or num_classes <= limit:
            return block, warps
    raise AssertionError("the last tier must have limit None")


def binary_config(row_len: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_L, num_warps, tiles per program) for the elementwise kernel."""
    block, warps = (_override_binary or BINARY_BLOCK)[dtype.itemsize]
    width = next((w for w in BINARY_WIDTHS if row_len <= w and w < block), block)
    return block // width, width, warps, BINARY_TILES_PER_PROGRAM


@contextlib.contextmanager
def small_blocks(row_tiers=((None, 16, 1),), binary_blocks=None):
    """Test-only: run the launchers with tiny tiles, so the interpreter exercises multi-tile
    rows (C not a multiple of BLOCK_C, C > BLOCK_C) on small shapes."""
    global _override, _override_binary
    saved = _override, _override_binary
    _override = row_tiers
    _override_binary = binary_blocks or {2: (16, 1), 4: (16, 1), 8: (16, 1)}
    try:
        yield
    finally:
        _override, _override_binary = saved
