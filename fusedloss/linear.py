"""Fused linear cross-entropy: the LLM head's loss without its N x V logits (SPEC section 8).

    loss = fusedloss.linear_cross_entropy(hidden, lm_head.weight, labels)
    # == fusedloss.cross_entropy(F.linear(hidden, lm_head.weight), labels), never holding N x V

Layers: ops `ce_fwd` / `softmax_bwd` (csrc/ops.cpp, through fusedloss/_backend.py) ->
`_chunk_pass` (here: one pass over the tokens, chunk by chunk) -> `_LinearCrossEntropyFn`
(autograd) -> `linear_cross_entropy` -> `fusedloss.nn.LinearCrossEntropyLoss`.

One chunk of n tokens (x_c (n, H), W (V, H)):
    logits  = x_c @ W.T (+ b)                 (n, V), in the input dtype: F.linear's rounding
    ce_fwd(logits)                            the chunk's loss sum and per-row stats
    softmax_bwd(1, logits) -> logits          d(sum of the chunk's losses)/d logits, in place
    dX_c    = dlogits @ W                     (n, H)
    dW     += dlogits.T @ x_c                 (V, H), float32 for half-precision weights
    db     += dlogits.sum(0)                  (V,)
One (chunk, V) buffer is reused by every chunk, so the extra memory of a step is that
buffer plus the gradients (N x H, V x H, V). The chunks run in a fixed order: the result
is bitwise reproducible.

"mean" divides by the sum of weight[target] over the counted rows, known only after the
last chunk; it stays a device tensor, and backward multiplies the saved gradients by
grad_output / denominator (a 0-dim tensor): nothing syncs with the host. reduction="none"
has a per-row grad_output, known only in backward, which therefore recomputes the logits
chunk by chunk (one more x @ W.T than "mean" / "sum"); so does a second backward through
the same graph (retain_graph=True), the first having scaled the saved gradients in place.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from fusedloss import _backend, _ops
from fusedloss._ops import REDUCTION_CODES, acc_dtype
from fusedloss.functional import (
    INDEX_DTYPES,
    _check_ce_args,
    _check_device,
    _check_float,
    _check_reduction,
    _class_weight,
    _input_grad,
    _soft_target_grads,
)

__all__ = ["linear_cross_entropy"]

# Default chunk: the most rows whose logits take at most this many bytes. Tuned on a 2-core
# CPU at N=4096, H=1024, V=32000 fp32 (bench/bench_linear_ce_fused.py): smaller chunks make
# the three matmuls less efficient (at 256 rows the logits GEMM is ~25% slower, and the
# (V, H) weight gradient is read and written once per chunk), larger ones only add memory.
# A GPU wants GEMMs of a thousand rows or more at LLM vocabularies.
CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}
MIN_ROWS = 16


def default_chunk_rows(n_rows: int, n_logits: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk when neither options.batch_chunk_size nor a chunking method says."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    rows = budget // max(1, n_logits * (torch.finfo(dtype).bits // 8))
    return max(1, min(max(rows, MIN_ROWS), n_rows))


def _chunk_rows_of(options, n_rows, hidden, n_logits, dtype, device) -> int:
    """options (torch.nn.LinearCrossEntropyOptions or None): batch_chunk_size when set, else
    its aspect-ratio chunking method when it names one, else our default. acc_policy,
    acc_dtype and allow_retain_graph do not apply (weight gradients accumulate in float32 for
    half-precision weights, and a second backward always works)."""
    if options is not None:
        size = getattr(options, "batch_chunk_size", None)
        if size is not None:
            if not (isinstance(size, int) and size > 0):
                raise ValueError(f"options.batch_chunk_size must be a positive int or None, got {size!r}")
            return min(size, max(1, n_rows))
        method = getattr(options, "chunking_method", None)
        if isinstance(method, str) and method.startswith("aspect_ratio"):
            factor = int(method.split(":", 1)[1]) if ":" in method else 1
            target = -(-n_rows // -(-n_logits // hidden)) if n_rows else 1
            rows = 1 << max(0, (target - 1).bit_length())  # next power of 2, as torch's rule
            return max(1, min(rows // factor, n_rows))
    return default_chunk_rows(n_rows, n_logits, dtype, device)


# ----------------------------------------------------------------------------- rows of a chunk
def _rows(t: Optional[Tensor], lead: tuple, i: int, j: int, inner: tuple) -> Optional[Tensor]:
    """Rows [i, j) of t (lead..., *inner) with its lead dims flattened, as (j - i, *inner).

    A view when the lead dims merge (contiguous targets, a (V,) mask broadcast over the
    tokens); otherwise (e.g. a (B, 1, V) mask expanded over T) the chunk's rows are gathered,
    a chunk-sized copy, never the whole N x V."""
    if t is None:
        return None
    if len(lead) > 1:
        try:
            t = t.view((-1,) + tuple(t.shape[len(lead):]))
        except RuntimeError:  # the lead dims do not merge: gather this chunk's rows
            idx = torch.unravel_index(torch.arange(i, j, device=t.device), lead)
            return t[idx].reshape((j - i,) + inner)
    return t[i:j].reshape((j - i,) + inner)


# ----------------------------------------------------------------------------- one pass
class _Cfg:
    """Scalars of one call (nothing tensor-valued: those go through save_for_backward)."""

    __slots__ = ("n_classes", "d", "lead", "ignore_index", "eps", "z", "cap", "red", "out_dtype", "chunk", "backend",
                 "prob", "grad")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def _buffer(shape, dtype, device) -> Tensor:
    """An uninitialized contiguous tensor. On the CPU, large ones come from the extension's
    cache of freed blocks (csrc/cpu/grad_pool.cpp): a training step frees the previous step's
    .grad and the chunk buffer before asking for the same sizes again, so they are reused
    without the page faults of fresh memory (~40 ms per 128 MiB on 2 cores)."""
    return _ops.empty_grad(torch.empty((), dtype=dtype, device=device).expand(shape))


UPCAST_BYTES = 32 << 20  # the float32 copy of a block of dlogits, for a half-precision dW on the CPU


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor, first: bool):
    """acc (+)= a @ b; a (V, n), b (n, H). acc is float32 while a, b are half precision: cuBLAS
    writes float32 directly (out_dtype); elsewhere a is upcast block by block of its rows
    (at most UPCAST_BYTES at a time, not a second chunk-sized buffer) and b once, and the
    products run in float32: exact sums, where a half-precision GEMM would round each chunk's
    product. (On a CPU with bfloat16 dot products that GEMM is ~1.6x faster than the float32
    one; the weight gradient's accuracy is kept instead.)"""
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            if first:
                torch.mm(a, b, out_dtype=acc.dtype, out=acc)
            else:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without out_dtype
            pass
    b = b.to(acc.dtype)
    rows = max(1, UPCAST_BYTES // max(1, a.shape[1] * acc.element_size()))
    for r in range(0, a.shape[0], rows):
        a_r, acc_r = a[r:r + rows].to(acc.dtype), acc[r:r + rows]
        if first:
            torch.mm(a_r, b, out=acc_r)
        else:
            acc_r.addmm_(a_r, b)


def _chunk_pass(x, w, b, target, cw, mask, cfg, *, need, grad_out=None, stats_in=None, precompute=True):
    """One pass over the tokens. x (N, H); w (V, H), V = n_classes * d; b (V,) or None;
    target (N, d) int64, or probabilities (lead..., n_classes, out...); cw (n_classes,) acc or
    None; mask (lead..., n_classes, out...) bool (broadcast view) or None.

    Forward (stats_in None): returns (loss, stats, grads): loss the per-row losses (N, d) in
    cfg.out_dtype (reduction "none") or the sum (acc); stats (N, d, 4) acc; and, when
    `precompute`, the gradients of the loss *sum* for the inputs in `need` (x, w, b).
    Recompute (stats_in given): the gradients for grad_out, per row (N, d) for "none"; else
    those of the loss sum, bitwise the forward's (backward scales both alike).
    Gradients: dX in x's dtype, dW and db in float32 at least (cast by the caller)."""
    impl = _backend.IMPLS[cfg.backend]
    x, w, target = x.detach(), w.detach(), target.detach()  # (backward may run with create_graph)
    b = None if b is None else b.detach()
    n_rows, hidden = x.shape
    v = w.shape[0]
    acc = acc_dtype(x.dtype)
    wacc = acc_dtype(w.dtype)
    c, d = cfg.n_classes, cfg.d
    forward = stats_in is None
    grads = precompute or not forward
    need_x, need_w, need_b = need if grads else (False, False, False)
    dx = _buffer(x.shape, x.dtype, x.device) if need_x else None
    dw = None
    if need_w:  # the first chunk writes it (mm, no zero-fill), unless there is no chunk
        dw = _buffer((v, hidden), wacc, x.device) if n_rows else torch.zeros((v, hidden), dtype=wacc, device=x.device)
    db = torch.zeros((v,), dtype=wacc, device=x.device) if need_b else None
    one = torch.ones((), dtype=acc, device=x.device)
    no_denom = torch.zeros((), dtype=acc, device=x.device)  # softmax_bwd reads it for "mean" only
    if forward:
        stats = torch.empty((n_rows, d, 4), dtype=acc, device=x.device)
        loss = (torch.empty((n_rows, d), dtype=cfg.out_dtype, device=x.device) if cfg.red == 0
                else torch.zeros((), dtype=acc, device=x.device))
    # backward reads the class weight only for the smoothing term (index targets) or the
    # target term (probability targets); otherwise it is already in the row's stats
    cw_bwd = cw if (cfg.eps > 0 or cfg.prob) else None
    chunk = cfg.chunk
    buf = _buffer((min(chunk, n_rows), v), x.dtype, x.device) if n_rows else None
    for i in range(0, n_rows, chunk):
        j = min(i + chunk, n_rows)
        n = j - i
        x_c = x[i:j]
        logits = buf[:n]
        if b is None:
            torch.mm(x_c, w.t(), out=logits)
        else:
            torch.addmm(b, x_c, w.t(), out=logits)  # what F.linear runs
        l3 = logits.view(n, c, d)
        t_c = _rows(target, cfg.lead, i, j, (c, d)) if cfg.prob else target[i:j]
        m_c = _rows(mask, cfg.lead, i, j, (c, d))
        if forward:
            red = 0 if cfg.red == 0 else 2  # "mean": the sum now, divided once all chunks are in
            out, _, st = impl.ce_fwd(l3, t_c, cw, m_c, cfg.ignore_index, cfg.eps, cfg.z, cfg.cap, red,
                                     cfg.out_dtype if red == 0 else acc)
            stats[i:j] = st
            if red == 0:
                loss[i:j] = out
            else:
                loss += out
            if not grads:
                continue
            # the gradient of the chunk's loss sum, written over its logits
            impl.softmax_bwd(one, l3, t_c, cw_bwd, m_c, st, no_denom, cfg.cap, 2, l3)
        else:
            if cfg.red == 0:
                impl.softmax_bwd(grad_out[i:j], l3, t_c, cw_bwd, m_c, stats_in[i:j], no_denom, cfg.cap, 0, l3)
            else:
                impl.softmax_bwd(one, l3, t_c, cw_bwd, m_c, stats_in[i:j], no_denom, cfg.cap, 2, l3)
        if need_x:
            torch.mm(logits, w, out=dx[i:j])
        if need_w:
            _addmm_acc(dw, logits.t(), x_c, first=(i == 0))
        if need_b:
            db += logits.sum(0, dtype=wacc)
    del buf
    if forward:
        return loss, stats, (dx, dw, db)
    return dx, dw, db


def _denominator(stats: Tensor, target: Tensor, cw: Optional[Tensor], prob: bool) -> Tensor:
    """The "mean" denominator, as ce_fwd's denom: weight[target] (1 without a class weight or
    with probability targets) summed over the counted rows. A row is counted unless its
    gradient is exactly 0 by rule (ignored, empty, out of range), which its stats mark with
    lse = -inf (csrc/ops.cpp)."""
    counted = stats[..., 0] != float("-inf")  # (N, d)
    if cw is None or prob:
        return counted.sum(dtype=stats.dtype)
    t = torch.where(counted, target, torch.zeros_like(target))  # ignore_index may be negative
    return torch.where(counted, cw[t], torch.zeros((), dtype=cw.dtype, device=cw.device)).sum(dtype=stats.dtype)


# ----------------------------------------------------------------------------- autograd
class _LinearCrossEntropyFn(torch.autograd.Function):
    """Forward runs the chunked pass once: the loss and, for "mean" / "sum" with gradients
    wanted, the gradients of the loss sum (the step's matmuls, done once). Backward scales
    them by grad_output (/ denominator) on the device, in place: the tensors handed out are
    the saved ones (own version counters), so a step holds one copy of dX, dW, db. "none", and
    a second backward through the same graph, recompute chunk by chunk instead. Everything
    backward reads is in save_for_backward; ctx holds scalars only."""

    @staticmethod
    def forward(ctx, x, w, b, target, cw, mask, cfg):
        need = tuple(ctx.needs_input_grad[:3])
        precompute = cfg.red != 0 and cfg.grad and any(need)  # (needs_input_grad ignores no_grad)
        loss, stats, (dx, dw, db) = _chunk_pass(x, w, b, target, cw, mask, cfg, need=need, precompute=precompute)
        denom = _denominator(stats, target, cw, cfg.prob) if cfg.red == 1 else None
        if cfg.red == 1:
            safe = torch.where(denom != 0, denom, torch.ones_like(denom))
            loss = torch.where(denom != 0, loss / safe, torch.zeros_like(loss))  # SPEC rule 6
        ctx.save_for_backward(x, w, b, target, cw, mask, stats, denom, dx, dw, db)
        ctx.cfg, ctx.precomputed, ctx.used = cfg, precompute, False
        return loss.to(cfg.out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # the matmuls in the saved dtypes
            return _LinearCrossEntropyFn._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, w, b, target, cw, mask, stats, denom, dx, dw, db = ctx.saved_tensors
        cfg = ctx.cfg
        need = tuple(ctx.needs_input_grad[:3])
        if cfg.red == 0:  # per-row grad_output: recompute, the op scaling each row
            g = grad_out.detach().reshape(stats.shape[:2])
            dx, dw, db = _chunk_pass(x, w, b, target, cw, mask, cfg, need=need, grad_out=g, stats_in=stats)
            grads = (dx, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype))
        else:
            if not ctx.precomputed or ctx.used:  # a second backward: the same gradients again
                dx, dw, db = _chunk_pass(x, w, b, target, cw, mask, cfg, need=need, stats_in=stats)
            ctx.used = True
            scale = grad_out.detach().to(stats.dtype)
            if cfg.red == 1:  # grad_output / denominator, 0 when nothing was counted
                safe = torch.where(denom != 0, denom, torch.ones_like(denom))
                scale = torch.where(denom != 0, scale / safe, torch.zeros_like(scale))
            grads = tuple(_scaled(g, scale, like) for g, like in zip((dx, dw, db), (x, w, b)))
        grads = tuple(None if g is None else _input_grad(g) for g in grads)
        want_y, want_w = cfg.prob and ctx.needs_input_grad[3], cfg.prob and ctx.needs_input_grad[4]
        g_y = g_w = None
        if want_y or want_w:
            g_y, g_w = _soft_grads(x, w, b, target, cw, mask, stats, denom, grad_out.detach(), cfg, want_y, want_w)
        return grads + (g_y, g_w, None, None)


def _soft_grads(x, w, b, target, cw, mask, stats, denom, grad_out, cfg, want_y, want_w):
    """Gradients to probability targets (their shape) and to the class weight (C,), as PyTorch
    gives them (distillation), from the logits recomputed chunk by chunk: one more x @ W.T
    pass, only when a soft target or its weight requires grad (formulas:
    fusedloss.functional._soft_target_grads, applied to each chunk)."""
    n_rows = x.shape[0]
    c, d = cfg.n_classes, cfg.d
    acc = stats.dtype
    g_y = torch.empty(target.shape, dtype=target.dtype, device=x.device) if want_y else None
    g_w = torch.zeros_like(cw) if want_w else None
    den = denom if denom is not None else torch.zeros((), dtype=acc, device=x.device)
    target, cw_d = target.detach(), None if cw is None else cw.detach()
    chunk = cfg.chunk
    buf = _buffer((min(chunk, n_rows), w.shape[0]), x.dtype, x.device) if n_rows else None
    for i in range(0, n_rows, chunk):
        j = min(i + chunk, n_rows)
        logits = buf[: j - i]
        if b is None:
            torch.mm(x[i:j], w.t(), out=logits)
        else:
            torch.addmm(b, x[i:j], w.t(), out=logits)
        go = grad_out[i:j] if cfg.red == 0 else grad_out
        gy, gw = _soft_target_grads(go, logits.view(j - i, c, d), _rows(target, cfg.lead, i, j, (c, d)), cw_d,
                                    _rows(mask, cfg.lead, i, j, (c, d)), stats[i:j], den, cfg.eps, cfg.cap, cfg.red,
                                    want_y, want_w)
        if want_y:
            g_y.view(n_rows, c, d)[i:j] = gy
        if want_w:
            g_w += gw
    return g_y, g_w


def _scaled(g: Optional[Tensor], scale: Tensor, like: Optional[Tensor]) -> Optional[Tensor]:
    """g * scale as like's gradient, computed in place (g is the saved buffer, which a second
    backward does not read: it recomputes). Where g has like's dtype it is handed out itself,
    under a version counter of its own (`.data`), so that the caller's changes to .grad do not
    trip autograd's check of the saved copy, and AccumulateGrad can take it without a copy.
    Half-precision dX: the product in float32, rounded once; a float32 dW or db of a
    half-precision weight: scaled in place, then rounded once to like's dtype."""
    if g is None:
        return None
    g = g if torch.compiler.is_compiling() else g.data
    if g.dtype != like.dtype:
        return g.mul_(scale).to(like.dtype)
    if g.dtype == scale.dtype:
        return g.mul_(scale)
    return g.copy_(g.to(scale.dtype).mul_(scale))


# ----------------------------------------------------------------------------- public
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    options=None,
    mask: Optional[Tensor] = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Cross-entropy of F.linear(input, linear_weight, linear_bias) without holding the logits.

    Equals ``fusedloss.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``
    (every rule of SPEC section 2), with gradients to input, linear_weight and linear_bias,
    and has the signature of torch.nn.functional.linear_cross_entropy (torch 2.13) plus the
    cross-entropy extras.

    input (H,), (N, H) or (B, T, H) (any leading dims); linear_weight (V, H), or
    (C, d1..dK, H) for a K-dimensional loss (2-D input only); linear_bias (V,) or (C, d1..dK);
    target class indices of input.shape[:-1] (+ (d1..dK)), int64/int32, or class probabilities
    of the logits' shape; weight (C,) class weight; mask bool, broadcastable to the logits'
    shape (True = class allowed). options: a torch.nn.LinearCrossEntropyOptions whose
    batch_chunk_size (or aspect-ratio chunking_method) sets the rows per chunk; without it a
    chunk's logits take at most 128 MiB on the CPU, 256 MiB on a GPU. ignore_index=None
    means -100, as in torch. Results have the input's dtype (PyTorch's promotion with
    floating targets); "none" returns input.shape[:-1] (+ (d1..dK)).
    """
    return _linear_cross_entropy(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options,
        mask, z_loss, softcap, backend, None,
    )


def _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                          label_smoothing, options, mask, z_loss, softcap, backend, out_dtype):
    """linear_cross_entropy with an explicit loss dtype (None: PyTorch's); fusedloss.hf asks
    for float32, the dtype transformers' loss has."""
    _check_reduction(reduction)
    _check_float("input", input)
    _check_float("linear_weight", linear_weight)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        # as eager under autocast: F.linear runs in the autocast dtype (float32 operands are
        # cast, float64 ones are not), cross_entropy in float32 (a float32 loss)
        low = torch.get_autocast_dtype(device_type)
        cast = lambda t: t.to(low) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
        with torch.autocast(device_type, enabled=False):
            return _linear_cross_entropy(
                cast(input), cast(linear_weight), target, cast(linear_bias), weight, reduction, ignore_index,
                label_smoothing, options, mask, z_loss, softcap, backend,
                out_dtype or (torch.float32 if input.dtype != torch.float64 else None),
            )
    _check_device("linear_weight", linear_weight, input)
    if input.dim() < 1:
        raise ValueError(f"input must have at least 1 dimension (in_features,), got shape {tuple(input.shape)}")
    if linear_weight.dim() < 2:
        raise ValueError(
            f"linear_weight must have at least 2 dimensions (num_classes, in_features), "
            f"got shape {tuple(linear_weight.shape)}"
        )
    hidden = input.shape[-1]
    if linear_weight.shape[-1] != hidden:
        raise ValueError(
            f"linear_weight's in_features (last dim) must equal input's hidden size (last dim): "
            f"input {tuple(input.shape)} has {hidden}, "
            f"linear_weight {tuple(linear_weight.shape)} has {linear_weight.shape[-1]}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight must have input's dtype {input.dtype}, got {linear_weight.dtype}")
    n_classes = linear_weight.shape[0]
    out_feat = tuple(linear_weight.shape[1:-1])  # (d1..dK) of a K-dimensional loss
    if out_feat and input.dim() != 2:
        raise ValueError(
            f"a K-dimensional loss (linear_weight of shape {tuple(linear_weight.shape)}) needs a batched input "
            f"(N, {hidden}), got input of shape {tuple(input.shape)}"
        )
    if linear_bias is not None:
        _check_float("linear_bias", linear_bias)
        _check_device("linear_bias", linear_bias, input)
        if tuple(linear_bias.shape) != (n_classes,) + out_feat:
            raise ValueError(
                f"linear_bias must have shape {(n_classes,) + out_feat} (linear_weight's out dims), "
                f"got {tuple(linear_bias.shape)}"
            )
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias must have input's dtype {input.dtype}, got {linear_bias.dtype}")
    softcap = _check_ce_args(input, target, label_smoothing, softcap)
    ignore_index = -100 if ignore_index is None else int(ignore_index)

    lead = tuple(input.shape[:-1])
    n_rows = math.prod(lead)
    d = math.prod(out_feat)
    logits_shape = lead + (n_classes,) + out_feat
    loss_shape = lead + out_feat
    prob = target.dtype.is_floating_point
    if prob:  # class probabilities, the logits' shape
        if tuple(target.shape) != logits_shape:
            raise ValueError(
                f"probability target must have the logits' shape {logits_shape}, got {tuple(target.shape)}"
            )
        t = target.to(input.dtype)  # differentiable: soft targets get a gradient, as in PyTorch
        t_lead = lead if lead else (1,)
        t = t.reshape(t_lead + (n_classes,) + out_feat)
    elif target.dtype in INDEX_DTYPES:
        if tuple(target.shape) != loss_shape:
            raise ValueError(
                f"Expected target of shape {loss_shape} (input's leading dims{' + the K dims' if out_feat else ''}) "
                f"for input {tuple(input.shape)} and linear_weight {tuple(linear_weight.shape)}, "
                f"got {tuple(target.shape)}"
            )
        t = target.detach().to(torch.int64).reshape(n_rows, d)
    else:
        raise TypeError(f"target must be int64/int32 class indices or floating class probabilities; got {target.dtype}")
    # a class weight gets a gradient with probability targets (PyTorch gives one), and is
    # refused one with class indices (PyTorch refuses it)
    cw = _class_weight("weight", weight, input, n_classes, differentiable=prob)
    m = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = getattr(mask, "dtype", type(mask).__name__)
            raise TypeError(f"mask must be a bool Tensor (True = class allowed), got {got}")
        _check_device("mask", mask, input)
        try:
            ok = torch.broadcast_shapes(mask.shape, logits_shape) == logits_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} is not broadcastable to the logits' shape {logits_shape}"
            )
        m = mask.expand(logits_shape).reshape((lead if lead else (1,)) + (n_classes,) + out_feat)

    if out_dtype is None:
        out_dtype = torch.promote_types(input.dtype, target.dtype) if prob else input.dtype
    x = input.reshape(n_rows, hidden)
    w = linear_weight.reshape(n_classes * d, hidden)
    b = None if linear_bias is None else linear_bias.reshape(n_classes * d)
    cfg = _Cfg(
        n_classes=n_classes, d=d, lead=lead if lead else (1,), ignore_index=ignore_index, eps=float(label_smoothing),
        z=float(z_loss), cap=float(softcap or 0.0), red=REDUCTION_CODES[reduction], out_dtype=out_dtype,
        chunk=_chunk_rows_of(options, n_rows, hidden, n_classes * d, input.dtype, input.device),
        backend=_backend.resolve(backend, input.device).name, prob=prob, grad=torch.is_grad_enabled(),
    )
    out = _LinearCrossEntropyFn.apply(x, w, b, t, cw, m, cfg)
    return out.reshape(loss_shape) if reduction == "none" else out
