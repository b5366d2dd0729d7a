"""Softmax focal loss in Triton: `_focal_fwd_kernel` -> `focal_fwd` (launcher) -> op
`fusedloss::focal_fwd_triton` (__init__.py). Backward: softmax_bwd.py, as cross-entropy.

Same row machinery as cross-entropy (fusedloss/triton/_rows.py): one program per row (per
block of positions for NCHW K-dim logits), one online log-sum-exp pass; the per-row stats carry the focal factor G to the backward.
Row loss alpha_t * (1 - p_t)^gamma * -log(p_t); formulas in docs/formulas.md.
"""
import torch
import triton
import triton.language as tl

from fusedloss._ops import acc_dtype
from fusedloss.triton._launch import kdim_config, row_config, use_kdim
from fusedloss.triton._rows import (
    _class_tile, _expm1, _fold_lse_rounding, _logit_tile, _merge_groups, _online_merge, _position_targets, _pow,
    _reduce_rows, _row_base, _row_kind, _row_lse, _scalar, _store_stats, _store_stats_block,
)


@triton.jit
def _focal_finish(m, s, z_t, alpha_t, live, out_of_range, g_pow, ACC: tl.constexpr):
    """Rows after the pass: (loss, count, counted, lse, coef_p, G), elementwise (a row
    kernel's scalars or a K-dim kernel's vectors of positions)."""
    lse = _row_lse(m, s)
    counted = live & (s != 0)  # s == 0: empty row (no allowed class, no NaN)

    # logp = log p_t <= 0 (clamped: rounding may put z_t a hair above lse);
    # q = 1 - p_t through expm1, exact where p_t -> 1 and q is tiny.
    logp = tl.minimum(z_t - lse, 0.0)
    logp = tl.where(lse != lse, lse, logp)  # NaN row stays NaN (minimum may drop NaN)
    p = tl.exp(logp)
    q = -_expm1(logp)
    qg = _pow(q, g_pow)
    loss = tl.where(alpha_t == 0, 0.0, -alpha_t * qg * logp)  # masked target: +inf
    loss = tl.where(lse != lse, float("nan"), loss)  # NaN row with alpha_t = 0 stays visible
    loss = tl.where(counted, loss, 0.0)
    loss = tl.where(out_of_range, float("nan"), loss)

    # Gradient. With dp/dz_c = p (delta_ct - p_c):
    #   dloss/dp   = alpha_t (gamma q^(gamma-1) logp - q^gamma / p)
    #   dloss/dz_c = dloss/dp * p (delta_ct - p_c) = G (p_c - delta_ct),
    #   G = alpha_t q^gamma (1 - gamma p r),  r = logp / q
    # r -> -1 as p -> 1 (q -> 0), so G stays finite for 0 < gamma < 1 where q^(gamma-1)
    # alone overflows. Masked target: p = 0, G = alpha_t (r would be -inf / 1: set 0).
    # In the stats' terms: coef_p = target_coef = G, smooth = 0.
    r = tl.where(q == 0, -1.0, tl.where(p == 0, 0.0, logp / q))
    G = alpha_t * qg * (1.0 - g_pow * p * r)
    count = tl.where(counted, 1.0, 0.0).to(ACC)
    return loss, count, counted, lse, _fold_lse_rounding(G, m, s, lse, ACC), G


@triton.jit(do_not_specialize=["ignore_index"])
def _focal_fwd_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64
    target_ptr,  # (N, D) int64 class indices
    alpha_ptr,  # (C,) acc per-class alpha, contiguous; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    loss_ptr,  # (N * D,) row loss: the output dtype (reduction "none") or acc (reduced later)
    count_ptr,  # (N * D,) acc, 1 for counted rows
    stats_ptr,  # (N * D, 4) acc: lse, G, 0, G
    # strides
    stride_xn,  # logits, sample
    stride_xc,  # logits, class
    stride_xd,  # logits, position
    stride_tn,  # target, sample
    stride_td,  # target, position
    stride_mn,  # mask, sample (0 where the mask broadcasts)
    stride_mc,  # mask, class
    stride_md,  # mask, position
    # sizes
    C,  # number of classes
    D,  # positions per sample
    # scalars
    ignore_index,  # target value of ignored rows (may be negative)
    gamma: tl.float64,  # focusing parameter >= 0
    # meta-parameters
    BLOCK_C: tl.constexpr,  # classes per tile
):
    row = tl.program_id(0)
    ACC: tl.constexpr = count_ptr.dtype.element_ty
    g_pow = _scalar(gamma, ACC)

    t = tl.load(target_ptr + _row_base(row, D, stride_tn, stride_td))
    ignored, out_of_range = _row_kind(t, ignore_index, C)
    live = (ignored | out_of_range) == 0  # other rows never read their logits
    t = tl.where(live, t, 0)
    x_row = x_ptr + _row_base(row, D, stride_xn, stride_xd)
    m_row = None
    if mask_ptr is not None:
        m_row = mask_ptr + _row_base(row, D, stride_mn, stride_md)
    _, _, z_t, _ = _logit_tile(x_row, m_row, t, live, stride_xc, stride_mc, 0.0, False, ACC)
    alpha_t = tl.full([], 1.0, ACC)
    if alpha_ptr is not None:
        alpha_t = tl.load(alpha_ptr + t, mask=live, other=0.0).to(ACC)

    # ---- one pass: online log-sum-exp
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    n_cols = tl.where(live, C, 0)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        _x, _allowed, z, _dzdx = _logit_tile(x_row, m_row, cols, cols < C, stride_xc, stride_mc, 0.0, False, ACC)
        m, s = _online_merge(m, s, z)
    loss, count, counted, lse, coef_p, G = _focal_finish(m, s, z_t, alpha_t, live, out_of_range, g_pow, ACC)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    tl.store(count_ptr + row, count)
    _store_stats(stats_ptr, row, counted, lse, coef_p, tl.zeros([], ACC), G)


