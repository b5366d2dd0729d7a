"""Pure-PyTorch reference of the contract (the `torch` backend). See docs/formulas.md.

This module is the spec in code: the same ops as csrc/ops.cpp, with the same inputs and
outputs (the forward's per-row stats included, so backward is the same recomputation the
kernels do), written for readability rather than speed (no fusion, several N x C
temporaries), but vectorized -- no Python loop over rows. Everything is computed in the
accumulation dtype (float64 for float64 input, float32 otherwise).

Two hazards shape the code:
  * `0 * inf` is NaN. Every product whose coefficient may be 0 while the other factor may
    be infinite goes through `_times`, which makes the term exactly 0 (formulas: "a term
    whose coefficient is 0 is 0").
  * `torch.where` picks values, but the discarded branch is still computed; the rows it
    discards (ignored, empty, out-of-range) may hold NaN there, and that is fine because
    nothing downstream reads the discarded branch (no autograd runs through this code).
"""
import torch

from fusedloss._ops import acc_dtype

__all__ = ["ce_fwd", "focal_fwd", "softmax_bwd", "binary_fwd", "binary_bwd", "scale_grad"]


def _times(coef, value):
    """coef * value, exactly 0 where coef == 0 (even where value is +-inf or NaN)."""
    return torch.where(coef == 0, torch.zeros_like(value), coef * value)


