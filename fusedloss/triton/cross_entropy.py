"""Cross-entropy in Triton: `_ce_fwd_kernel` (class-index targets) and `_ce_prob_fwd_kernel`
(probability targets) -> `ce_fwd` (launcher) -> op `fusedloss::ce_fwd_triton` (__init__.py).
The backward kernels, shared with the softmax focal loss, are in softmax_bwd.py.

One program per row (one sample's C logits, strided in a canonical (N, C, D) view); K-dim
logits with contiguous positions (NCHW) get the K-dim kernels instead, one program per
block of positions (below). The
forward reads the row once, BLOCK_C classes at a time, keeping an online max / sum of exp
(the log-sum-exp) plus the sums label smoothing and probability targets need, and stores
per row the loss, its share of the "mean" denominator and the four numbers backward needs
(stats = [lse, coef_p, smooth, target_coef], csrc/ops.cpp). The backward reads the row once
more and writes the gradient once. A training step therefore moves 2 reads + 1 write of
N x C for any grad_output (PyTorch eager: ~4 reads + 3 writes), and nothing of size N x C
lives between forward and backward but the logits themselves. Formulas: docs/formulas.md.

Options that are off cost nothing: label smoothing, z-loss and softcap are compile-time
flags (HAS_SMOOTHING, HAS_ZLOSS, HAS_SOFTCAP, set by the launcher from the values), and an
absent weight or mask is a None pointer, which Triton specializes away.
"""
import torch
import triton
import triton.language as tl

from fusedloss._ops import acc_dtype
from fusedloss.triton._launch import kdim_config, row_config, use_kdim
from fusedloss.triton._rows import (
    _class_tile, _fold_lse_rounding, _logit_tile, _merge_groups, _merge_relative, _online_merge, _position_block,
    _position_targets, _reduce_rows, _relative_sum, _row_base, _row_kind, _row_lse, _scalar, _store_stats,
    _store_stats_block,
)


