"""BCE-with-logits and torchvision's sigmoid focal loss in Triton: `_binary_fwd_kernel`,
`_binary_bwd_kernel`, `_scale_grad_kernel` -> launchers `binary_fwd`, `binary_bwd`,
`scale_grad` -> ops `fusedloss::*_triton` (__init__.py).

Elementwise over a strided (M, L) view, in (BLOCK_M, BLOCK_L) tiles: BLOCK_M > 1 only for
short rows (an (N, 1) input would otherwise give one program per element). Program (i, k)
handles `tiles` tiles of rows block i, left to right.

The training step ("mean" / "sum"): the forward reads input and target once, writes the
gradient for grad_output == 1 (divided by M * L for "mean") and one partial sum per
program, which one more launch (_reduce_rows) sums in a fixed order (bitwise
reproducible, no atomics). Backward is `_scale_grad_kernel`: it reads grad_output from
device memory and returns at once when it is 1, so the usual step moves 1 read + 1 write
of the input's size (target aside); any other grad_output costs one read + write more.
"none", and a second backward through the same graph, recompute: `_binary_bwd_kernel`
reads input, target and grad_output and writes the gradient. Formulas: docs/formulas.md.
"""
import torch
import triton
import triton.language as tl

from fusedloss._ops import acc_dtype
from fusedloss.triton._launch import binary_config
from fusedloss.triton._rows import _pow, _reduce_rows, _scalar


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
def _binary_tile(
    x_ptr, y_ptr, w_ptr, pw_ptr, rows, cols, ok,
    stride_xm, stride_xl, stride_ym, stride_yl, stride_wm, stride_wl, stride_pm, stride_pl,
    alpha, gamma, FOCAL: tl.constexpr, ACC: tl.constexpr,
):
    """Loads one (BLOCK_M, BLOCK_L) tile of the operands; returns (loss, dloss/dx) in ACC."""
    x = tl.load(x_ptr + rows * stride_xm + cols * stride_xl, mask=ok, other=0.0).to(ACC)
    y = tl.load(y_ptr + rows * stride_ym + cols * stride_yl, mask=ok, other=0).to(ACC)  # any target dtype
    w = tl.full(x.shape, 1.0, ACC)
    if w_ptr is not None:
        w = tl.load(w_ptr + rows * stride_wm + cols * stride_wl, mask=ok, other=0.0).to(ACC)
    pw = tl.full(x.shape, 1.0, ACC)
    if pw_ptr is not None:
        pw = tl.load(pw_ptr + rows * stride_pm + cols * stride_pl, mask=ok, other=0.0).to(ACC)
    return _binary_elem(x, y, w, pw, alpha, gamma, FOCAL)


@triton.jit
def _binary_fwd_kernel(
    # pointers
    x_ptr,  # (M, L) logits: float16 / bfloat16 / float32 / float64
    y_ptr,  # (M, L) targets: logits' dtype, bool or integer
    w_ptr,  # (M, L) acc weight (0 strides where broadcast); None = all 1
    pw_ptr,  # (M, L) acc pos_weight (0 strides where broadcast); None = all 1
    grad_ptr,  # (M, L) logits' dtype, d(reduced loss)/dx for grad_output 1; None: no gradient
    out_ptr,  # "none": (M, L) per-element loss, output dtype; else (programs,) acc partial sums
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
    # sizes
    M,  # rows
    L,  # row length
    tiles,  # tiles per program (grid dim 1 is capped at 65535 programs)
    # scalars
    gamma: tl.float64,  # focal gamma >= 0 (unused for BCE)
    alpha: tl.float64,  # focal alpha, < 0 = no alpha term (unused for BCE)
    grad_scale: tl.float64,  # 1 / (M * L) for "mean", 1 for "sum"
    # meta-parameters
    FOCAL: tl.constexpr,  # sigmoid focal (False: plain BCE, gamma == 0 and alpha < 0)
    REDUCE: tl.constexpr,  # write one partial sum per program instead of per-element losses
    BLOCK_M: tl.constexpr,  # rows per tile (> 1 only for short rows)
    BLOCK_L: tl.constexpr,  # columns per tile
):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]  # (BLOCK_M, 1)
    part = tl.program_id(1).to(tl.int64)
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    a = _scalar(alpha, ACC)
    gm = _scalar(gamma, ACC)
    total = tl.zeros([BLOCK_M, BLOCK_L], ACC)
    for i in range(tiles):
        cols = ((part * tiles + i) * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]  # (1, BLOCK_L) int64
        ok = (rows < M) & (cols < L)
        loss, grad = _binary_tile(
            x_ptr, y_ptr, w_ptr, pw_ptr, rows, cols, ok,
            stride_xm, stride_xl, stride_ym, stride_yl, stride_wm, stride_wl, stride_pm, stride_pl,
            a, gm, FOCAL, ACC,
        )  # fmt: skip
        if grad_ptr is not None:
            grad = grad * _scalar(grad_scale, ACC)
            tl.store(grad_ptr + rows * stride_gm + cols * stride_gl, grad.to(grad_ptr.dtype.element_ty), mask=ok)
        if REDUCE:
            total += tl.where(ok, loss, 0.0)
        else:
            tl.store(out_ptr + rows * L + cols, loss.to(out_ptr.dtype.element_ty), mask=ok)
    if REDUCE:
        # this program's sum, in a fixed order
        pid = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + part
        tl.store(out_ptr + pid, tl.sum(tl.sum(total, 1), 0))


