"""Launch configurations: the one table the launchers pick from and aot.py enumerates.

Row kernels (cross-entropy, focal): one program per row, BLOCK_C classes per tile. The
kernels are memory bound; a large-C tile is 8 elements per thread (2048 x 2 B or 2048 x
4 B over 256 threads, 1024 x 8 B over 128). ptxas caps these at 128 registers on sm_80;
larger tiles (4096 x 4 B, or 16 warps) make the probability-target kernel spill
(tests/test_triton_aot.py checks). Measured on an H100 (class-index kernel, forward with
gradient, 16384 x 128256 bf16): 2048 x 8 warps 5.2 ms, 4096 x 8 warps 6.8 ms, 16384 x 32
warps 5.9 ms; fp32 4096 x 32000: 0.58 / 0.60 / 0.48 ms. Small vocabularies (vision,
C <= 1024) get a narrower tile and fewer warps so most lanes hold a class.

K-dim kernels (cross-entropy, focal and their backward on (N, C, d1..dK) logits whose
positions are contiguous, NCHW): a program holds BLOCK_D consecutive positions of one sample
across its lanes and walks the classes BLOCK_C at a time: every class is one contiguous load
of BLOCK_D positions (a row kernel would read each row's classes D elements apart). 16
elements per thread per step in 2- and 4-byte dtypes (8 in float64), as the row tiles, half
that in the heavy kernels (kdim_config); short maps (D <= 32) trade positions for classes.
The forward splits a step's classes into GROUPS class groups (_rows._class_tile), chosen so
that Triton's layout puts the 32 lanes and the warps on the positions and groups (BLOCK_D /
16-byte vector x GROUPS >= 32 x num_warps) and every class of a group in one thread: the
reduction over a step's classes then never leaves the thread (tests/test_triton_aot.py
checks the compiled layout of the plain bf16 forward). Set from registers and layouts
(tests/aot.py); not yet timed on a GPU (bench/gpu_check.sh measures them).

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

# (largest D the tier serves, BLOCK_C, BLOCK_D, num_warps, GROUPS); the last tier serves every
# larger D.
KDIM_TIERS = {
    torch.float16: ((32, 64, 32, 4, 32), (None, 8, 256, 4, 4)),
    torch.bfloat16: ((32, 64, 32, 4, 32), (None, 8, 256, 4, 4)),
    torch.float32: ((32, 64, 32, 4, 16), (None, 16, 128, 4, 4)),
    torch.float64: ((32, 32, 32, 4, 8), (None, 8, 128, 4, 4)),
}

# Elementwise: elements per tile and num_warps by element size; the tile is BLOCK_M rows x
# BLOCK_L columns with BLOCK_L the smallest of BINARY_WIDTHS that holds a row (capped at
# the tile size), so short rows ((N, 1) targets, small last dims) still fill a tile.
BINARY_BLOCK = {2: (1024, 4), 4: (512, 4), 8: (256, 4)}
BINARY_WIDTHS = (1, 8, 32, 128)
BINARY_TILES_PER_PROGRAM = 8

_override = None  # test hook: a tier tuple replacing ROW_TIERS for every dtype
_override_binary = None  # test hook: replaces BINARY_BLOCK
_override_kdim = None  # test hook: a tier tuple replacing KDIM_TIERS for every dtype


def row_config(num_classes: int, dtype: torch.dtype):
    """(BLOCK_C, num_warps) for a row kernel over `num_classes` classes of `dtype`."""
    tiers = _override or ROW_TIERS[dtype]
    for limit, block, warps in tiers:
        if limit is None or num_classes <= limit:
            return block, warps
    raise AssertionError("the last tier must have limit None")


# Fewest positions per sample for the K-dim kernels: with 2 or 3, a row's classes 2-3 elements
# apart already share their 32-byte sectors, and a block of positions would leave most lanes
# empty (as csrc/cuda/softmax_losses.cu's pick_layout).
KDIM_MIN_POSITIONS = 4


def use_kdim(logits: torch.Tensor) -> bool:
    """The K-dim kernels serve (N, C, D) logits whose positions are the unit stride and
    classes are not (NCHW), D >= KDIM_MIN_POSITIONS; classes that are contiguous (2-D input,
    channels_last viewed as (N, C, H*W) with strides (HWC, 1, C)) keep the row kernels, which
    read each row's classes in one contiguous run."""
    _, _, d = logits.shape
    return d >= KDIM_MIN_POSITIONS and logits.stride(2) == 1 and logits.stride(1) != 1


def kdim_config(num_positions: int, dtype: torch.dtype, heavy: bool = False):
    """(BLOCK_C, BLOCK_D, num_warps, GROUPS) for a K-dim kernel over D = `num_positions`.
    A kernel with more per-element work or per-position sums (probability targets; label
    smoothing or softcap in the forward, softcap in the backward: `heavy`) takes GROUPS
    classes per step, one per group (one element per 16-byte vector lane): with the tier's
    BLOCK_C the all-options kernels used 168-255 registers and the probability-target forward
    spilled (60 B at sm_90 in bf16); this way 56-160."""
    tiers = _override_kdim or KDIM_TIERS[dtype]
    for limit, block_c, block_d, warps, groups in tiers:
        if limit is None or num_positions <= limit:
            return (groups if heavy else block_c), block_d, warps, groups
    raise AssertionError("the last tier must have limit None")


def binary_config(row_len: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_L, num_warps, tiles per program) for the elementwise kernel."""
    block, warps = (_override_binary or BINARY_BLOCK)[dtype.itemsize]
    width = next((w for w in BINARY_WIDTHS if row_len <= w and w < block), block)
    return block // width, width, warps, BINARY_TILES_PER_PROGRAM


@contextlib.contextmanager
def small_blocks(row_tiers=((None, 16, 1),), binary_blocks=None, kdim_tiers=((None, 4, 8, 1, 2),)):
    """Test-only: run the launchers with tiny tiles, so the interpreter exercises multi-tile
    rows (C not a multiple of BLOCK_C, C > BLOCK_C) and several position blocks per sample
    (D not a multiple of BLOCK_D) on small shapes."""
    global _override, _override_binary, _override_kdim
    saved = _override, _override_binary, _override_kdim
    _override = row_tiers
    _override_binary = binary_blocks or {2: (16, 1), 4: (16, 1), 8: (16, 1)}
    _override_kdim = kdim_tiers
    try:
        yield
    finally:
        _override, _override_binary, _override_kdim = saved