@triton.jit
def _ce_finish(m, s, z_t, w_t, n_a, w_a, wz_a, live, out_of_range, label_smoothing, z_loss,
               HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Class-index rows after the pass: (loss, count, counted, lse, coef_p, smooth,
    target_coef), elementwise, so a row kernel's scalars and a K-dim kernel's vectors of
    positions share it. m, s: the row's online max / sum-exp; z_t, w_t: target logit and
    weight; n_a, w_a, wz_a: the smoothing sums (relative to m); live: neither ignored nor
    out of range."""
    lse = _row_lse(m, s)
    counted = live & (s != 0)  # s == 0: empty row (no allowed class, no NaN)
    log_s = tl.log(s)

    # loss = (1 - eps) w_t (lse - z_t) + (eps / |A|) sum_{c in A} w_c (lse - z_c) + zl w_t lse^2
    # where sum_A w_c (lse - z_c) = W_A log s - sum_A w_c (z_c - m)  (lse = m + log s).
    # A term whose coefficient is 0 is 0 (no 0 * inf at a masked target with eps = 1 or w_t = 0).
    # Gradient (p_c = exp(z_c - lse), 0 for masked c; d(lse)/dz_c = p_c):
    #   dloss/dz_c = (1 - eps) w_t (p_c - [c == t]) + (eps / |A|) (W_A p_c - w_c [c in A])
    #              + 2 zl w_t lse p_c
    #              = coef_p p_c - smooth w_c [c in A] - target_coef [c == t]
    eps = tl.zeros([], ACC)
    if HAS_SMOOTHING:
        eps = _scalar(label_smoothing, ACC)
    tw = (1.0 - eps) * w_t
    loss = tl.where(tw == 0, 0.0, tw * ((m - z_t) + log_s))
    coef_p = tw
    smooth = tl.zeros([], ACC)
    if HAS_SMOOTHING:
        smooth = eps / tl.where(n_a > 0, n_a, 1.0)
        loss += smooth * (w_a * log_s - wz_a)
        coef_p += smooth * w_a
    if HAS_ZLOSS:
        zl = _scalar(z_loss, ACC)
        loss += zl * w_t * lse * lse
        coef_p += 2.0 * zl * w_t * lse
    loss = tl.where(lse != lse, float("nan"), loss)  # NaN row with w_t = 0 stays visible
    loss = tl.where(counted, loss, 0.0)
    loss = tl.where(out_of_range, float("nan"), loss)
    coef_p = _fold_lse_rounding(coef_p, m, s, lse, ACC)
    return loss, tl.where(counted, w_t, 0.0), counted, lse, coef_p, smooth, tw


@triton.jit
def _ce_prob_finish(m, s, sy, syz, n_a, w_a, wz_a, label_smoothing, z_loss,
                    HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Probability-target rows after the pass: (loss, count, counted, lse, coef_p, smooth,
    target_coef = 1 - eps), elementwise as _ce_finish; sy, syz: sum w_c y_c and
    sum w_c y_c (z_c - m)."""
    lse = _row_lse(m, s)
    counted = s != 0  # empty row: no allowed class and no NaN
    log_s = tl.log(s)

    # Gradient: dloss/dz_c = (sum_k w_k y'_k + 2 zl lse) p_c - w_c y'_c
    #                      = coef_p p_c - w_c ((1 - eps) y_c + smooth [c in A])
    # (a masked class with y_c > 0 gets -w_c (1 - eps) y_c, p_c = 0)
    keep = tl.full([], 1.0, ACC)
    if HAS_SMOOTHING:
        keep = 1.0 - _scalar(label_smoothing, ACC)
    loss = tl.where(keep == 0, 0.0, keep * (log_s * sy - syz))
    coef_p = keep * sy
    smooth = tl.zeros([], ACC)
    if HAS_SMOOTHING:
        smooth = (1.0 - keep) / tl.where(n_a > 0, n_a, 1.0)
        loss += smooth * (log_s * w_a - wz_a)
        coef_p += smooth * w_a
    if HAS_ZLOSS:
        zl = _scalar(z_loss, ACC)
        loss += zl * lse * lse
        coef_p += 2.0 * zl * lse
    loss = tl.where(lse != lse, float("nan"), loss)
    coef_p = _fold_lse_rounding(coef_p, m, s, lse, ACC)
    return tl.where(counted, loss, 0.0), tl.where(counted, 1.0, 0.0).to(ACC), counted, lse, coef_p, smooth, keep


@triton.jit(do_not_specialize=["ignore_index"])
def _ce_fwd_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64
    target_ptr,  # (N, D) int64 class indices
    weight_ptr,  # (C,) acc class weights, contiguous; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    loss_ptr,  # (N * D,) row loss: the output dtype (reduction "none") or acc (reduced later)
    count_ptr,  # (N * D,) acc, row's share of the "mean" denominator
    stats_ptr,  # (N * D, 4) acc: lse, coef_p, smooth, target_coef
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
    D,  # positions per sample (d1 * ... * dK; 1 for (N, C) input)
    # scalars
    ignore_index,  # target value of ignored rows (may be negative)
    label_smoothing: tl.float64,  # eps in (0, 1] (read only with HAS_SMOOTHING)
    z_loss: tl.float64,  # z-loss coefficient (read only with HAS_ZLOSS)
    softcap: tl.float64,  # cap > 0 (read only with HAS_SOFTCAP)
    # meta-parameters
    HAS_SMOOTHING: tl.constexpr,  # label_smoothing > 0
    HAS_ZLOSS: tl.constexpr,  # z_loss != 0
    HAS_SOFTCAP: tl.constexpr,  # softcap > 0
    BLOCK_C: tl.constexpr,  # classes per tile
):
    row = tl.program_id(0)
    ACC: tl.constexpr = count_ptr.dtype.element_ty

    t = tl.load(target_ptr + _row_base(row, D, stride_tn, stride_td))
    ignored, out_of_range = _row_kind(t, ignore_index, C)
    # ignored and out-of-range rows never read their logits (no traffic, no OOB access,
    # and NaN there cannot leak into anything)
    live = (ignored | out_of_range) == 0
    t = tl.where(live, t, 0)
    x_row = x_ptr + _row_base(row, D, stride_xn, stride_xd)
    m_row = None
    if mask_ptr is not None:
        m_row = mask_ptr + _row_base(row, D, stride_mn, stride_md)

    # target logit (z_t = -inf when the target class is masked) and weight
    _, _, z_t, _ = _logit_tile(x_row, m_row, t, live, stride_xc, stride_mc, softcap, HAS_SOFTCAP, ACC)
    w_t = tl.full([], 1.0, ACC)
    if weight_ptr is not None:
        w_t = tl.load(weight_ptr + t, mask=live, other=0.0).to(ACC)

    # ---- one pass: online log-sum-exp, and the smoothing sums over the allowed set A,
    # taken relative to the running max (see _relative_sum)
    m = tl.full([], float("-inf"), ACC)  # running max of allowed z
    s = tl.zeros([], ACC)  # sum exp(z - m) over allowed z seen so far
    n_a = tl.zeros([], ACC)  # |A|
    w_a = tl.zeros([], ACC)  # W_A = sum_{c in A} w_c
    wz_a = tl.zeros([], ACC)  # sum_{c in A} w_c (z_c - m)
    n_cols = tl.where(live, C, 0)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        in_row = cols < C
        _x, allowed, z, _dzdx = _logit_tile(x_row, m_row, cols, in_row, stride_xc, stride_mc, softcap, HAS_SOFTCAP, ACC)
        m_old = m
        m, s = _online_merge(m, s, z)
        if HAS_SMOOTHING:
            w = tl.full([BLOCK_C], 1.0, ACC)
            if weight_ptr is not None:
                w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
            w = tl.where(allowed, w, 0.0)
            n_a += tl.sum(allowed.to(ACC), 0)
            wz_a = _relative_sum(wz_a, w_a, m_old, m, w, z)
            w_a += tl.sum(w, 0)
    loss, count, counted, lse, coef_p, smooth, tw = _ce_finish(
        m, s, z_t, w_t, n_a, w_a, wz_a, live, out_of_range, label_smoothing, z_loss, HAS_SMOOTHING, HAS_ZLOSS, ACC
    )
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    tl.store(count_ptr + row, count)
    _store_stats(stats_ptr, row, counted, lse, coef_p, smooth, tw)


