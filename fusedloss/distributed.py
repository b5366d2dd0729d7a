"""Vocab-parallel cross-entropy: the loss of logits whose classes are split across the ranks
of a torch.distributed group (SPEC section 10), as a tensor-parallel LLM head produces them.

    # rank r holds logits[:, start_r : start_r + C_r] (a ColwiseParallel lm_head's output)
    loss = fusedloss.distributed.vocab_parallel_cross_entropy(local_logits, labels)
    # == fusedloss.cross_entropy(full_logits, labels) on every rank; backward gives each rank
    #    the gradient of its own slice

Each rank runs the same fused kernel as `cross_entropy` on its slice (op `ce_fwd`, any
backend), which reads the slice once and gives, per row, the partial statistics the merge
needs: the slice's log-sum-exp lse_r over its allowed classes (-inf when it has none), and
from the same pass the owner's target term and, with label smoothing, the slice's |A_r|,
W_r = sum_{A_r} w_c and S_r = sum_{A_r} w_c (lse_r - z_c). One all-gather of those few
numbers per row (not three all-reduces of the logits' reductions, as Megatron-core and
PyTorch's loss_parallel do) gives every rank every slice's statistics, and every rank merges
them in the same fixed order (bitwise the same loss on every rank):
    lse      = logsumexp_r lse_r                                   (-inf: the row is empty)
    target   = (1 - eps) w_t (lse - z_t)  = (1 - eps) w_t (lse - lse_o) + T_o
               (o: the rank that owns t; T_o its target term, the kernel's own rounding)
    smoothing  eps / |A| * sum_r (S_r + W_r (lse - lse_r)),  |A| = sum_r |A_r|
    z-loss     z_loss * w_t * lse^2
so label smoothing spreads over the global allowed set and the z-loss sees the global
log-sum-exp (Megatron's smoothing uses the local vocabulary: a different loss per rank).
Backward needs no communication: the merged per-row statistics [lse, coef_p, smooth,
target_coef] are the ones `softmax_bwd` takes, with target_coef 0 on the ranks that do not
own the target, so each rank writes its slice's gradient from its own logits.

Collectives: forward 1 all-gather, plus a 2-integer all-gather of the slice sizes when
vocab_start_index is not given (the ranks' offsets); backward none. Nothing syncs with the
host on a GPU: bad input that needs the data to detect (a target outside every rank's
slice, slices that overlap or leave a gap, N differing between ranks) raises on the CPU
(IndexError / ValueError, on every rank alike, after the collective) and makes the loss NaN
on a GPU.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fusedloss import _backend, _ops
from fusedloss._ops import REDUCTION_CODES, acc_dtype
from fusedloss.functional import (
    INDEX_DTYPES,
    _check_ce_args,
    _check_class_mask,
    _check_class_target,
    _check_float,
    _check_reduction,
    _class_mask,
    _class_weight,
    _index_rows,
    _input_grad,
    _rows3,
    out_dtype_of,
)
from fusedloss.reference import _reduce, _times

__all__ = ["vocab_parallel_cross_entropy"]

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- collectives
def _group_info(group):
    """(world size, rank) of the group; (1, 0) without an initialized process group (one
    process holding the whole vocabulary)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("fusedloss: a process group was given but torch.distributed is not initialized")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather(local: Tensor, world: int, group) -> Tensor:
    """(world, *local.shape): every rank's `local`, in rank order. One collective."""
    if world == 1:
        return local.unsqueeze(0)
    local = local.contiguous()
    out = local.new_empty((world * local.shape[0],) + tuple(local.shape[1:]))  # the concatenation (gloo)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
    gather(out, local, group=group)
    return out.view((world,) + tuple(local.shape))


# ----------------------------------------------------------------------------- per-row merge
class _Fields:
    """Columns of the per-row payload each rank sends (acc dtype), in order."""

    def __init__(self, weighted: bool, smoothing: bool):
        names = ["lse", "target", "own"] + (["w_t"] if weighted else []) + (["n", "w_sum", "s"] if smoothing else [])
        self.index = {n: i for i, n in enumerate(names)}
        self.k = len(names)


