"""Backward of the softmax losses (cross-entropy, softmax focal) in Triton:
`_softmax_bwd_kernel` (class-index targets) and `_softmax_prob_bwd_kernel` (probability
targets) -> `softmax_bwd` (launcher) -> op `fusedloss::softmax_bwd_triton` (__init__.py).

One program per row (per block of positions for NCHW K-dim logits: the K-dim kernels
below) reads the row's logits once and writes its gradient once, from the
four numbers the forward stored per row (stats = [lse, coef_p, smooth, target_coef],
csrc/ops.cpp) and grad_output (and the "mean" denominator) read from device memory:
whatever grad_output is (1, a GradScaler's 65536, per row for "none"), the step stays at
2 reads + 1 write of N x C, with no host sync. With inplace_backward, grad is the logits'
own storage: each tile is read before it is written.

    dloss/dz_c = coef_p p_c - smooth w_c [c allowed] - target_coef [c == t]      (index)
    dloss/dz_c = coef_p p_c - w_c (target_coef y_c + smooth [c allowed])        (probability)
    dloss/dx_c = dloss/dz_c * dz_c/dx_c for allowed c (softcap), p_c = exp(z_c - lse)
and everything times scale = grad_out[row] ("none"), grad_out ("sum"), grad_out / denom
("mean"; 0 when denom is 0, SPEC rule 6).
"""
import triton
import triton.language as tl

from fusedloss.triton._launch import kdim_config, row_config, use_kdim
from fusedloss.triton._rows import _logit_tile, _position_block, _row_base


@triton.jit
def _row_scale(row, D, go_ptr, denom_ptr, stride_gon, stride_god, REDUCTION: tl.constexpr, ACC: tl.constexpr):
    """What the row's dloss/dx is multiplied by (grad_output, / the "mean" denominator)."""
    if REDUCTION == 0:
        go = tl.load(go_ptr + _row_base(row, D, stride_gon, stride_god)).to(ACC)
    else:
        go = tl.load(go_ptr).to(ACC)
    if REDUCTION == 1:
        denom = tl.load(denom_ptr).to(ACC)
        go = tl.where(denom != 0, go / tl.where(denom != 0, denom, 1.0), 0.0)
    return go