@triton.jit
def _ce_prob_fwd_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64
    y_ptr,  # (N, C, D) target class probabilities, logits' dtype
    weight_ptr,  # (C,) acc class weights, contiguous; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    loss_ptr,  # (N * D,) row loss: the output dtype (reduction "none") or acc (reduced later)
    count_ptr,  # (N * D,) acc, 1 for non-empty rows
    stats_ptr,  # (N * D, 4) acc: lse, coef_p, smooth, target_coef
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
    # sizes
    C,  # number of classes
    D,  # positions per sample
    # scalars
    label_smoothing: tl.float64,  # eps in (0, 1] (read only with HAS_SMOOTHING)
    z_loss: tl.float64,  # z-loss coefficient, unweighted for probability targets (HAS_ZLOSS)
    softcap: tl.float64,  # cap > 0 (read only with HAS_SOFTCAP)
    # meta-parameters
    HAS_SMOOTHING: tl.constexpr,  # label_smoothing > 0
    HAS_ZLOSS: tl.constexpr,  # z_loss != 0
    HAS_SOFTCAP: tl.constexpr,  # softcap > 0
    BLOCK_C: tl.constexpr,  # classes per tile
):
    row = tl.program_id(0)
    ACC: tl.constexpr = count_ptr.dtype.element_ty
    x_row = x_ptr + _row_base(row, D, stride_xn, stride_xd)
    y_row = y_ptr + _row_base(row, D, stride_yn, stride_yd)
    m_row = None
    if mask_ptr is not None:
        m_row = mask_ptr + _row_base(row, D, stride_mn, stride_md)

    # ---- one pass. With smoothing, y'_c = (1 - eps) y_c + (eps / |A|) [c in A], so
    #   loss = sum_c w_c y'_c (lse - z_c) + zl lse^2
    #        = (1 - eps) (SY log s - SYZ) + (eps / |A|) (W_A log s - WZ_A) + zl lse^2
    # with SY = sum_c w_c y_c and SYZ = sum_c w_c y_c (z_c - m) over terms with w_c y_c != 0
    # (a zero-probability class contributes 0 even at z_c = -inf: 0 log 0 = 0), both sums
    # relative to the row max m (a confident row's loss is a small difference of large
    # terms when summed raw).
    m = tl.full([], float("-inf"), ACC)  # running max of allowed z
    s = tl.zeros([], ACC)  # sum exp(z - m) over allowed z seen so far
    sy = tl.zeros([], ACC)  # SY
    syz = tl.zeros([], ACC)  # SYZ relative to m (-inf when a masked class has probability > 0)
    n_a = tl.zeros([], ACC)  # |A|
    w_a = tl.zeros([], ACC)  # W_A
    wz_a = tl.zeros([], ACC)  # sum_{c in A} w_c (z_c - m)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        in_row = cols < C
        _x, allowed, z, _dzdx = _logit_tile(x_row, m_row, cols, in_row, stride_xc, stride_mc, softcap, HAS_SOFTCAP, ACC)
        m_old = m
        m, s = _online_merge(m, s, z)
        y = tl.load(y_row + cols.to(tl.int64) * stride_yc, mask=in_row, other=0.0).to(ACC)
        w = tl.full([BLOCK_C], 1.0, ACC)
        if weight_ptr is not None:
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
        wy = w * y
        syz = _relative_sum(syz, sy, m_old, m, wy, z)
        sy += tl.sum(wy, 0)
        if HAS_SMOOTHING:
            wa = tl.where(allowed, w, 0.0)
            n_a += tl.sum(allowed.to(ACC), 0)
            wz_a = _relative_sum(wz_a, w_a, m_old, m, wa, z)
            w_a += tl.sum(wa, 0)
    loss, count, counted, lse, coef_p, smooth, keep = _ce_prob_finish(
        m, s, sy, syz, n_a, w_a, wz_a, label_smoothing, z_loss, HAS_SMOOTHING, HAS_ZLOSS, ACC
    )
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    tl.store(count_ptr + row, count)
    _store_stats(stats_ptr, row, counted, lse, coef_p, smooth, keep)