@triton.jit(do_not_specialize=["ignore_index"])
def _focal_fwd_kdim_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64; position stride 1
    target_ptr,  # (N, D) int64 class indices
    alpha_ptr,  # (C,) acc per-class alpha, contiguous; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    loss_ptr,  # (N * D,) row loss: the output dtype (reduction "none") or acc (reduced later)
    count_ptr,  # (N * D,) acc, 1 for counted rows
    stats_ptr,  # (N * D, 4) acc: lse, G, 0, G
    # strides
    stride_xn,  # logits, sample
    stride_xc,  # logits, class
    stride_xd,  # logits, position
    stride_tn,  # target, sample
    stride_td,  # target, position
    stride_mn,  # mask, sample (0 where the mask broadcasts)
    stride_mc,  # mask, class
    stride_md,  # mask, position
    # sizes
    C,  # number of classes
    D,  # positions per sample (> 1)
    # scalars
    ignore_index,  # target value of ignored rows (may be negative)
    gamma: tl.float64,  # focusing parameter >= 0
    # meta-parameters
    BLOCK_C: tl.constexpr,  # classes per step (a multiple of GROUPS)
    BLOCK_D: tl.constexpr,  # positions per program
    GROUPS: tl.constexpr,  # class groups (_class_tile)
):
    """The K-dim form (cross_entropy.py, K-dim kernels): BLOCK_D consecutive positions of
    one sample across the lanes, the classes walked BLOCK_C at a time in GROUPS groups."""
    ACC: tl.constexpr = count_ptr.dtype.element_ty
    g_pow = _scalar(gamma, ACC)
    # (BLOCK_D,) positions; rows that are not live never read their logits
    n64, d64, ok, rows, t, live, out_of_range = _position_targets(
        D, C, target_ptr, stride_tn, stride_td, ignore_index, BLOCK_D
    )
    x_pos = x_ptr + n64 * stride_xn + d64 * stride_xd
    m_pos = None
    m_tile = None
    if mask_ptr is not None:
        m_pos = mask_ptr + n64 * stride_mn + d64 * stride_md
        m_tile = m_pos[None, None, :]

    m = tl.full([GROUPS, BLOCK_D], float("-inf"), ACC)
    s = tl.zeros([GROUPS, BLOCK_D], ACC)
    x_tile = x_pos[None, None, :]
    live_tile = live[None, None, :]
    for start in range(0, C, BLOCK_C):
        cols = _class_tile(start, BLOCK_C, GROUPS)
        _x, _allowed, z, _dzdx = _logit_tile(x_tile, m_tile, cols, (cols < C) & live_tile, stride_xc, stride_mc, 0.0, False,
                                             ACC)  # fmt: skip
        m, s = _online_merge(m, s, z)
    m, s = _merge_groups(m, s)

    # the target's logit and alpha after the pass: nothing of them is live across the loop
    _, _, z_t, _ = _logit_tile(x_pos, m_pos, t, live, stride_xc, stride_mc, 0.0, False, ACC)
    alpha_t = tl.full([BLOCK_D], 1.0, ACC)
    if alpha_ptr is not None:
        alpha_t = tl.load(alpha_ptr + t, mask=live, other=0.0).to(ACC)

    loss, count, counted, lse, coef_p, G = _focal_finish(m, s, z_t, alpha_t, live, out_of_range, g_pow, ACC)
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=ok)
    tl.store(count_ptr + rows, count, mask=ok)
    _store_stats_block(stats_ptr, rows, ok, counted, lse, coef_p, 0.0, G)


def focal_fwd(logits, target, alpha, mask, ignore_index, gamma, reduction, out_dtype):
    """Launcher. logits (N, C, D); target (N, D) int64; alpha (C,) acc or None; mask
    (N, C, D) bool or None. Returns (out, denom, stats) as the op fusedloss::focal_fwd."""
    n, c, d = logits.shape
    acc = acc_dtype(logits.dtype)
    dev = logits.device
    loss = torch.empty((n, d), dtype=out_dtype if reduction == 0 else acc, device=dev)
    count = torch.empty((n, d), dtype=acc, device=dev)
    stats = torch.empty((n, d, 4), dtype=acc, device=dev)
    if n * d > 0:
        m_strides = mask.stride() if mask is not None else (0, 0, 0)
        if use_kdim(logits):
            block_c, block_d, num_warps, groups = kdim_config(d, logits.dtype)
            kernel, grid = _focal_fwd_kdim_kernel, (n * triton.cdiv(d, block_d),)
            blocks = dict(BLOCK_D=block_d, GROUPS=groups)
        else:
            block_c, num_warps = row_config(c, logits.dtype)
            kernel, grid, blocks = _focal_fwd_kernel, (n * d,), {}
        kernel[grid](
            logits, target, alpha, mask, loss, count, stats,
            *logits.stride(), *target.stride(), *m_strides,
            c, d,
            int(ignore_index), float(gamma),
            BLOCK_C=block_c, num_warps=num_warps, **blocks,
        )  # fmt: skip
    out, denom = _reduce_rows(loss, count, reduction, out_dtype)
    return out, denom, stats