@triton.jit
def _softmax_bwd_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64
    target_ptr,  # (N, D) int64 class indices
    weight_ptr,  # (C,) acc class weights (only the smoothing term reads them); None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    stats_ptr,  # (N * D, 4) acc: lse, coef_p, smooth, target_coef (lse = -inf: zero row)
    go_ptr,  # grad_output: (N, D) any strides ("none") or () ("mean", "sum"), any float dtype
    denom_ptr,  # () acc, the "mean" denominator
    grad_ptr,  # (N, C, D) logits' dtype, written; may be the logits' own storage
    # strides
    stride_xn,  # logits, sample
    stride_xc,  # logits, class
    stride_xd,  # logits, position
    stride_tn,  # target, sample
    stride_td,  # target, position
    stride_mn,  # mask, sample (0 where the mask broadcasts)
    stride_mc,  # mask, class
    stride_md,  # mask, position
    stride_gn,  # grad, sample
    stride_gc,  # grad, class
    stride_gd,  # grad, position
    stride_gon,  # grad_output, sample ("none")
    stride_god,  # grad_output, position ("none")
    # sizes
    C,  # number of classes
    D,  # positions per sample
    # scalars
    softcap: tl.float64,  # cap > 0 (read only with HAS_SOFTCAP)
    # meta-parameters
    REDUCTION: tl.constexpr,  # 0 "none", 1 "mean", 2 "sum"
    HAS_SOFTCAP: tl.constexpr,  # softcap > 0
    BLOCK_C: tl.constexpr,  # classes per tile
):
    row = tl.program_id(0)
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    st = stats_ptr + row.to(tl.int64) * 4
    lse = tl.load(st)
    live = lse != float("-inf")  # else: ignored / empty / out of range, gradient 0
    scale = _row_scale(row, D, go_ptr, denom_ptr, stride_gon, stride_god, REDUCTION, ACC)
    # the scale folded into the coefficients: one multiply per row, not per element
    coef_p = tl.load(st + 1) * scale
    smooth = tl.load(st + 2) * scale
    target_coef = tl.load(st + 3) * scale
    t = tl.load(target_ptr + _row_base(row, D, stride_tn, stride_td), mask=live, other=-1)

    x_row = x_ptr + _row_base(row, D, stride_xn, stride_xd)
    g_row = grad_ptr + _row_base(row, D, stride_gn, stride_gd)
    m_row = None
    if mask_ptr is not None:
        m_row = mask_ptr + _row_base(row, D, stride_mn, stride_md)
    n_cols = tl.where(live, C, 0)  # rows with a zero gradient read no logits
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        in_row = cols < C
        _x, allowed, z, dzdx = _logit_tile(x_row, m_row, cols, cols < n_cols, stride_xc, stride_mc, softcap, HAS_SOFTCAP, ACC)
        w = tl.full([BLOCK_C], 1.0, ACC)
        if weight_ptr is not None:
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
        g = tl.exp(z - lse) * coef_p
        g = tl.where(allowed, g - smooth * w, g)
        g = tl.where(cols == t, g - target_coef, g)  # a masked target: -target_coef alone
        if HAS_SOFTCAP:
            g = tl.where(allowed, g * dzdx, g)
        g = tl.where(live, g, 0.0)
        tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _softmax_prob_bwd_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64
    y_ptr,  # (N, C, D) target class probabilities, logits' dtype
    weight_ptr,  # (C,) acc class weights; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    stats_ptr,  # (N * D, 4) acc: lse, coef_p, smooth, target_coef (= 1 - eps)
    go_ptr,  # grad_output: (N, D) any strides ("none") or () ("mean", "sum"), any float dtype
    denom_ptr,  # () acc, the "mean" denominator
    grad_ptr,  # (N, C, D) logits' dtype, written; may be the logits' own storage
    # strides
    stride_xn,  # logits, sample
    stride_xc,  # logits, class
    stride_xd,  # logits, position
    stride_yn,  # target, sample
    stride_yc,  # target, class
    stride_yd,  # target, position
    stride_mn,  # mask, sample (0 where the mask broadcasts)
    stride_mc,  # mask, class
    stride_md,  # mask, position
    stride_gn,  # grad, sample
    stride_gc,  # grad, class
    stride_gd,  # grad, position
    stride_gon,  # grad_output, sample ("none")
    stride_god,  # grad_output, position ("none")
    # sizes
    C,  # number of classes
    D,  # positions per sample
    # scalars
    softcap: tl.float64,  # cap > 0 (read only with HAS_SOFTCAP)
    # meta-parameters
    REDUCTION: tl.constexpr,  # 0 "none", 1 "mean", 2 "sum"
    HAS_SOFTCAP: tl.constexpr,  # softcap > 0
    BLOCK_C: tl.constexpr,  # classes per tile
):
    row = tl.program_id(0)
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    st = stats_ptr + row.to(tl.int64) * 4
    lse = tl.load(st)
    live = lse != float("-inf")  # else: an empty row, gradient 0
    scale = _row_scale(row, D, go_ptr, denom_ptr, stride_gon, stride_god, REDUCTION, ACC)
    coef_p = tl.load(st + 1) * scale
    smooth = tl.load(st + 2)
    keep = tl.load(st + 3)

    x_row = x_ptr + _row_base(row, D, stride_xn, stride_xd)
    y_row = y_ptr + _row_base(row, D, stride_yn, stride_yd)
    g_row = grad_ptr + _row_base(row, D, stride_gn, stride_gd)
    m_row = None
    if mask_ptr is not None:
        m_row = mask_ptr + _row_base(row, D, stride_mn, stride_md)
    n_cols = tl.where(live, C, 0)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        in_row = cols < C
        load_ok = cols < n_cols
        _x, allowed, z, dzdx = _logit_tile(x_row, m_row, cols, load_ok, stride_xc, stride_mc, softcap, HAS_SOFTCAP, ACC)
        y = tl.load(y_row + cols.to(tl.int64) * stride_yc, mask=load_ok, other=0.0).to(ACC)
        w = tl.full([BLOCK_C], 1.0, ACC)
        if weight_ptr is not None:
            w = tl.load(weight_ptr + cols, mask=load_ok, other=0.0).to(ACC)
        y_s = keep * y  # the smoothed target y'_c; a masked class keeps only its own part
        y_s = tl.where(allowed, y_s + smooth, y_s)
        g = tl.exp(z - lse) * coef_p - (w * y_s) * scale
        if HAS_SOFTCAP:
            g = tl.where(allowed, g * dzdx, g)
        g = tl.where(live, g, 0.0)
        tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(grad_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------- K-dim kernels
# (N, C, d1..dK) logits with contiguous positions (NCHW): a program holds BLOCK_D consecutive
# positions of one sample across its lanes (their stats as vectors) and walks the classes
# BLOCK_C at a time, a (BLOCK_C, BLOCK_D) tile per step, each class one contiguous load and
# store of BLOCK_D positions. The arithmetic is the row kernels', per position; nothing is
# reduced over the classes, so the tile needs no class groups (the forward's GROUPS).
@triton.jit
def _kdim_rows(pid, D, stats_ptr, go_ptr, denom_ptr, stride_gon, stride_god, REDUCTION: tl.constexpr,
               BLOCK_D: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """A K-dim program's positions and their backward numbers: (n64, d64, ok, live, lse,
    coef_p, smooth, target_coef, scale), the coefficients already times the scale except
    for smooth and target_coef (the caller scales what it uses)."""
    n, d, ok = _position_block(pid, D, BLOCK_D)
    n64, d64 = n.to(tl.int64), d.to(tl.int64)
    st = stats_ptr + (n64 * D + d64) * 4
    lse = tl.load(st, mask=ok, other=float("-inf"))
    live = lse != float("-inf")  # else: ignored / empty / out of range / past D: gradient 0
    if REDUCTION == 0:
        go = tl.load(go_ptr + n64 * stride_gon + d64 * stride_god, mask=ok, other=0.0).to(ACC)
    else:
        go = tl.load(go_ptr).to(ACC)
    if REDUCTION == 1:
        denom = tl.load(denom_ptr).to(ACC)
        go = tl.where(denom != 0, go / tl.where(denom != 0, denom, 1.0), 0.0)
    go = go + tl.zeros([BLOCK_D], ACC)  # "mean" / "sum": one scale, broadcast to the block
    coef_p = tl.load(st + 1, mask=ok, other=0.0) * go
    smooth = tl.load(st + 2, mask=ok, other=0.0)
    target_coef = tl.load(st + 3, mask=ok, other=0.0)
    return n64, d64, ok, live, lse, coef_p, smooth, target_coef, go


@triton.jit
def _softmax_bwd_kdim_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64; position stride 1
    target_ptr,  # (N, D) int64 class indices
    weight_ptr,  # (C,) acc class weights (only the smoothing term reads them); None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    stats_ptr,  # (N * D, 4) acc: lse, coef_p, smooth, target_coef (lse = -inf: zero row)
    go_ptr,  # grad_output: (N, D) any strides ("none") or () ("mean", "sum"), any float dtype
    denom_ptr,  # () acc, the "mean" denominator
    grad_ptr,  # (N, C, D) logits' dtype, written; may be the logits' own storage
    # strides
    stride_xn,  # logits, sample
    stride_xc,  # logits, class
    stride_xd,  # logits, position
    stride_tn,  # target, sample
    stride_td,  # target, position
    stride_mn,  # mask, sample (0 where the mask broadcasts)
    stride_mc,  # mask, class
    stride_md,  # mask, position
    stride_gn,  # grad, sample
    stride_gc,  # grad, class
    stride_gd,  # grad, position
    stride_gon,  # grad_output, sample ("none")
    stride_god,  # grad_output, position ("none")
    # sizes
    C,  # number of classes
    D,  # positions per sample (> 1)
    # scalars
    softcap: tl.float64,  # cap > 0 (read only with HAS_SOFTCAP)
    # meta-parameters
    REDUCTION: tl.constexpr,  # 0 "none", 1 "mean", 2 "sum"
    HAS_SOFTCAP: tl.constexpr,  # softcap > 0
    BLOCK_C: tl.constexpr,  # classes per tile
    BLOCK_D: tl.constexpr,  # positions per program
):
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    n64, d64, ok, live, lse, coef_p, smooth, target_coef, scale = _kdim_rows(
        tl.program_id(0), D, stats_ptr, go_ptr, denom_ptr, stride_gon, stride_god, REDUCTION, BLOCK_D, ACC
    )
    smooth = (smooth * scale)[None, :]
    target_coef = (target_coef * scale)[None, :]
    t = tl.load(target_ptr + n64 * stride_tn + d64 * stride_td, mask=live, other=-1)[None, :]
    lse_t, coef_t, live_t = lse[None, :], coef_p[None, :], live[None, :]

    x_pos = (x_ptr + n64 * stride_xn + d64 * stride_xd)[None, :]
    g_pos = (grad_ptr + n64 * stride_gn + d64 * stride_gd)[None, :]
    m_tile = None
    if mask_ptr is not None:
        m_tile = (mask_ptr + n64 * stride_mn + d64 * stride_md)[None, :]
    for start in range(0, C, BLOCK_C):
        cols = (start + tl.arange(0, BLOCK_C))[:, None]  # (BLOCK_C, 1)
        in_row = (cols < C) & ok[None, :]
        # rows with a zero gradient read no logits
        _x, allowed, z, dzdx = _logit_tile(x_pos, m_tile, cols, in_row & live_t, stride_xc, stride_mc, softcap, HAS_SOFTCAP, ACC)
        w = tl.full([BLOCK_C, 1], 1.0, ACC)
        if weight_ptr is not None:
            w = tl.load(weight_ptr + cols, mask=cols < C, other=0.0).to(ACC)
        g = tl.exp(z - lse_t) * coef_t
        g = tl.where(allowed, g - smooth * w, g)
        g = tl.where(cols == t, g - target_coef, g)  # a masked target: -target_coef alone
        if HAS_SOFTCAP:
            g = tl.where(allowed, g * dzdx, g)
        g = tl.where(live_t, g, 0.0)
        tl.store(g_pos + cols.to(tl.int64) * stride_gc, g.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _softmax_prob_bwd_kdim_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64; position stride 1
    y_ptr,  # (N, C, D) target class probabilities, logits' dtype
    weight_ptr,  # (C,) acc class weights; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    stats_ptr,  # (N * D, 4) acc: lse, coef_p, smooth, target_coef (= 1 - eps)
    go_ptr,  # grad_output: (N, D) any strides ("none") or () ("mean", "sum"), any float dtype
    denom_ptr,  # () acc, the "mean" denominator
    grad_ptr,  # (N, C, D) logits' dtype, written; may be the logits' own storage
    # strides
    stride_xn,  # logits, sample
    stride_xc,  # logits, class
    stride_xd,  # logits, position
    stride_yn,  # target, sample
    stride_yc,  # target, class
    stride_yd,  # target, position
    stride_mn,  # mask, sample (0 where the mask broadcasts)
    stride_mc,  # mask, class
    stride_md,  # mask, position
    stride_gn,  # grad, sample
    stride_gc,  # grad, class
    stride_gd,  # grad, position
    stride_gon,  # grad_output, sample ("none")
    stride_god,  # grad_output, position ("none")
    # sizes
    C,  # number of classes
    D,  # positions per sample (> 1)
    # scalars
    softcap: tl.float64,  # cap > 0 (read only with HAS_SOFTCAP)
    # meta-parameters
    REDUCTION: tl.constexpr,  # 0 "none", 1 "mean", 2 "sum"
    HAS_SOFTCAP: tl.constexpr,  # softcap > 0
    BLOCK_C: tl.constexpr,  # classes per tile
    BLOCK_D: tl.constexpr,  # positions per program
):
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    n64, d64, ok, live, lse, coef_p, smooth, keep, scale = _kdim_rows(
        tl.program_id(0), D, stats_ptr, go_ptr, denom_ptr, stride_gon, stride_god, REDUCTION, BLOCK_D, ACC
    )
    lse_t, coef_t, live_t = lse[None, :], coef_p[None, :], live[None, :]
    smooth, keep, scale = smooth[None, :], keep[None, :], scale[None, :]

    x_pos = (x_ptr + n64 * stride_xn + d64 * stride_xd)[None, :]
    y_pos = (y_ptr + n64 * stride_yn + d64 * stride_yd)[None, :]
    g_pos = (grad_ptr + n64 * stride_gn + d64 * stride_gd)[None, :]
    m_tile = None
    if mask_ptr is not None:
        m_tile = (mask_ptr + n64 * stride_mn + d64 * stride_md)[None, :]
    for start in range(0, C, BLOCK_C):
        cols = (start + tl.arange(0, BLOCK_C))[:, None]  # (BLOCK_C, 1)
        in_row = (cols < C) & ok[None, :]
        load_ok = in_row & live_t
        _x, allowed, z, dzdx = _logit_tile(x_pos, m_tile, cols, load_ok, stride_xc, stride_mc, softcap, HAS_SOFTCAP, ACC)
        y = tl.load(y_pos + cols.to(tl.int64) * stride_yc, mask=load_ok, other=0.0).to(ACC)
        w = tl.full([BLOCK_C, 1], 1.0, ACC)
        if weight_ptr is not None:
            w = tl.load(weight_ptr + cols, mask=cols < C, other=0.0).to(ACC)
        y_s = keep * y  # the smoothed target y'_c; a masked class keeps only its own part
        y_s = tl.where(allowed, y_s + smooth, y_s)
        g = tl.exp(z - lse_t) * coef_t - (w * y_s) * scale
        if HAS_SOFTCAP:
            g = tl.where(allowed, g * dzdx, g)
        g = tl.where(live_t, g, 0.0)
        tl.store(g_pos + cols.to(tl.int64) * stride_gc, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def softmax_bwd(grad_out, logits, target, weight, mask, stats, denom, softcap, reduction, grad):
    """Launcher: writes grad (N, C, D) as the op fusedloss::softmax_bwd (csrc/ops.cpp)."""
    n, c, d = logits.shape
    if n * d == 0:
        return
    m_strides = mask.stride() if mask is not None else (0, 0, 0)
    go_strides = grad_out.stride() if reduction == 0 else (0, 0)
    args = (
        logits, target, weight, mask, stats, grad_out, denom, grad,
        *logits.stride(), *target.stride(), *m_strides, *grad.stride(), *go_strides,
        c, d, float(softcap),
    )  # fmt: skip
    prob = target.dtype.is_floating_point
    if use_kdim(logits):
        block_c, block_d, num_warps, _ = kdim_config(d, logits.dtype, heavy=prob or softcap > 0)
        kernel = _softmax_prob_bwd_kdim_kernel if prob else _softmax_bwd_kdim_kernel
        grid, blocks = (n * triton.cdiv(d, block_d),), dict(BLOCK_D=block_d)
    else:
        block_c, num_warps = row_config(c, logits.dtype)
        kernel = _softmax_prob_bwd_kernel if prob else _softmax_bwd_kernel
        grid, blocks = (n * d,), {}
    kernel[grid](*args, REDUCTION=reduction, HAS_SOFTCAP=softcap > 0, BLOCK_C=block_c, num_warps=num_warps, **blocks)