# ----------------------------------------------------------------------------- K-dim kernels
# (N, C, d1..dK) logits with contiguous positions (NCHW): a program holds BLOCK_D consecutive
# positions (rows) of one sample across its lanes and walks the classes BLOCK_C at a time,
# so every class is one contiguous load of BLOCK_D positions. The classes of a step are
# split into GROUPS class groups (_class_tile: a (BLOCK_C // GROUPS, GROUPS, BLOCK_D) tile),
# each with its running max / sum-exp and side sums per position (the row kernels'
# _online_merge / _relative_sum, reducing axis 0 inside the thread); the groups are merged
# once after the pass (_merge_groups / _merge_relative), and the per-row finish is the row
# kernels' (_ce_finish / _ce_prob_finish). Same traffic as the row kernels: the logits once,
# one target-logit gather per row, per-row outputs.
@triton.jit(do_not_specialize=["ignore_index"])
def _ce_fwd_kdim_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64; position stride 1
    target_ptr,  # (N, D) int64 class indices
    weight_ptr,  # (C,) acc class weights, contiguous; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    loss_ptr,  # (N * D,) row loss: the output dtype (reduction "none") or acc (reduced later)
    count_ptr,  # (N * D,) acc, row's share of the "mean" denominator
    stats_ptr,  # (N * D, 4) acc: lse, coef_p, smooth, target_coef
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
    D,  # positions per sample (d1 * ... * dK > 1)
    # scalars
    ignore_index,  # target value of ignored rows (may be negative)
    label_smoothing: tl.float64,  # eps in (0, 1] (read only with HAS_SMOOTHING)
    z_loss: tl.float64,  # z-loss coefficient (read only with HAS_ZLOSS)
    softcap: tl.float64,  # cap > 0 (read only with HAS_SOFTCAP)
    # meta-parameters
    HAS_SMOOTHING: tl.constexpr,  # label_smoothing > 0
    HAS_ZLOSS: tl.constexpr,  # z_loss != 0
    HAS_SOFTCAP: tl.constexpr,  # softcap > 0
    BLOCK_C: tl.constexpr,  # classes per step (a multiple of GROUPS)
    BLOCK_D: tl.constexpr,  # positions per program
    GROUPS: tl.constexpr,  # class groups (_class_tile)
):
    ACC: tl.constexpr = count_ptr.dtype.element_ty
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

    # ---- one pass over the classes, per position and class group: online log-sum-exp and
    # the smoothing sums; then the groups merged
    m = tl.full([GROUPS, BLOCK_D], float("-inf"), ACC)
    s = tl.zeros([GROUPS, BLOCK_D], ACC)
    n_a = tl.zeros([GROUPS, BLOCK_D], ACC)
    w_a = tl.zeros([GROUPS, BLOCK_D], ACC)
    wz_a = tl.zeros([GROUPS, BLOCK_D], ACC)
    x_tile = x_pos[None, None, :]
    live_tile = live[None, None, :]
    for start in range(0, C, BLOCK_C):
        cols = _class_tile(start, BLOCK_C, GROUPS)  # (BLOCK_C // GROUPS, GROUPS, 1)
        in_row = cols < C
        _x, allowed, z, _dzdx = _logit_tile(x_tile, m_tile, cols, in_row & live_tile, stride_xc, stride_mc, softcap,
                                            HAS_SOFTCAP, ACC)  # fmt: skip
        m_old = m
        m, s = _online_merge(m, s, z)
        if HAS_SMOOTHING:
            w = tl.where(in_row, 1.0, 0.0).to(ACC)
            if weight_ptr is not None:
                w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
            w = tl.where(allowed, w, 0.0)
            n_a += tl.sum(allowed.to(ACC), 0)
            wz_a = _relative_sum(wz_a, w_a, m_old, m, w, z)
            w_a += tl.sum(w, 0)
    m_all, s = _merge_groups(m, s)
    if HAS_SMOOTHING:
        wz_a = _merge_relative(wz_a, w_a, m, m_all)
        w_a = tl.sum(w_a, 0)
        n_a = tl.sum(n_a, 0)
    m = m_all

    # the target's logit (z_t = -inf when the target class is masked) and weight, after the
    # pass: nothing of them is live across the loop
    _, _, z_t, _ = _logit_tile(x_pos, m_pos, t, live, stride_xc, stride_mc, softcap, HAS_SOFTCAP, ACC)
    w_t = tl.full([BLOCK_D], 1.0, ACC)
    if weight_ptr is not None:
        w_t = tl.load(weight_ptr + t, mask=live, other=0.0).to(ACC)

    loss, count, counted, lse, coef_p, smooth, tw = _ce_finish(
        m, s, z_t, w_t, n_a, w_a, wz_a, live, out_of_range, label_smoothing, z_loss, HAS_SMOOTHING, HAS_ZLOSS, ACC
    )
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=ok)
    tl.store(count_ptr + rows, count, mask=ok)
    _store_stats_block(stats_ptr, rows, ok, counted, lse, coef_p, smooth, tw)