def _softmax_parts(x, mask, softcap):
    """Shared softmax bookkeeping for one (N, C, D) batch of rows, along dim 1.

    Returns (allowed, z, lse, p, dz_dx, has_nan):
      allowed (N, C, D) bool   class allowed: mask True there and logit != -inf
      z       (N, C, D)        softcapped logits, -inf at masked classes
      lse     (N, 1, D)        logsumexp over allowed classes (-inf for empty rows)
      p       (N, C, D)        softmax over allowed classes, 0 at masked classes
      dz_dx   (N, C, D)        tanh derivative of the softcap at allowed classes, 1 elsewhere
                               (masked classes take no softcap factor)
      has_nan (N, 1, D) bool   some allowed logit is NaN (the row is then not empty)
    """
    allowed = x != float("-inf")
    if mask is not None:
        allowed = allowed & mask
    if softcap > 0:
        th = torch.tanh(x / softcap)
        z = softcap * th
        dz_dx = torch.where(allowed, 1 - th * th, torch.ones_like(x))
    else:
        z, dz_dx = x, None
    z = torch.where(allowed, z, torch.full_like(z, float("-inf")))
    has_nan = torch.isnan(z).any(dim=1, keepdim=True)
    # max over allowed classes; -inf for empty rows, shifted by 0 there so exp() sees -inf.
    m = torch.amax(z, dim=1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(z - m)  # 0 at masked classes
    s = e.sum(dim=1, keepdim=True)
    lse = m + torch.log(s)
    p = e / s  # NaN on empty rows (0 / 0); those rows are discarded by the caller
    return allowed, z, lse, p, dz_dx, has_nan


def _class_rows(x, target, ignore_index, allowed, has_nan):
    """Row kinds for class-index targets: (ignored, counted, t) with t (N, 1, D) a safe index.

    Order as docs/formulas.md: ignored, out of range, empty, counted. Out-of-range targets
    raise IndexError for CPU tensors; elsewhere (no host sync) they are flagged NaN by the
    caller via the returned `out_of_range` mask.
    """
    n_classes = x.shape[1]
    t = target.unsqueeze(1)  # (N, 1, D)
    ignored = t == ignore_index
    out_of_range = ~ignored & ((t < 0) | (t >= n_classes))
    # IndexError needs the data on the host: eager CPU only (a traced graph, or a GPU
    # tensor, would need a sync); elsewhere the caller flags the row NaN.
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and bool(out_of_range.any()):
        bad = int(t[out_of_range][0])
        raise IndexError(f"Target {bad} is out of bounds: expected a class index in [0, {n_classes}) or ignore_index={ignore_index}")
    empty = ~allowed.any(dim=1, keepdim=True) & ~has_nan
    counted = ~ignored & ~out_of_range & ~empty
    t_safe = torch.where(ignored | out_of_range, torch.zeros_like(t), t)
    return counted, out_of_range, t_safe


def _reduce(loss, count, reduction, out_dtype):
    """(out, denom) from per-row loss and count (N, 1, D): "mean" over a zero denominator is 0
    (SPEC rule 6)."""
    loss, count = loss.squeeze(1), count.squeeze(1)
    denom = count.sum()
    if reduction == 0:
        return loss.to(out_dtype), denom
    total = loss.sum()
    if reduction == 1:
        total = torch.where(denom != 0, total / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(total))
    return total.to(out_dtype), denom


def _finish(loss, count, counted, out_of_range, coefs, reduction, out_dtype, logits_dtype):
    """Zero the non-counted rows, NaN the out-of-range ones; stats [lse, coef_p, smooth,
    target_coef] per row, [-inf, 0, 0, 0] for rows whose gradient is 0. Returns
    (out, denom, stats) as csrc/ops.cpp's forward ops.

    The forward ops compute in float64 (a confident float32 row's loss is a small number
    that float32 sums of exp lose) and round here to the accumulation dtype, folding the
    rounding of lse into coef_p as the kernels do (csrc/common/softmax_row.h
    fold_lse_rounding): backward's p_c = exp(z_c - lse) from the rounded lse, times that
    coef_p, is the exact p_c's term."""
    acc = acc_dtype(logits_dtype)
    zero = torch.zeros_like(loss)
    loss = torch.where(counted, loss, zero)
    loss = torch.where(out_of_range, torch.full_like(loss, float("nan")), loss)
    count = torch.where(counted, count, zero)
    lse, coef_p, smooth, target_coef = (torch.broadcast_to(c, loss.shape) for c in coefs)
    lse_rounded = lse.to(acc).to(lse.dtype)
    finite = torch.isfinite(lse)
    coef_p = torch.where(finite, coef_p * (1 - (lse - torch.where(finite, lse_rounded, lse))), coef_p)
    stats = torch.cat([lse, coef_p, smooth, target_coef], dim=1)  # (N, 4, D)
    dead = torch.tensor([float("-inf"), 0.0, 0.0, 0.0], dtype=loss.dtype, device=loss.device).view(1, 4, 1)
    stats = torch.where(counted, stats, dead).permute(0, 2, 1).contiguous().to(acc)  # (N, D, 4)
    out, denom = _reduce(loss, count, reduction, out_dtype)
    return out, denom.to(acc), stats


def ce_fwd(logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap, reduction, out_dtype):
    """Cross-entropy. logits (N, C, D); target (N, D) int64 or (N, C, D) probabilities;
    weight (C,) acc or None; mask (N, C, D) bool or None. Returns (out, denom, stats)."""
    acc = torch.float64  # see _finish: rounded to the kernels' accumulation dtype at the end
    x = logits.to(acc)
    eps, zl = float(label_smoothing), float(z_loss)
    allowed, z, lse, p, dz_dx, has_nan = _softmax_parts(x, mask, float(softcap))
    w = torch.ones_like(x[:1, :, :1]) if weight is None else weight.to(acc).view(1, -1, 1)  # (1, C, 1)
    n_allowed = allowed.sum(dim=1, keepdim=True).to(acc)  # |A|, (N, 1, D)
    smooth = eps / torch.where(n_allowed > 0, n_allowed, torch.ones_like(n_allowed))
    # sums relative to the row max (lse - z_c = (m - z_c) + log s): a confident row's small
    # loss is not a difference of two large sums
    m = torch.amax(z, dim=1, keepdim=True)
    ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    lse_minus_z = (lse - ref) - (z - ref)  # +inf at masked classes
    w_a = torch.where(allowed, w.expand_as(x), torch.zeros_like(x))  # w_c on the allowed set A
    w_allowed = w_a.sum(1, keepdim=True)

    if target.dtype.is_floating_point:
        # y'_c = (1 - eps) y_c + smooth [c in A];  loss = sum_c w_c y'_c (lse - z_c) + zl lse^2
        y_s = (1 - eps) * target.to(acc) + torch.where(allowed, smooth, torch.zeros_like(x))
        coef = w * y_s  # a term with coefficient 0 is 0 even at -inf logits (rule 7)
        loss = _times(coef, lse_minus_z).sum(1, keepdim=True)
        coef_p = coef.sum(1, keepdim=True)
        if zl != 0:  # unweighted for probability targets
            loss = loss + zl * lse * lse
            coef_p = coef_p + 2 * zl * lse
        loss = torch.where(torch.isnan(lse), lse, loss)  # rule 8: NaN stays, whatever the weights
        counted = allowed.any(dim=1, keepdim=True) | has_nan  # only empty rows are not counted
        no_row = torch.zeros_like(counted)
        keep = torch.full_like(lse, 1 - eps)
        return _finish(loss, torch.ones_like(loss), counted, no_row, (lse, coef_p, smooth, keep), reduction, out_dtype, logits.dtype)

    counted, out_of_range, t = _class_rows(x, target, ignore_index, allowed, has_nan)
    w_t = w.expand(x.shape[0], -1, x.shape[2]).gather(1, t)  # (N, 1, D)
    # (1 - eps) w_t (lse - z_t), +inf when the target is masked (rule 4)
    loss = _times((1 - eps) * w_t, lse_minus_z.gather(1, t))
    coef_p = (1 - eps) * w_t
    if eps > 0:  # uniform part over the allowed classes only (rule 5)
        loss = loss + smooth * torch.where(allowed, w_a * lse_minus_z, torch.zeros_like(x)).sum(1, keepdim=True)
        coef_p = coef_p + smooth * w_allowed
    else:
        smooth = torch.zeros_like(lse)
    if zl != 0:  # z-loss, weighted by the target's class weight (rule 9)
        loss = loss + zl * w_t * lse * lse
        coef_p = coef_p + 2 * zl * w_t * lse
    loss = torch.where(torch.isnan(lse), lse, loss)  # rule 8: NaN stays, whatever w_t is
    coefs = (lse, coef_p, smooth, (1 - eps) * w_t)
    return _finish(loss, w_t, counted, out_of_range, coefs, reduction, out_dtype, logits.dtype)


def focal_fwd(logits, target, alpha, mask, ignore_index, gamma, reduction, out_dtype):
    """Softmax focal loss per row: -alpha_t * (1 - p_t)^gamma * log(p_t).
    logits, mask as ce_fwd; target (N, D) int64; alpha (C,) acc or None."""
    acc = torch.float64  # see _finish
    x = logits.to(acc)
    gamma = float(gamma)
    allowed, z, lse, p, _, has_nan = _softmax_parts(x, mask, 0.0)
    counted, out_of_range, t = _class_rows(x, target, ignore_index, allowed, has_nan)
    a = torch.ones_like(x[:1, :, :1]) if alpha is None else alpha.to(acc).view(1, -1, 1)
    alpha_t = a.expand(x.shape[0], -1, x.shape[2]).gather(1, t)  # (N, 1, D)

    logp = torch.clamp_max(z.gather(1, t) - lse, 0.0)  # -inf when the target is masked
    logp = torch.where(torch.isnan(lse), lse, logp)
    p_t = torch.exp(logp)
    q = -torch.expm1(logp)  # 1 - p_t, accurate near p_t = 1
    q_g = torch.pow(q, gamma)  # pow(0, 0) == 1: gamma = 0 is cross-entropy
    loss = _times(alpha_t * q_g, -logp)
    loss = torch.where(torch.isnan(lse), lse, loss)  # rule 8: NaN stays, whatever alpha_t is

    # dloss/dz_c = G * (p_c - [c == t]),  G = alpha_t * q^gamma * (1 - gamma * p_t * r),
    # r = log(p_t) / (1 - p_t) -> -1 as p_t -> 1: finite for 0 < gamma < 1 where q^(gamma-1)
    # alone would overflow. p_t == 0 (masked target) makes the correction 0, not 0 * -inf.
    r = torch.where(q == 0, -torch.ones_like(q), logp / q)
    correction = torch.where(p_t == 0, torch.zeros_like(p_t), gamma * p_t * r)
    G = alpha_t * q_g * (1 - correction)
    coefs = (lse, G, torch.zeros_like(G), G)
    return _finish(loss, torch.ones_like(loss), counted, out_of_range, coefs, reduction, out_dtype, logits.dtype)


def _scale(grad_out, denom, reduction, acc):
    """(N, 1, D) or 0-dim multiplier of the per-row gradient."""
    go = grad_out.to(acc)
    if reduction == 0:
        return go.unsqueeze(1)
    if reduction == 1:
        d = denom.to(acc)
        return torch.where(d != 0, go / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(go))
    return go


def softmax_bwd(grad_out, logits, target, weight, mask, stats, denom, softcap, reduction, grad):
    """Backward of ce_fwd / focal_fwd from their stats (csrc/ops.cpp); writes grad. Computed
    in float64 from the stats as stored (z_c - lse is exact for neighbouring values)."""
    acc = torch.float64
    x = logits.to(acc)
    stats = stats.to(acc)
    allowed, z, _, _, dz_dx, _ = _softmax_parts(x, mask, float(softcap))
    lse, coef_p, smooth, target_coef = (stats[..., k].unsqueeze(1) for k in range(4))  # (N, 1, D)
    live = lse != float("-inf")
    p = torch.where(allowed, torch.exp(z - torch.where(live, lse, torch.zeros_like(lse))), torch.zeros_like(x))
    w = torch.ones_like(x[:1, :, :1]) if weight is None else weight.to(acc).view(1, -1, 1)
    if target.dtype.is_floating_point:
        y_s = target_coef * target.to(acc) + torch.where(allowed, smooth, torch.zeros_like(x))
        g = coef_p * p - w * y_s
    else:
        t = torch.where(live, target.unsqueeze(1), torch.zeros_like(target.unsqueeze(1)))
        onehot = torch.zeros_like(x).scatter_(1, t, 1.0)
        g = coef_p * p - torch.where(allowed, smooth * w, torch.zeros_like(x)) - target_coef * onehot
    if dz_dx is not None:
        g = torch.where(allowed, g * dz_dx, g)
    g = torch.where(live, g * _scale(grad_out, denom, reduction, acc), torch.zeros_like(g))
    grad.copy_(g)


def _softplus(v):
    """log(1 + exp(v)), stable, exact limits at +-inf (0 at -inf, +inf at +inf)."""
    return torch.log1p(torch.exp(-v.abs())) + v.clamp_min(0)


def _binary_elems(input, target, weight, pos_weight, gamma, alpha):
    """BCE-with-logits (gamma == 0 and alpha < 0) or torchvision's sigmoid focal loss, per
    element of the (M, L) view. weight, pos_weight (M, L) acc (broadcast views) or None.
    Returns (loss, dloss/dx), (M, L) acc."""
    acc = acc_dtype(input.dtype)
    x = input.to(acc)
    y = target.to(acc)
    gamma, alpha = float(gamma), float(alpha)
    pw = torch.ones_like(x) if pos_weight is None else pos_weight.to(acc)
    s, sn = torch.sigmoid(x), torch.sigmoid(-x)

    # ce = pw*y*sp(-x) + (1-y)*sp(x), each term 0 when its coefficient is 0 (rule 12 limits).
    ce = _times(pw * y, _softplus(-x)) + _times(1 - y, _softplus(x))
    dce = (1 - y) * s - pw * y * sn

    if gamma == 0 and alpha < 0:  # plain BCE
        loss, g = ce, dce
    else:  # sigmoid focal
        alpha_t = torch.ones_like(x) if alpha < 0 else alpha * y + (1 - alpha) * (1 - y)
        q = (1 - y) * s + y * sn  # 1 - p_t
        q_g = torch.pow(q, gamma)
        loss = alpha_t * _times(q_g, ce)
        g = dce * q_g
        if gamma != 0:
            # d(q^gamma)/dx = gamma * q^gamma * (1 - 2y) * r,  r = s*sn/q <= 1: finite for every
            # gamma >= 0; the term is 0 where r == 0 (avoids inf * 0 at infinite x).
            ssn = s * sn
            r = torch.where((q == 0) | (ssn == 0), torch.zeros_like(q), ssn / torch.where(q == 0, torch.ones_like(q), q))
            term = gamma * ce * q_g * (1 - 2 * y) * r
            g = g + torch.where(r == 0, torch.zeros_like(term), term)
        g = alpha_t * g
    if weight is not None:  # weight 0: loss 0 and gradient 0 whatever x is (rule 12)
        w = weight.to(acc)
        loss = _times(w, loss)
        g = _times(w, g)
    return loss, g


def binary_fwd(input, target, weight, pos_weight, grad, gamma, alpha, reduction, out_dtype):
    """Reduced loss (csrc/ops.cpp); with grad, the gradient for grad_output == 1."""
    loss, g = _binary_elems(input, target, weight, pos_weight, gamma, alpha)
    if reduction == 0:
        return loss.to(out_dtype)
    total = loss.sum()
    if reduction == 1:  # 0 / 0 = NaN for an empty input, as PyTorch
        total = total / loss.numel()
        g = g * (1.0 / max(loss.numel(), 1))
    if grad is not None:
        grad.copy_(g)
    return total.to(out_dtype)


def binary_bwd(grad_out, input, target, weight, pos_weight, gamma, alpha, reduction, grad):
    """grad = dloss/dx * grad_output (/ M * L for "mean"), recomputed."""
    _, g = _binary_elems(input, target, weight, pos_weight, gamma, alpha)
    if reduction == 1:  # as binary_fwd then scale_grad, in that order (bitwise reentrant)
        g = g * (1.0 / max(g.numel(), 1))
    grad.copy_(g * grad_out.to(g.dtype))


def scale_grad(grad_out, grad):
    """grad *= grad_out (the reference does not skip grad_out == 1: it moves no GPU bytes)."""
    grad.mul_(grad_out.to(grad.dtype))
