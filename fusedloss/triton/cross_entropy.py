"""Cross-entropy in Triton: `_ce_fwd_kernel` (class-index targets) and `_ce_prob_fwd_kernel`
(probability targets) -> `ce_fwd` (launcher) -> op `fusedloss::ce_fwd_triton` (__init__.py).

One program per row (one sample's C logits, strided in a canonical (N, C, D) view). Pass 1
reads the row once, BLOCK_C classes at a time, and keeps an online max / sum of exp (the
log-sum-exp) plus the sums label smoothing needs; pass 2, only when a gradient is wanted,
reads the row again and writes d(row loss)/d(logits) once. Memory traffic per row: 2 reads
+ 1 write of C elements with a gradient (PyTorch eager: log_softmax + nll + backward, ~4
reads and 3 writes), 1 read without. Formulas: docs/formulas.md.
"""
import torch
import triton
import triton.language as tl

from fusedloss._ops import acc_dtype
from fusedloss.triton._launch import row_config
from fusedloss.triton._rows import _logit_tile, _scalar, _online_merge, _row_base, _row_kind, _row_lse


@triton.jit(do_not_specialize=["ignore_index"])
def _ce_fwd_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64
    target_ptr,  # (N, D) int64 class indices
    weight_ptr,  # (C,) acc class weights, contiguous; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    grad_ptr,  # (N, C, D) logits' dtype, d(row loss)/d(logits); may alias x_ptr; None without WRITE_GRAD
    loss_ptr,  # (N * D,) acc, row loss
    count_ptr,  # (N * D,) acc, row's share of the "mean" denominator
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
    # sizes
    C,  # number of classes
    D,  # positions per sample (d1 * ... * dK; 1 for (N, C) input)
    # scalars
    ignore_index,  # target value of ignored rows (may be negative)
    label_smoothing: tl.float64,  # eps in [0, 1]
    z_loss: tl.float64,  # z-loss coefficient, 0 = off
    softcap: tl.float64,  # cap > 0, 0 = off
    # meta-parameters
    WRITE_GRAD: tl.constexpr,  # run pass 2 and write the gradient
    BLOCK_C: tl.constexpr,  # classes per tile
):
    row = tl.program_id(0)
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    eps = _scalar(label_smoothing, ACC)
    zl = _scalar(z_loss, ACC)
    cap = _scalar(softcap, ACC)

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
    x_t, allowed_t, z_t, dzdx_t = _logit_tile(x_row, m_row, t, live, stride_xc, stride_mc, cap, ACC)
    w_t = tl.full([], 1.0, ACC)
    if weight_ptr is not None:
        w_t = tl.load(weight_ptr + t, mask=live, other=0.0).to(ACC)

    # ---- pass 1: online log-sum-exp, and the smoothing sums over the allowed set A
    m = tl.full([], float("-inf"), ACC)  # running max of allowed z
    s = tl.zeros([], ACC)  # sum exp(z - m) over allowed z seen so far
    n_a = tl.zeros([], ACC)  # |A|
    w_a = tl.zeros([], ACC)  # W_A = sum_{c in A} w_c
    wz_a = tl.zeros([], ACC)  # sum_{c in A} w_c z_c
    n_cols = tl.where(live, C, 0)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        in_row = cols < C
        _, allowed, z, _ = _logit_tile(x_row, m_row, cols, in_row, stride_xc, stride_mc, cap, ACC)
        m, s = _online_merge(m, s, z)
        if eps > 0:
            w = tl.full([BLOCK_C], 1.0, ACC)
            if weight_ptr is not None:
                w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
            n_a += tl.sum(allowed.to(ACC), 0)
            w_a += tl.sum(tl.where(allowed, w, 0.0), 0)
            wz_a += tl.sum(tl.where(allowed, w * z, 0.0), 0)
    lse = _row_lse(m, s)
    counted = live & (s != 0)  # s == 0: empty row (no allowed class, no NaN)

    # loss = (1 - eps) w_t (lse - z_t) + (eps / |A|) sum_{c in A} w_c (lse - z_c) + zl w_t lse^2
    # A term whose coefficient is 0 is 0 (no 0 * inf at a masked target with eps = 1 or w_t = 0).
    tw = (1.0 - eps) * w_t
    loss = tl.where(tw == 0, 0.0, tw * (lse - z_t))
    inv_a = 1.0 / tl.where(n_a > 0, n_a, 1.0)
    if eps > 0:
        loss += eps * inv_a * (lse * w_a - wz_a)
    if zl != 0:
        loss += zl * w_t * lse * lse
    loss = tl.where(lse != lse, float("nan"), loss)  # NaN row with w_t = 0 stays visible
    loss = tl.where(counted, loss, 0.0)
    loss = tl.where(out_of_range, float("nan"), loss)
    tl.store(loss_ptr + row, loss)
    tl.store(count_ptr + row, tl.where(counted, w_t, 0.0))

    # ---- pass 2: the gradient, written once (zeros for ignored / out-of-range / empty rows)
    if WRITE_GRAD:
        # With p_c = exp(z_c - lse) (0 for masked c):
        #   d(lse)/dz_c = p_c, d(z_t)/dz_c = [c == t], d(lse^2)/dz_c = 2 lse p_c, so
        #   dloss/dz_c = (1 - eps) w_t (p_c - [c == t])
        #              + (eps / |A|) (W_A p_c - w_c [c in A])
        #              + 2 zl w_t lse p_c
        #              = p_c * coef - tw [c == t] - (eps / |A|) w_c [c in A]
        # and dloss/dx_c = dloss/dz_c * dz_c/dx_c (softcap) for allowed c. A masked target
        # keeps -tw with no softcap factor: the class never went through the tanh.
        coef = tw + 2.0 * zl * w_t * lse
        if eps > 0:
            coef += eps * inv_a * w_a
        g_row = grad_ptr + _row_base(row, D, stride_gn, stride_gd)
        n_cols = tl.where(counted, C, 0)  # rows with a zero gradient read no logits
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            in_row = cols < C
            _, allowed, z, dzdx = _logit_tile(x_row, m_row, cols, cols < n_cols, stride_xc, stride_mc, cap, ACC)
            g = tl.exp(z - lse) * coef
            g = tl.where(cols == t, g - tw, g)
            if eps > 0:
                w = tl.full([BLOCK_C], 1.0, ACC)
                if weight_ptr is not None:
                    w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
                g = tl.where(allowed, g - eps * inv_a * w, g)
            g = tl.where(allowed, g * dzdx, g)
            g = tl.where(counted, g, 0.0)
            tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _ce_prob_fwd_kernel(
    # pointers
    x_ptr,  # (N, C, D) logits: float16 / bfloat16 / float32 / float64
    y_ptr,  # (N, C, D) target class probabilities, logits' dtype
    weight_ptr,  # (C,) acc class weights, contiguous; None = all 1
    mask_ptr,  # (N, C, D) bool, True = class allowed; None = all allowed
    grad_ptr,  # (N, C, D) logits' dtype, d(row loss)/d(logits); may alias x_ptr; None without WRITE_GRAD
    loss_ptr,  # (N * D,) acc, row loss
    count_ptr,  # (N * D,) acc, 1 for non-empty rows
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
    # sizes
    C,  # number of classes
    D,  # positions per sample
    # scalars
    label_smoothing: tl.float64,  # eps in [0, 1]
    z_loss: tl.float64,  # z-loss coefficient, 0 = off (unweighted for probability targets)
    softcap: tl.float64,  # cap > 0, 0 = off
    # meta-parameters
    WRITE_GRAD: tl.constexpr,  # run pass 2 and write the gradient
    BLOCK_C: tl.constexpr,  # classes per tile
):
    row = tl.program_id(0)
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    eps = _scalar(label_smoothing, ACC)
    zl = _scalar(z_loss, ACC)
    cap = _scalar(softcap, ACC)
    x_row = x_ptr + _row_base(row, D, stride_xn, stride_xd)
    y_row = y_ptr + _row_base(row, D, stride_yn, stride_yd)
    m_row = None
    if mask_ptr is not None:
        m_row = mask_ptr + _row_base(row, D, stride_mn, stride_md)

    # ---- pass 1. With smoothing, y'_c = (1 - eps) y_c + (eps / |A|) [c in A], so
    #   loss = sum_c w_c y'_c (lse - z_c) + zl lse^2
    #        = (1 - eps) (lse * SY - SYZ) + (eps / |A|) (lse * W_A - WZ_A) + zl lse^2
    # with SY = sum_c w_c y_c and SYZ = sum_c w_c y_c z_c over terms with w_c y_c != 0
    # (a zero-probability class contributes 0 even at z_c = -inf: 0 log 0 = 0).
    m = tl.full([], float("-inf"), ACC)  # running max of allowed z
    s = tl.zeros([], ACC)  # sum exp(z - m) over allowed z seen so far
    sy = tl.zeros([], ACC)  # SY
    syz = tl.zeros([], ACC)  # SYZ (-inf when a masked class has probability > 0)
    n_a = tl.zeros([], ACC)  # |A|
    w_a = tl.zeros([], ACC)  # W_A
    wz_a = tl.zeros([], ACC)  # sum_{c in A} w_c z_c
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        in_row = cols < C
        _, allowed, z, _ = _logit_tile(x_row, m_row, cols, in_row, stride_xc, stride_mc, cap, ACC)
        m, s = _online_merge(m, s, z)
        y = tl.load(y_row + cols.to(tl.int64) * stride_yc, mask=in_row, other=0.0).to(ACC)
        w = tl.full([BLOCK_C], 1.0, ACC)
        if weight_ptr is not None:
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC)
        wy = w * y
        sy += tl.sum(wy, 0)
        syz += tl.sum(tl.where(wy != 0, wy * z, 0.0), 0)
        if eps > 0:
            n_a += tl.sum(allowed.to(ACC), 0)
            w_a += tl.sum(tl.where(allowed, w, 0.0), 0)
            wz_a += tl.sum(tl.where(allowed, w * z, 0.0), 0)
    lse = _row_lse(m, s)
    counted = s != 0  # empty row: no allowed class and no NaN

    keep = 1.0 - eps
    loss = tl.where(keep == 0, 0.0, keep * (lse * sy - syz))
    inv_a = 1.0 / tl.where(n_a > 0, n_a, 1.0)
    if eps > 0:
        loss += eps * inv_a * (lse * w_a - wz_a)
    if zl != 0:
        loss += zl * lse * lse
    loss = tl.where(lse != lse, float("nan"), loss)
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))
    tl.store(count_ptr + row, tl.where(counted, 1.0, 0.0).to(ACC))

    # ---- pass 2. dloss/dz_c = (sum_k w_k y'_k) p_c - w_c y'_c + 2 zl lse p_c
    #                        = coef * p_c - w_c y'_c,  coef = (1 - eps) SY + eps W_A / |A| + 2 zl lse
    # A masked class with y'_c > 0 gets -w_c y'_c (p_c = 0), no softcap factor.
    if WRITE_GRAD:
        coef = keep * sy + 2.0 * zl * lse
        if eps > 0:
            coef += eps * inv_a * w_a
        g_row = grad_ptr + _row_base(row, D, stride_gn, stride_gd)
        n_cols = tl.where(counted, C, 0)  # rows with a zero gradient read no logits
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            in_row = cols < C
            load_ok = cols < n_cols
            _, allowed, z, dzdx = _logit_tile(x_row, m_row, cols, load_ok, stride_xc, stride_mc, cap, ACC)
            y = tl.load(y_row + cols.to(tl.int64) * stride_yc, mask=load_ok, other=0.0).to(ACC)
            w = tl.full([BLOCK_C], 1.0, ACC)
            if weight_ptr is not None:
                w = tl.load(weight_ptr + cols, mask=load_ok, other=0.0).to(ACC)
            y_s = keep * y
            if eps > 0:
                y_s = tl.where(allowed, y_s + eps * inv_a, y_s)
            g = tl.exp(z - lse) * coef - w * y_s
            g = tl.where(allowed, g * dzdx, g)
            g = tl.where(counted, g, 0.0)
            tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def ce_fwd(logits, target, weight, mask, grad, ignore_index, label_smoothing, z_loss, softcap):
    """Launcher. logits (N, C, D); target (N, D) int64 or (N, C, D) probabilities; weight
    (C,) acc or None; mask (N, C, D) bool or None; grad (N, C, D) or None (may alias
    logits). Returns (loss, count), each (N, D) in the accumulation dtype."""
    n, c, d = logits.shape
    acc = acc_dtype(logits.dtype)
    loss = torch.empty((n, d), dtype=acc, device=logits.device)
    count = torch.empty((n, d), dtype=acc, device=logits.device)
    if n * d == 0:
        return loss, count
    block_c, num_warps = row_config(c, logits.dtype)
    m_strides = mask.stride() if mask is not None else (0, 0, 0)
    g_strides = grad.stride() if grad is not None else (0, 0, 0)
    write_grad = grad is not None
    if weight is not None:
        weight = weight.contiguous()
    grid = (n * d,)
    if target.dtype.is_floating_point:
        _ce_prob_fwd_kernel[grid](
            logits, target, weight, mask, grad, loss, count,
            *logits.stride(), *target.stride(), *m_strides, *g_strides,
            c, d,
            float(label_smoothing), float(z_loss), float(softcap),
            WRITE_GRAD=write_grad, BLOCK_C=block_c, num_warps=num_warps,
        )  # fmt: skip
    else:
        _ce_fwd_kernel[grid](
            logits, target, weight, mask, grad, loss, count,
            *logits.stride(), *target.stride(), *m_strides, *g_strides,
            c, d,
            int(ignore_index), float(label_smoothing), float(z_loss), float(softcap),
            WRITE_GRAD=write_grad, BLOCK_C=block_c, num_warps=num_warps,
        )  # fmt: skip
    return loss, count