@triton.jit
def _ce_prob_fwd_kdim_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64; position stride 1
    y_ptr,  # (N, C, D) target class probabilities, logits' dtype
    weight_ptr,  # (C,) acc class weights, contiguous; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    loss_ptr,  # (N * D,) row loss: the output dtype (reduction "none") or acc (reduced later)
    count_ptr,  # (N * D,) acc, 1 for non-empty rows
    stats_ptr,  # (N * D, 4) acc: lse, coef_p, smooth, target_coef
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
    # sizes
    C,  # number of classes
    D,  # positions per sample (> 1)
    # scalars
    label_smoothing: tl.float64,  # eps in (0, 1] (read only with HAS_SMOOTHING)
    z_loss: tl.float64,  # z-loss coefficient, unweighted for probability targets (HAS_ZLOSS)
    softcap: tl.float64,  # cap > 0 (read only with HAS_SOFTCAP)
    # meta-parameters
    HAS_SMOOTHING: tl.constexpr,  # label_smoothing > 0
    HAS_ZLOSS: tl.constexpr,  # z_loss != 0
    HAS_SOFTCAP: tl.constexpr,  # softcap > 0
    BLOCK_C: tl.constexpr,  # classes per step (a multiple of GROUPS)
    BLOCK_D: tl.constexpr,  # positions per program
    GROUPS: tl.constexpr,  # class groups (_class_tile)
):
    ACC: tl.constexpr = count_ptr.dtype.element_ty
    n, d, ok = _position_block(tl.program_id(0), D, BLOCK_D)
    n64, d64 = n.to(tl.int64), d.to(tl.int64)
    rows = n64 * D + d64
    x_tile = (x_ptr + n64 * stride_xn + d64 * stride_xd)[None, None, :]
    y_tile = (y_ptr + n64 * stride_yn + d64 * stride_yd)[None, None, :]
    m_tile = None
    if mask_ptr is not None:
        m_tile = (mask_ptr + n64 * stride_mn + d64 * stride_md)[None, None, :]

    # ---- one pass (the sums of _ce_prob_fwd_kernel, per position and class group), then
    # the groups merged
    m = tl.full([GROUPS, BLOCK_D], float("-inf"), ACC)
    s = tl.zeros([GROUPS, BLOCK_D], ACC)
    sy = tl.zeros([GROUPS, BLOCK_D], ACC)
    syz = tl.zeros([GROUPS, BLOCK_D], ACC)
    n_a = tl.zeros([GROUPS, BLOCK_D], ACC)
    w_a = tl.zeros([GROUPS, BLOCK_D], ACC)
    wz_a = tl.zeros([GROUPS, BLOCK_D], ACC)
    ok_tile = ok[None, None, :]
    for start in range(0, C, BLOCK_C):
        cols = _class_tile(start, BLOCK_C, GROUPS)  # (BLOCK_C // GROUPS, GROUPS, 1)
        in_row = cols < C
        load_ok = in_row & ok_tile
        _x, allowed, z, _dzdx = _logit_tile(x_tile, m_tile, cols, load_ok, stride_xc, stride_mc, softcap, HAS_SOFTCAP, ACC)
        m_old = m
        m, s = _online_merge(m, s, z)
        y = tl.load(y_tile + cols.to(tl.int64) * stride_yc, mask=load_ok, other=0.0).to(ACC)
        w = tl.where(in_row, 1.0, 0.0).to(ACC)
        if weight_ptr is not None:
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
        wy = w * y
        syz = _relative_sum(syz, sy, m_old, m, wy, z)
        sy += tl.sum(wy, 0)
        if HAS_SMOOTHING:
            wa = tl.where(allowed, w, 0.0)
            n_a += tl.sum(allowed.to(ACC), 0)
            wz_a = _relative_sum(wz_a, w_a, m_old, m, wa, z)
            w_a += tl.sum(wa, 0)
    m_all, s = _merge_groups(m, s)
    syz = _merge_relative(syz, sy, m, m_all)
    sy = tl.sum(sy, 0)
    if HAS_SMOOTHING:
        wz_a = _merge_relative(wz_a, w_a, m, m_all)
        w_a = tl.sum(w_a, 0)
        n_a = tl.sum(n_a, 0)
    m = m_all

    loss, count, counted, lse, coef_p, smooth, keep = _ce_prob_finish(
        m, s, sy, syz, n_a, w_a, wz_a, label_smoothing, z_loss, HAS_SMOOTHING, HAS_ZLOSS, ACC
    )
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=ok)
    tl.store(count_ptr + rows, count, mask=ok)
    _store_stats_block(stats_ptr, rows, ok, counted, lse, coef_p, smooth, keep)