@triton.jit
def _binary_bwd_kernel(
    # pointers
    x_ptr,  # (M, L) logits
    y_ptr,  # (M, L) targets: logits' dtype, bool or integer
    w_ptr,  # (M, L) acc weight (0 strides where broadcast); None = all 1
    pw_ptr,  # (M, L) acc pos_weight (0 strides where broadcast); None = all 1
    go_ptr,  # grad_output: (M, L) any strides ("none") or () ("mean", "sum"), any float dtype
    grad_ptr,  # (M, L) logits' dtype, written
    # strides
    stride_xm,  # logits, row
    stride_xl,  # logits, column
    stride_ym,  # target, row
    stride_yl,  # target, column
    stride_wm,  # weight, row
    stride_wl,  # weight, column
    stride_pm,  # pos_weight, row
    stride_pl,  # pos_weight, column
    stride_om,  # grad_output, row (0 for a 0-dim grad_output)
    stride_ol,  # grad_output, column
    stride_gm,  # grad, row
    stride_gl,  # grad, column
    # sizes
    M,  # rows
    L,  # row length
    tiles,  # tiles per program
    # scalars
    gamma: tl.float64,  # focal gamma >= 0 (unused for BCE)
    alpha: tl.float64,  # focal alpha, < 0 = no alpha term (unused for BCE)
    grad_scale: tl.float64,  # 1 / (M * L) for "mean", else 1
    # meta-parameters
    FOCAL: tl.constexpr,  # sigmoid focal (False: plain BCE)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_L: tl.constexpr,  # columns per tile
):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    part = tl.program_id(1).to(tl.int64)
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    a = _scalar(alpha, ACC)
    gm = _scalar(gamma, ACC)
    for i in range(tiles):
        cols = ((part * tiles + i) * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]
        ok = (rows < M) & (cols < L)
        _, grad = _binary_tile(
            x_ptr, y_ptr, w_ptr, pw_ptr, rows, cols, ok,
            stride_xm, stride_xl, stride_ym, stride_yl, stride_wm, stride_wl, stride_pm, stride_pl,
            a, gm, FOCAL, ACC,
        )  # fmt: skip
        go = tl.load(go_ptr + rows * stride_om + cols * stride_ol, mask=ok, other=0.0).to(ACC)
        # the forward's (grad * grad_scale) then scale_grad's * go, in that order: a second
        # backward gives bitwise the first one's gradient (gradcheck's reentrancy check)
        grad = (grad * _scalar(grad_scale, ACC)) * go
        tl.store(grad_ptr + rows * stride_gm + cols * stride_gl, grad.to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale_grad_kernel(
    go_ptr,  # () grad_output, any float dtype
    grad_ptr,  # (numel,) contiguous gradient, scaled in place
    numel,  # elements
    BLOCK: tl.constexpr,  # elements per program
):
    """grad *= grad_output; a program returns before touching grad when grad_output == 1
    (the device-side check that keeps the usual step at 1 read + 1 write)."""
    ACC: tl.constexpr = tl.float64 if grad_ptr.dtype.element_ty == tl.float64 else tl.float32
    go = tl.load(go_ptr).to(ACC)
    if go != 1:
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < numel
        g = tl.load(grad_ptr + i, mask=ok).to(ACC)
        tl.store(grad_ptr + i, (g * go).to(grad_ptr.dtype.element_ty), mask=ok)


def _grid(m, l, dtype):
    """(block_m, block_l, num_warps, tiles, grid) of the elementwise kernels."""
    block_m, block_l, num_warps, tiles = binary_config(l, dtype)
    tiles = max(min(tiles, triton.cdiv(l, block_l)), 1)  # short rows: no fully masked tiles (l may be 0)
    tiles = max(tiles, triton.cdiv(l, block_l * 65535))  # grid dim 1 holds at most 65535
    parts = max(triton.cdiv(l, block_l * tiles), 1)
    return block_m, block_l, num_warps, tiles, (triton.cdiv(m, block_m), parts)


def _operand_strides(t):
    return t.stride() if t is not None else (0, 0)


def binary_fwd(input, target, weight, pos_weight, grad, gamma, alpha, reduction, out_dtype):
    """Launcher, as the op fusedloss::binary_fwd (csrc/ops.cpp). input, target (M, L);
    weight, pos_weight (M, L) acc views or None; grad (M, L) or None (reduction 1, 2)."""
    m, l = input.shape
    acc = acc_dtype(input.dtype)
    block_m, block_l, num_warps, tiles, grid = _grid(m, l, input.dtype)
    if reduction == 0:
        out = torch.empty((m, l), dtype=out_dtype, device=input.device)
    else:
        out = torch.empty((grid[0] * grid[1] if m * l else 0,), dtype=acc, device=input.device)
    if m * l > 0:
        _binary_fwd_kernel[grid](
            input, target, weight, pos_weight, grad, out,
            *input.stride(), *target.stride(), *_operand_strides(weight), *_operand_strides(pos_weight),
            *_operand_strides(grad),
            m, l, tiles,
            float(gamma), float(alpha), 1.0 / (m * l) if reduction == 1 else 1.0,
            FOCAL=not (gamma == 0 and alpha < 0), REDUCE=reduction != 0,
            BLOCK_M=block_m, BLOCK_L=block_l, num_warps=num_warps,
        )  # fmt: skip
    if reduction == 0:
        return out
    return _reduce_rows(out, None, reduction, out_dtype, numel=m * l)[0]


def binary_bwd(grad_out, input, target, weight, pos_weight, gamma, alpha, reduction, grad):
    """Launcher, as the op fusedloss::binary_bwd: grad = dloss/dx * grad_output (recomputed)."""
    m, l = input.shape
    if m * l == 0:
        return
    block_m, block_l, num_warps, tiles, grid = _grid(m, l, input.dtype)
    go_strides = grad_out.stride() if reduction == 0 else (0, 0)
    _binary_bwd_kernel[grid](
        input, target, weight, pos_weight, grad_out, grad,
        *input.stride(), *target.stride(), *_operand_strides(weight), *_operand_strides(pos_weight),
        *go_strides, *grad.stride(),
        m, l, tiles,
        float(gamma), float(alpha), 1.0 / (m * l) if reduction == 1 else 1.0,
        FOCAL=not (gamma == 0 and alpha < 0), BLOCK_M=block_m, BLOCK_L=block_l, num_warps=num_warps,
    )  # fmt: skip


SCALE_BLOCK = 4096


def scale_grad(grad_out, grad):
    """Launcher, as the op fusedloss::scale_grad: grad *= grad_out unless grad_out == 1."""
    n = grad.numel()
    if n == 0:
        return
    _scale_grad_kernel[(triton.cdiv(n, SCALE_BLOCK),)](grad_out, grad, n, BLOCK=SCALE_BLOCK, num_warps=4)
