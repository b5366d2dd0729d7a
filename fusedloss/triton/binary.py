"""BCE-with-logits and torchvision's sigmoid focal loss in Triton: `_binary_fwd_kernel` ->
`binary_fwd` (launcher) -> op `fusedloss::binary_fwd_triton` (__init__.py).

Elementwise over a strided (M, L) view, in (BLOCK_M, BLOCK_L) tiles: BLOCK_M > 1 only for
short rows (an (N, 1) input would otherwise give one program per element). Program (i, k)
handles `tiles` tiles of rows block i, left to right; with reduce it writes each row's sum
over its columns to a (M, K) partial buffer that the launcher sums over k (a fixed, shape-determined order: the result
is bitwise reproducible, no atomics). One read of input/target (and weights), one write of
the gradient and of the loss (or of M * K partials). Formulas: docs/formulas.md.
"""
import torch
import triton
import triton.language as tl

from fusedloss._ops import acc_dtype
from fusedloss.triton._launch import binary_config
from fusedloss.triton._rows import _pow, _scalar


@triton.jit
def _log1p(u):
    # log(1 + u) for u >= 0; Kahan's trick recovers the digits 1 + u rounds away.
    v = 1.0 + u
    return tl.where(v == 1.0, u, tl.log(v) * u / (v - 1.0))


@triton.jit
def _binary_elem(x, y, w, pw, alpha, gamma, FOCAL: tl.constexpr):
    """Per-element (loss, dloss/dx), all in the accumulation dtype.

    sp(v) = log(1 + exp(v)) = log1p(exp(-|v|)) + max(v, 0)   (never overflows)
    ce     = pw y sp(-x) + (1 - y) sp(x)     a term whose coefficient is 0 is 0, so
                                             x = +-inf with the matching label gives 0
    dce/dx = (1 - y) s - pw y sn,            s = sigmoid(x), sn = sigmoid(-x) = 1 - s
    """
    e = tl.exp(-tl.abs(x))  # in [0, 1]
    lg = _log1p(e)
    sp_pos = lg + tl.maximum(x, 0.0)  # sp(x)
    sp_neg = lg + tl.maximum(-x, 0.0)  # sp(-x)
    inv = 1.0 / (1.0 + e)
    s = tl.where(x >= 0, inv, e * inv)
    sn = tl.where(x >= 0, e * inv, inv)
    a = pw * y
    b = 1.0 - y
    ce = tl.where(a == 0, 0.0, a * sp_neg) + tl.where(b == 0, 0.0, b * sp_pos)
    dce = b * s - a * sn
    if FOCAL:
        # torchvision: loss = alpha_t * ce * q^gamma, q = 1 - p_t = (1 - y) s + y sn,
        # alpha_t = alpha y + (1 - alpha)(1 - y) (1 when alpha < 0).
        #   dq/dx = (1 - y) s sn - y s sn = (1 - 2y) s sn
        #   d(q^gamma)/dx = gamma q^(gamma - 1) (1 - 2y) s sn = gamma q^gamma (1 - 2y) r,
        #   r = s sn / q  <= 1 (q is a convex combination of s and sn >= s sn), so the
        #   gradient is finite for 0 < gamma < 1 where q^(gamma - 1) overflows.
        # r == 0 (q == 0 or saturated x) drops the second term: no inf * 0 at infinite x.
        q = b * s + y * sn
        qg = _pow(q, gamma)
        ssn = s * sn
        r = tl.where((q == 0) | (ssn == 0), 0.0, ssn / tl.where(q == 0, 1.0, q))
        alpha_t = tl.where(alpha < 0, 1.0, alpha * y + (1.0 - alpha) * b)
        scale = w * alpha_t
        loss = ce * qg
        grad = dce * qg + tl.where(r == 0, 0.0, gamma * ce * qg * (1.0 - 2.0 * y) * r)
    else:
        scale = w
        loss = ce
        grad = dce
    # weight (times alpha_t) 0: loss 0 and gradient 0 even at infinite x
    loss = tl.where(scale == 0, 0.0, scale * loss)
    grad = tl.where(scale == 0, 0.0, scale * grad)
    return loss, grad