def _partial_stats(impl, x, t_local, own, ignored, w, mask, eps, cap, fields):
    """This rank's payload (R + 1, k): per row the partial statistics of its slice (one pass
    of the fused ce_fwd over the slice), then one row [start placeholder, C_r]. x (N, C, D);
    t_local (N, D) the target's index in this slice (meaningful where own)."""
    acc = acc_dtype(x.dtype)
    n, c, d = x.shape
    zero = x.new_zeros((n, d), dtype=acc)
    if c == 0:  # an empty slice: no allowed class on any row
        loss, lse, coef_p, smooth = zero, torch.full_like(zero, _NEG_INF), zero, zero
    else:
        # the kernel's target: the owned index where this rank owns it, 0 elsewhere (its
        # term is discarded), -1 = "ignored" (skipped) for ignored rows. With smoothing the
        # kernel runs at eps = 1: no target term at all, the row's loss is S_r / |A_r|.
        t_call = torch.where(own, t_local, torch.zeros_like(t_local))
        t_call = torch.where(ignored, torch.full_like(t_call, -1), t_call)
        loss, _, stats = impl.ce_fwd(x, t_call, w, mask, -1, 1.0 if eps > 0 else 0.0, 0.0, cap, 0, acc)
        lse, coef_p, smooth, _ = stats.unbind(-1)  # (N, D)
    live = lse != _NEG_INF
    cols = [None] * fields.k
    cols[fields.index["lse"]] = lse
    cols[fields.index["own"]] = own.to(acc)
    w_t = None
    if "w_t" in fields.index:
        w_t = w.gather(0, t_call.clamp_min(0).flatten()).view(n, d) if c > 0 else zero
        cols[fields.index["w_t"]] = torch.where(own, w_t, zero)
    coef_t = (1.0 - eps) * (w_t if w_t is not None else torch.ones_like(lse))
    if eps == 0:
        target = loss  # w_t (lse_r - z_t) as the kernel rounds it; +inf for a masked target
    else:
        # the target term (1 - eps) w_t (lse_r - z_t) from the target logit (the loss is
        # >= eps (lse - mean z) here, never a small difference of large numbers)
        idx = t_call.clamp_min(0).unsqueeze(1) if c > 0 else None  # (N, 1, D)
        z_t = x.gather(1, idx).squeeze(1).to(acc) if c > 0 else zero
        if cap > 0:
            z_t = cap * torch.tanh(z_t / cap)
        allowed_t = z_t != _NEG_INF
        if mask is not None and c > 0:
            allowed_t = allowed_t & mask.gather(1, idx).squeeze(1)
        z_t = torch.where(allowed_t, z_t, torch.full_like(z_t, _NEG_INF))
        target = _times(coef_t, lse - z_t)
        safe = torch.where(live & (smooth != 0), smooth, torch.ones_like(smooth))
        cols[fields.index["n"]] = torch.where(live, 1.0 / safe, zero)  # smooth = 1 / |A_r|
        cols[fields.index["w_sum"]] = torch.where(live, coef_p / safe, zero)  # coef_p = W_r / |A_r|
        cols[fields.index["s"]] = torch.where(live, loss / safe, zero)  # loss = S_r / |A_r|
    # the owner's slice holds no allowed class: the target is masked (loss +inf, rule 4)
    target = torch.where(own & ~live, _times(coef_t, torch.full_like(lse, float("inf"))), target)
    cols[fields.index["target"]] = torch.where(own, target, zero)
    rows = torch.stack(cols, dim=-1).reshape(n * d, fields.k)
    meta = rows.new_zeros((1, fields.k))
    meta[0, 1] = c
    return torch.cat([rows, meta])