def ce_fwd(logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap, reduction, out_dtype):
    """Launcher. logits (N, C, D); target (N, D) int64 or (N, C, D) probabilities; weight
    (C,) acc or None; mask (N, C, D) bool or None. Returns (out, denom, stats) as the op
    fusedloss::ce_fwd (csrc/ops.cpp): two launches ("none": one)."""
    n, c, d = logits.shape
    acc = acc_dtype(logits.dtype)
    dev = logits.device
    loss = torch.empty((n, d), dtype=out_dtype if reduction == 0 else acc, device=dev)
    count = torch.empty((n, d), dtype=acc, device=dev)
    stats = torch.empty((n, d, 4), dtype=acc, device=dev)
    if n * d > 0:
        m_strides = mask.stride() if mask is not None else (0, 0, 0)
        prob = target.dtype.is_floating_point
        flags = dict(HAS_SMOOTHING=label_smoothing > 0, HAS_ZLOSS=z_loss != 0, HAS_SOFTCAP=softcap > 0)
        if use_kdim(logits):
            heavy = prob or label_smoothing > 0 or softcap > 0
            block_c, block_d, num_warps, groups = kdim_config(d, logits.dtype, heavy=heavy)
            kernel = _ce_prob_fwd_kdim_kernel if prob else _ce_fwd_kdim_kernel
            grid = (n * triton.cdiv(d, block_d),)
            flags.update(BLOCK_C=block_c, BLOCK_D=block_d, GROUPS=groups, num_warps=num_warps)
        else:
            block_c, num_warps = row_config(c, logits.dtype)
            kernel = _ce_prob_fwd_kernel if prob else _ce_fwd_kernel
            grid = (n * d,)
            flags.update(BLOCK_C=block_c, num_warps=num_warps)
        scalars = (float(label_smoothing), float(z_loss), float(softcap))
        kernel[grid](
            logits, target, weight, mask, loss, count, stats,
            *logits.stride(), *target.stride(), *m_strides,
            c, d,
            *(scalars if prob else (int(ignore_index),) + scalars),
            **flags,
        )  # fmt: skip
    out, denom = _reduce_rows(loss, count, reduction, out_dtype)
    return out, denom, stats