@triton.jit
def _binary_fwd_kernel(
    # pointers
    x_ptr,  # (M, L) logits: float16 / bfloat16 / float32 / float64
    y_ptr,  # (M, L) targets, logits' dtype
    w_ptr,  # (M, L) acc weight (0 strides where broadcast); None = all 1
    pw_ptr,  # (M, L) acc pos_weight (0 strides where broadcast); None = all 1
    grad_ptr,  # (M, L) logits' dtype, dloss/dx per element; None without WRITE_GRAD
    out_ptr,  # REDUCE: (M, K) acc partial row sums; else (M, L) acc per-element loss
    # strides
    stride_xm,  # logits, row
    stride_xl,  # logits, column
    stride_ym,  # target, row
    stride_yl,  # target, column
    stride_wm,  # weight, row
    stride_wl,  # weight, column
    stride_pm,  # pos_weight, row
    stride_pl,  # pos_weight, column
    stride_gm,  # grad, row
    stride_gl,  # grad, column
    stride_om,  # out, row
    stride_ol,  # out, column (partial index k with REDUCE)
    # sizes
    M,  # rows
    L,  # row length
    tiles,  # tiles per program (grid dim 1 is capped at 65535 programs)
    # scalars
    gamma: tl.float64,  # focal gamma >= 0 (unused for BCE)
    alpha: tl.float64,  # focal alpha, < 0 = no alpha term (unused for BCE)
    # meta-parameters
    FOCAL: tl.constexpr,  # sigmoid focal (False: plain BCE, gamma == 0 and alpha < 0)
    WRITE_GRAD: tl.constexpr,  # write dloss/dx
    REDUCE: tl.constexpr,  # write per-program partial sums instead of per-element losses
    BLOCK_M: tl.constexpr,  # rows per tile (> 1 only for short rows)
    BLOCK_L: tl.constexpr,  # columns per tile
):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]  # (BLOCK_M, 1)
    part = tl.program_id(1).to(tl.int64)
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    a = _scalar(alpha, ACC)
    gm = _scalar(gamma, ACC)
    total = tl.zeros([BLOCK_M, BLOCK_L], ACC)
    for i in range(tiles):
        cols = ((part * tiles + i) * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]  # (1, BLOCK_L) int64
        ok = (rows < M) & (cols < L)
        x = tl.load(x_ptr + rows * stride_xm + cols * stride_xl, mask=ok, other=0.0).to(ACC)
        y = tl.load(y_ptr + rows * stride_ym + cols * stride_yl, mask=ok, other=0.0).to(ACC)
        w = tl.full([BLOCK_M, BLOCK_L], 1.0, ACC)
        if w_ptr is not None:
            w = tl.load(w_ptr + rows * stride_wm + cols * stride_wl, mask=ok, other=0.0).to(ACC)
        pw = tl.full([BLOCK_M, BLOCK_L], 1.0, ACC)
        if pw_ptr is not None:
            pw = tl.load(pw_ptr + rows * stride_pm + cols * stride_pl, mask=ok, other=0.0).to(ACC)
        loss, grad = _binary_elem(x, y, w, pw, a, gm, FOCAL)
        if WRITE_GRAD:
            tl.store(grad_ptr + rows * stride_gm + cols * stride_gl, grad.to(grad_ptr.dtype.element_ty), mask=ok)
        if REDUCE:
            total += tl.where(ok, loss, 0.0)
        else:
            tl.store(out_ptr + rows * stride_om + cols * stride_ol, loss, mask=ok)
    if REDUCE:
        # (BLOCK_M,) row sums of this program's columns, in a fixed order
        tl.store(out_ptr + rows * stride_om + part * stride_ol, tl.sum(total, 1)[:, None], mask=rows < M)


def binary_fwd(input, target, weight, pos_weight, grad, gamma, alpha, reduce):
    """Launcher. input, target (M, L); weight, pos_weight (M, L) acc views or None; grad
    (M, L) or None. Returns (M,) row sums (reduce) or (M, L) losses, in acc."""
    m, l = input.shape
    acc = acc_dtype(input.dtype)
    block_m, block_l, num_warps, tiles = binary_config(l, input.dtype)
    tiles = min(tiles, triton.cdiv(l, block_l))  # short rows: no fully masked tiles
    tiles = max(tiles, triton.cdiv(l, block_l * 65535))  # grid dim 1 holds at most 65535
    parts = max(triton.cdiv(l, block_l * tiles), 1)
    if reduce:
        out = torch.empty((m, parts), dtype=acc, device=input.device)
    else:
        out = torch.empty((m, l), dtype=acc, device=input.device)
    if m * l == 0:
        return out.zero_().sum(1) if reduce else out
    w_strides = weight.stride() if weight is not None else (0, 0)
    p_strides = pos_weight.stride() if pos_weight is not None else (0, 0)
    g_strides = grad.stride() if grad is not None else (0, 0)
    focal = not (gamma == 0 and alpha < 0)
    _binary_fwd_kernel[(triton.cdiv(m, block_m), parts)](
        input, target, weight, pos_weight, grad, out,
        *input.stride(), *target.stride(), *w_strides, *p_strides, *g_strides, *out.stride(),
        m, l, tiles,
        float(gamma), float(alpha),
        FOCAL=focal, WRITE_GRAD=grad is not None, REDUCE=bool(reduce),
        BLOCK_M=block_m, BLOCK_L=block_l, num_warps=num_warps,
    )  # fmt: skip
    if reduce:
        # a fixed-order sum over the K partials of each row (deterministic, no atomics)
        return out[:, 0] if parts == 1 else out.sum(1)
    return out