def _merge(gathered, t, ignore_index, own_local, eps, z_loss, fields, weighted, acc):
    """Every rank's payload (world, R + 1, k) -> (loss (N, D), count (N, D), stats (N, D, 4)
    for this rank, tiles (): the slices tile [0, V), out_of_range (N, D): no rank (or more than
    one) owns the target, starts and sizes (world,) of the slices). float64 arithmetic, the
    same on every rank."""
    world = gathered.shape[0]
    n, d = t.shape
    g = gathered.to(torch.float64)
    meta, g = g[:, -1], g[:, :-1].reshape(world, n, d, fields.k)
    col = lambda name: g[..., fields.index[name]]  # noqa: E731 -- (world, N, D)

    # slices: rank r holds [start_r, start_r + C_r); they must tile [0, V)
    sizes = meta[:, 1]
    starts = meta[:, 0]
    order = torch.argsort(starts, stable=True)
    s_sorted, e_sorted = starts[order], (starts + sizes)[order]
    tiles = (s_sorted[0] == 0) & (s_sorted[1:] == e_sorted[:-1]).all()

    lse_r = col("lse")
    lse = torch.logsumexp(lse_r, 0)  # (N, D); -inf on every rank gives -inf, NaN stays
    own = col("own")
    n_own = own.sum(0)
    lse_o = torch.where(own != 0, lse_r, torch.zeros_like(lse_r)).sum(0)
    target_term = col("target").sum(0)  # only the owner's is non-zero
    w_t = col("w_t").sum(0) if weighted else torch.ones_like(lse)
    coef_t = (1.0 - eps) * w_t
    loss = _times(coef_t, lse - lse_o) + target_term
    coef_p = coef_t.clone()
    smooth = torch.zeros_like(lse)
    if eps > 0:
        n_allowed = col("n").sum(0)
        w_allowed = col("w_sum").sum(0)
        live_r = lse_r != _NEG_INF
        s = torch.where(live_r, col("s") + _times(col("w_sum"), lse.unsqueeze(0) - lse_r), torch.zeros_like(lse_r)).sum(0)
        smooth = eps / torch.where(n_allowed > 0, n_allowed, torch.ones_like(n_allowed))
        loss = loss + smooth * s
        coef_p = coef_p + smooth * w_allowed
    if z_loss != 0:
        loss = loss + _times(z_loss * w_t, lse * lse)
        coef_p = coef_p + 2 * z_loss * w_t * lse
    loss = torch.where(torch.isnan(lse), lse, loss)  # rule 8: NaN stays, whatever w_t is

    ignored = t == ignore_index
    out_of_range = ~ignored & (n_own != 1)  # no rank owns t (or slices overlap)
    counted = ~ignored & ~out_of_range & (lse != _NEG_INF)
    zero = torch.zeros_like(lse)
    bad = out_of_range | ~tiles
    loss = torch.where(counted, loss, zero)
    loss = torch.where(bad & ~ignored, torch.full_like(loss, float("nan")), loss)
    count = torch.where(counted & ~bad, w_t, zero)
    live = counted & ~bad
    target_coef = torch.where(own_local, coef_t, zero)
    # [-inf, 0, 0, 0] for rows whose gradient is 0 (no host-to-device constant: no sync)
    cols = [torch.where(live, v, torch.full_like(v, _NEG_INF if i == 0 else 0.0))
            for i, v in enumerate((lse, coef_p, smooth, target_coef))]
    stats = torch.stack(cols, dim=-1).to(acc)
    return loss, count, stats, tiles, out_of_range, starts, sizes


def _check_on_host(t, out_of_range, tiles, starts, sizes, ignore_index):
    """The bad inputs only the gathered data shows, raised where it is on the host already
    (CPU tensors; on every rank alike: every rank has the same gathered data)."""
    if not bool(tiles):
        slices = ", ".join(f"rank {r}: [{int(s)}, {int(s + c)})" for r, (s, c) in enumerate(zip(starts, sizes)))
        raise ValueError(f"fusedloss: the ranks' vocabulary slices do not tile [0, V) (vocab_start_index and input.shape[1]): {slices}")
    if bool(out_of_range.any()):
        bad = int(t[out_of_range][0])
        vocab = int((starts + sizes).max())
        raise IndexError(
            f"Target {bad} is out of bounds: it is in no rank's vocabulary slice; expected a class index in "
            f"[0, {vocab}) or ignore_index={ignore_index}"
        )


# ----------------------------------------------------------------------------- autograd
class _VocabParallelFn(torch.autograd.Function):
    """Forward: one ce_fwd pass over this rank's slice, one all-gather, the merge. Backward:
    softmax_bwd over the slice from the merged statistics, no communication."""

    @staticmethod
    def forward(ctx, x, t, w, mask, start, cfg):
        group, world, ignore_index, eps, z_loss, cap, red, out_dtype, backend = cfg
        impl = _backend.IMPLS[backend]
        acc = acc_dtype(x.dtype)
        n, c, d = x.shape
        ignored = t == ignore_index
        t_local = t - start
        own = ~ignored & (t_local >= 0) & (t_local < c)
        fields = _Fields(w is not None, eps > 0)
        payload = _partial_stats(impl, x, t_local, own, ignored, w, mask, eps, cap, fields)
        payload[-1, 0] = start
        gathered = _all_gather(payload, world, group)
        loss, count, stats, tiles, oor, starts, sizes = _merge(
            gathered, t, ignore_index, own, eps, z_loss, fields, w is not None, acc
        )
        if x.device.type == "cpu":
            _check_on_host(t, oor, tiles, starts, sizes, ignore_index)
        out, denom = _reduce(loss.unsqueeze(1), count.unsqueeze(1), red, out_dtype)  # "mean" of nothing: 0
        t_bwd = torch.where(own, t_local, torch.zeros_like(t_local))  # target_coef is 0 where not owned
        ctx.save_for_backward(x, t_bwd, w if eps > 0 else None, mask, stats, denom.to(acc))
        ctx.cap, ctx.red, ctx.backend = cap, red, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, t_bwd, w, mask, stats, denom = ctx.saved_tensors
        grad = _ops.empty_grad(x)
        if x.shape[1] > 0:
            _backend.IMPLS[ctx.backend].softmax_bwd(grad_out, x, t_bwd, w, mask, stats, denom, ctx.cap, ctx.red, grad)
        return _input_grad(grad), None, None, None, None, None


