"""Cross-entropy in Triton: `_ce_fwd_kernel` (class-index targets) and `_ce_prob_fwd_kernel`
(probability targets) -> `ce_fwd` (launcher) -> op `fusedloss::ce_fwd_triton` (__init__.py).
The backward kernels, shared with the softmax focal loss, are in softmax_bwd.py.

One program per row (one sample's C logits, strided in a canonical (N, C, D) view). The
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
from fusedloss.triton._launch import row_config
from fusedloss.triton._rows import (
    _fold_lse_rounding, _logit_tile, _online_merge, _reduce_rows, _relative_sum, _row_base, _row_kind, _row_lse,
    _scalar, _store_stats,
)


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
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    tl.store(count_ptr + row, tl.where(counted, w_t, 0.0))
    coef_p = _fold_lse_rounding(coef_p, m, s, lse, ACC)
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
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0).to(loss_ptr.dtype.element_ty))
    tl.store(count_ptr + row, tl.where(counted, 1.0, 0.0).to(ACC))
    coef_p = _fold_lse_rounding(coef_p, m, s, lse, ACC)
    _store_stats(stats_ptr, row, counted, lse, coef_p, smooth, keep)


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
        block_c, num_warps = row_config(c, logits.dtype)
        m_strides = mask.stride() if mask is not None else (0, 0, 0)
        flags = dict(
            HAS_SMOOTHING=label_smoothing > 0, HAS_ZLOSS=z_loss != 0, HAS_SOFTCAP=softcap > 0,
            BLOCK_C=block_c, num_warps=num_warps,
        )  # fmt: skip
        if target.dtype.is_floating_point:
            _ce_prob_fwd_kernel[(n * d,)](
                logits, target, weight, mask, loss, count, stats,
                *logits.stride(), *target.stride(), *m_strides,
                c, d,
                float(label_smoothing), float(z_loss), float(softcap),
                **flags,
            )  # fmt: skip
        else:
            _ce_fwd_kernel[(n * d,)](
                logits, target, weight, mask, loss, count, stats,
                *logits.stride(), *target.stride(), *m_strides,
                c, d,
                int(ignore_index), float(label_smoothing), float(z_loss), float(softcap),
                **flags,
            )  # fmt: skip
    out, denom = _reduce_rows(loss, count, reduction, out_dtype)
    return out, denom, stats