def _from_dtensors(input, target, weight, mask, group):
    """A DTensor input sharded along the classes (a ColwiseParallel head with
    use_local_output=False) is taken as its local slice, its mesh's group as the group
    (its gradient flows back as a DTensor of the same placements); DTensor target, weight,
    mask as their local tensors."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without distributed tensors
        return input, target, weight, mask, group
    if isinstance(input, DTensor):
        class_dim = 1 if input.dim() >= 2 else 0
        placements = input.placements
        if input.device_mesh.ndim != 1 or not (
            isinstance(placements[0], Shard) and placements[0].dim % input.dim() in (class_dim, input.dim() - 1)
        ):
            raise ValueError(
                f"fusedloss: a DTensor input must be sharded along its class dimension on a 1-D mesh, got {placements}"
            )
        if placements[0].dim % input.dim() != class_dim:
            raise ValueError(
                f"fusedloss: the DTensor input is sharded along dim {placements[0].dim}, but the classes are dim "
                f"{class_dim} (as in cross_entropy): flatten (B, T, V) logits to (B * T, V) first"
            )
        group = input.device_mesh.get_group() if group is None else group
        input = input.to_local()
    target, weight, mask = (v.to_local() if isinstance(v, DTensor) else v for v in (target, weight, mask))
    return input, target, weight, mask, group


# ----------------------------------------------------------------------------- public
def vocab_parallel_cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    vocab_start_index: Optional[int] = None,
    group=None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    mask: Optional[Tensor] = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Cross-entropy of logits split by class across the ranks of `group` (default: the
    default process group; without an initialized one, a single process holding every class).

    input (C_r,), (N, C_r) or (N, C_r, d1..dK): this rank's classes [vocab_start_index,
    vocab_start_index + C_r) of the logits (uneven slices allowed). vocab_start_index None:
    the ranks hold consecutive slices in rank order (their sizes are exchanged, one more
    small collective). target: global class indices, the same on every rank. weight (C_r,)
    and mask (broadcastable to input): sliced like input. Everything else as
    fusedloss.cross_entropy with class-index targets. Returns the loss of the full logits,
    the same on every rank; its backward gives input the gradient of this rank's slice.
    """
    _check_reduction(reduction)
    input, target, weight, mask, group = _from_dtensors(input, target, weight, mask, group)
    _check_float("input", input)
    if input.dim() < 1:
        raise ValueError(f"input must have at least 1 dimension (C,), got shape {tuple(input.shape)}")
    softcap = _check_ce_args(input, target, label_smoothing, softcap)
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must be int64/int32 class indices (global, the same on every rank); got {target.dtype}")
    target_shape = _check_class_target(input, target)
    n_local = input.shape[1] if input.dim() >= 2 else input.shape[0]
    w = _class_weight("weight", weight, input, n_local)
    _check_class_mask(mask, input)
    world, rank = _group_info(group)
    x = _rows3(input)
    t = _index_rows(target, x)
    m = _class_mask(mask, input)
    if vocab_start_index is None:
        # every rank's (C_r, rows): the offsets, and a row count that differs between ranks
        # (which would make the payload's all-gather fail or hang) caught on every rank
        local = torch.empty(2, dtype=torch.int64, device=input.device)  # filled on the device: no copy, no sync
        local[0], local[1] = n_local, t.numel()
        sizes = _all_gather(local, world, group)
        start = (sizes[:, 0].cumsum(0) - sizes[:, 0])[rank]
        if input.device.type == "cpu" and bool((sizes[:, 1] != t.numel()).any()):
            raise ValueError(
                f"fusedloss: the ranks hold different numbers of rows (input.shape without the class dim): "
                f"{sizes[:, 1].tolist()}; every rank needs the same rows, with its own slice of the classes"
            )
    else:
        if not isinstance(vocab_start_index, int) or isinstance(vocab_start_index, bool) or vocab_start_index < 0:
            raise ValueError(f"vocab_start_index must be a non-negative int or None, got {vocab_start_index!r}")
        start = vocab_start_index
    name = _backend.resolve(backend, input.device).name
    red = REDUCTION_CODES[reduction]
    cfg = (group, world, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0), red,
           out_dtype_of(input), name)
    out = _VocabParallelFn.apply(x, t, w, m, start, cfg)
    return out.reshape(target_shape) if reduction == "none" else out
