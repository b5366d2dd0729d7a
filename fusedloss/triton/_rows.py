"""Row machinery shared by the softmax losses (cross_entropy.py, focal.py, softmax_bwd.py).

A *row* is one sample's C logits: for a canonical (N, C, D) view, row r = (n, d) with
n = r // D, d = r % D, and class c at n * stride_n + c * stride_c + d * stride_d. Every
offset is formed in int64: with N * C > 2^31 (e.g. 16k tokens x 256k vocabulary)
`row * stride` overflows int32.

The helpers here are the pieces every row kernel needs, written once:
  * `_row_base`      -- int64 offset of a row's first class in a strided (N, C, D) tensor
  * `_row_kind`      -- ignored / out-of-range classification of a class-index target
  * `_logit_tile`    -- masked load of a tile of classes: logits in acc dtype, the "allowed"
                        predicate (mask True and logit != -inf), softcapped logits z and dz/dx
  * `_online_merge`  -- merges a tile into a running (max, sum exp) pair, -inf safe
  * `_relative_sum`  -- a running sum of w_c (z_c - max) that follows the running max
  * `_row_lse`       -- log-sum-exp of the merged pair, NaN when the row held a NaN
  * `_fold_lse_rounding` -- the float32 lse's rounding, folded into coef_p
  * `_store_stats`   -- the four per-row numbers backward reads (csrc/ops.cpp)
  * `_position_block`, `_position_targets`, `_store_stats_block` -- the same for the K-dim
                        kernels, whose program holds a block of positions (rows), not one row
  * `_class_tile`    -- the class indices of a K-dim forward step, in class groups
  * `_merge_groups`, `_merge_relative` -- a K-dim forward's class groups merged per position
  * `_pow`           -- q ** gamma with the focal conventions (q^0 = 1)
  * `_expm1`         -- accurate exp(x) - 1 (tl has no expm1 on every version)
  * `_scalar`        -- a float64 scalar argument in the accumulation dtype
and, for the launchers, `_reduce_rows`: the deterministic reduction of per-row (or
per-program) losses into the "mean" / "sum" output, one single-program launch.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _expm1(x):
    # exp(x) - 1 loses every digit for |x| << 1. Kahan's trick: with u = exp(x) rounded,
    # (u - 1) * x / log(u) cancels the rounding error of u (log(u) sees the same error).
    # u == 1 means |x| is below half an ulp: expm1(x) == x. Large |x|: u - 1 is exact enough
    # and log(u) would be -inf at u == 0.
    u = tl.exp(x)
    um1 = u - 1.0
    small = tl.where(um1 == 0.0, x, um1 * x / tl.log(u))
    return tl.where(tl.abs(x) < 0.5, small, um1)


@triton.jit
def _softcap(x, cap, inv_cap):
    """z = cap * tanh(x / cap) and dz/dx = 1 - tanh(x / cap)^2, both accurate for every x
    (inv_cap = 1 / cap, one division per tile rather than one per element).

    With a = |x| / cap and e = exp(-2a) (in (0, 1], never overflows):
        tanh(a)     = (1 - e) / (1 + e) = -expm1(-2a) / (2 + expm1(-2a))
        1 - tanh^2  = 4e / (1 + e)^2
    expm1 keeps tanh accurate for tiny a; at large a, e -> 0, tanh -> 1, dz/dx -> 0.
    """
    a = tl.abs(x) * inv_cap
    em1 = _expm1(-2.0 * a)
    t = -em1 / (2.0 + em1)
    t = tl.where(x < 0, -t, t)
    e = em1 + 1.0
    return cap * t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _scalar(v, ACC: tl.constexpr):
    """A float64 scalar argument in ACC. Written as a product, not tl.cast: under
    TRITON_INTERPRET=1 the argument arrives as a Python float, which tl.cast would round
    through float32 (1.5e-9 relative error in eps = 0.1, beyond float64 tolerances)."""
    return (tl.full([], 1.0, ACC) * v).to(ACC)


@triton.jit
def _row_base(row, D, stride_n, stride_d):
    """int64 offset of class 0 of row `row` = (n, d) in a strided (N, C, D) tensor. The
    row index and D fit in int32 (a grid dimension does), so n and d are found in int32 (a
    64-bit division is a slow subroutine with a stack frame) and widened before the
    multiplications, which can overflow int32."""
    n = row // D
    d = row - n * D
    return n.to(tl.int64) * stride_n + d.to(tl.int64) * stride_d


@triton.jit
def _row_kind(t, ignore_index, C):
    """(ignored, out_of_range) for class-index target t. Ignored is checked first:
    ignore_index may be negative or >= C, so it must be gated before any range check."""
    ignored = t == ignore_index
    out_of_range = ((t < 0) | (t >= C)) & (t != ignore_index)
    return ignored, out_of_range


@triton.jit
def _logit_tile(
    x_row_ptr,  # logits of this row (offset of class 0 already added)
    mask_row_ptr,  # mask of this row, or None
    cols,  # (BLOCK_C,) int class indices of the tile
    load_ok,  # (BLOCK_C,) bool: in bounds and the row needs its logits
    stride_c,  # logits class stride
    stride_mc,  # mask class stride (0 when the mask broadcasts over classes)
    softcap,  # cap > 0 (read only with HAS_SOFTCAP)
    HAS_SOFTCAP: tl.constexpr,  # apply the softcap
    ACC: tl.constexpr,  # accumulation dtype
):
    """Returns (x, allowed, z, dzdx) for a tile, in ACC.

    allowed = in bounds, mask True and x != -inf. z = softcap(x) where allowed, -inf where
    masked (the softmax treats masked classes as -inf); dzdx = 1 where no softcap.
    A NaN logit is allowed (NaN != -inf) and flows into z, so it reaches the row's sum; a
    NaN at a masked position is masked like any other value.
    """
    cols64 = cols.to(tl.int64)
    x = tl.load(x_row_ptr + cols64 * stride_c, mask=load_ok, other=float("-inf")).to(ACC)
    allowed = load_ok & (x != float("-inf"))
    if mask_row_ptr is not None:
        allowed = allowed & (tl.load(mask_row_ptr + cols64 * stride_mc, mask=load_ok, other=0) != 0)
    z = x
    dzdx = tl.full(x.shape, 1.0, ACC)
    if HAS_SOFTCAP:
        cap = _scalar(softcap, ACC)
        z, dzdx = _softcap(x, cap, 1.0 / cap)
    z = tl.where(allowed, z, float("-inf"))
    return x, allowed, z, dzdx


@triton.jit
def _online_merge(m, s, z):
    """Online softmax: (m, s) with s = sum exp(z_seen - m) merged with tile z.

    exp(-inf - (-inf)) is NaN, so while every class seen so far is masked the reference
    point is 0 (the sum stays exactly 0 and m stays -inf). A NaN in z makes s NaN; the
    max itself may drop NaN (GPU max does), which is why NaN is tracked separately.
    """
    m_new = tl.maximum(m, tl.max(z, 0))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - ref) + tl.sum(tl.exp(z - ref), 0)
    return m_new, s


@triton.jit
def _relative_sum(total, weight, m_old, m_new, w, z):
    """Running S = sum w_c (z_c - ref) over the tiles seen, ref the running max (0 while it
    is -inf), merged with one tile; `weight` = sum w_c over the earlier tiles, m_old / m_new
    the running max before / after this tile.

    Summed raw, sum w_c z_c cancels against lse * sum w_c in the loss: on a confident float32
    row (logits ~30, 128k classes) that loses most digits of a small loss. Relative to the
    max every term is small, and moving the reference from ref_old to ref_new shifts S by
    weight * (ref_old - ref_new). A term with w_c == 0 is 0 even at z_c = -inf (0 log 0 = 0);
    w_c != 0 at a masked class makes S -inf, as it must (loss +inf)."""
    ref_old = tl.where(m_old == float("-inf"), 0.0, m_old)
    ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(weight == 0, 0.0, weight * (ref_old - ref_new))
    return total + shift + tl.sum(tl.where(w != 0, w * (z - ref_new), 0.0), 0)


@triton.jit
def _fold_lse_rounding(coef_p, m, s, lse, ACC: tl.constexpr):
    """coef_p with the rounding of the stored float32 lse folded in (as the CPU and CUDA
    kernels do, csrc/common/softmax_row.h fold_lse_rounding). Backward computes
    p_c = exp(z_c - lse) from the float32 lse, whose rounding (half an ulp of |lse|: 1.5e-5
    at logits ~300) every p_c inherits. The rounding error of lse = m + log(s) is exact in
    float32 by TwoSum, err = (m + log s) - lse, and exp(z_c - (lse + err)) =
    exp(z_c - lse) * (1 - err) to 1e-13: coef_p, the only coefficient of p_c, takes the
    factor. (float64 arithmetic here made the all-options kernel spill.)"""
    if ACC == tl.float32:
        log_s = tl.log(s)
        b = lse - m
        err = (m - (lse - b)) + (log_s - b)
        coef_p = coef_p * (1.0 - err)
    return coef_p


@triton.jit
def _store_stats(stats_ptr, row, counted, lse, coef_p, smooth, target_coef):
    """stats[row] = [lse, coef_p, smooth, target_coef] (csrc/ops.cpp), or [-inf, 0, 0, 0]
    for a row whose gradient is exactly 0 (backward then reads none of its logits)."""
    k = tl.arange(0, 4)
    v = tl.where(k == 0, lse, tl.where(k == 1, coef_p, tl.where(k == 2, smooth, target_coef)))
    v = tl.where(counted, v, tl.where(k == 0, float("-inf"), 0.0))
    tl.store(stats_ptr + row.to(tl.int64) * 4 + k, v)


@triton.jit
def _position_block(pid, D, BLOCK_D: tl.constexpr):
    """(n, d, ok) of a K-dim program: program `pid` holds positions d = d0 .. d0 + BLOCK_D - 1
    of sample n (rows n * D + d), ok = d < D. Programs run over the position blocks of sample
    0, then sample 1, ...; the block index and D fit in int32 (a grid dimension does)."""
    blocks = tl.cdiv(D, BLOCK_D)
    n = pid // blocks
    d = (pid - n * blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    return n, d, d < D


@triton.jit
def _position_targets(D, C, target_ptr, stride_tn, stride_td, ignore_index, BLOCK_D: tl.constexpr):
    """A K-dim forward program's positions and their class-index targets: (n64, d64, ok,
    rows, t, live, out_of_range), int64 n, d and rows = n * D + d; live = in range of D and
    neither ignored nor out of range (only live rows read logits); t = 0 where not live."""
    n, d, ok = _position_block(tl.program_id(0), D, BLOCK_D)
    n64, d64 = n.to(tl.int64), d.to(tl.int64)
    t = tl.load(target_ptr + n64 * stride_tn + d64 * stride_td, mask=ok, other=0)
    ignored, out_of_range = _row_kind(t, ignore_index, C)
    out_of_range = out_of_range & ok
    live = ok & ((ignored | out_of_range) == 0)
    return n64, d64, ok, n64 * D + d64, tl.where(live, t, 0), live, out_of_range


@triton.jit
def _class_tile(start, BLOCK_C: tl.constexpr, GROUPS: tl.constexpr):
    """(BLOCK_C // GROUPS, GROUPS, 1) class indices start .. start + BLOCK_C - 1 of a K-dim
    forward step: group g holds classes start + g * BLOCK_C // GROUPS + i. The tile is
    (classes of a group, groups, positions): Triton's layout fills positions, then groups
    with the threads and warps, so each thread holds all classes of its group and a step's
    reduction over them (axis 0) stays inside the thread; the groups are merged once, after
    the pass (_merge_groups). A (classes, positions) tile would put the warps on the classes
    once the positions are vectorized, and merge across warps (shared memory, a barrier) at
    every step."""
    per_group: tl.constexpr = BLOCK_C // GROUPS
    i = tl.arange(0, per_group)[:, None, None]
    g = tl.arange(0, GROUPS)[None, :, None]
    return start + g * per_group + i


@triton.jit
def _merge_groups(m, s):
    """(max, sum exp(z - max)) per position from the class groups' (m, s) (axis 0): the exact
    merge of partial rows, -inf groups (nothing allowed) contributing 0, NaN staying in s."""
    m_all = tl.max(m, 0)
    ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    return m_all, tl.sum(s * tl.exp(m - ref[None, :]), 0)


@triton.jit
def _merge_relative(total, weight, m, m_all):
    """A _relative_sum kept per class group (axis 0; reference: the group's max m, 0 while
    -inf; `weight` its sum of w), moved to the merged max m_all and summed over the groups."""
    ref = tl.where(m == float("-inf"), 0.0, m)
    ref_all = tl.where(m_all == float("-inf"), 0.0, m_all)[None, :]
    return tl.sum(total + tl.where(weight == 0, 0.0, weight * (ref - ref_all)), 0)


@triton.jit
def _store_stats_block(stats_ptr, rows, ok, counted, lse, coef_p, smooth, target_coef):
    """_store_stats for a block of rows (int64 `rows`, lanes with `ok` False not written):
    one (BLOCK_D, 4) tile, each row's four numbers contiguous. Scalars (an option that is
    off, no weight) are broadcast to the block first."""
    zero = tl.zeros_like(lse)
    k = tl.arange(0, 4)[None, :]
    v = tl.where(
        k == 0, lse[:, None],
        tl.where(k == 1, (coef_p + zero)[:, None], tl.where(k == 2, (smooth + zero)[:, None], (target_coef + zero)[:, None])),
    )  # fmt: skip
    v = tl.where(counted[:, None], v, tl.where(k == 0, float("-inf"), 0.0))
    tl.store(stats_ptr + rows[:, None] * 4 + k, v, mask=ok[:, None])


@triton.jit
def _row_lse(m, s):
    """log-sum-exp of the merged row. -inf for an all-masked row (s == 0); NaN when an
    allowed class held NaN: exp(NaN - m) made s NaN, and a NaN in a sum stays (whatever
    max did with it), so s itself is the NaN flag (SPEC rule 8: a data bug stays visible)."""
    lse = tl.where(s == 0, float("-inf"), m + tl.log(s))
    return tl.where(s != s, float("nan"), lse)


@triton.jit
def _pow(q, gamma):
    """q ** gamma for q in [0, 1], gamma >= 0 (runtime): q^0 = 1 (also at q = 0), 0^gamma = 0,
    and gamma == 2 (the usual focal gamma) as one exact multiply."""
    qg = tl.exp(gamma * tl.log(q))
    qg = tl.where(gamma == 2.0, q * q, qg)
    return tl.where(gamma == 0.0, 1.0, qg)


@triton.jit
def _reduce_kernel(
    loss_ptr,  # (n,) per-row (or per-program) losses, acc
    count_ptr,  # (n,) per-row counts, acc; None: "mean" divides by `numel`
    out_ptr,  # () the mean or sum, output dtype
    denom_ptr,  # () acc, the "mean" denominator (sum of counts, or numel)
    n,  # number of values
    numel: tl.float64,  # elementwise losses: the "mean" denominator
    MEAN: tl.constexpr,  # "mean" (else "sum")
    BLOCK: tl.constexpr,  # values per step
):
    """One program sums the n values in a fixed order (BLOCK-wide tree sums, accumulated in
    sequence): the same input gives bitwise the same output, with no atomics."""
    ACC: tl.constexpr = denom_ptr.dtype.element_ty
    total = tl.zeros([BLOCK], ACC)
    cnt = tl.zeros([BLOCK], ACC)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        total += tl.load(loss_ptr + i, mask=i < n, other=0.0)
        if count_ptr is not None:
            cnt += tl.load(count_ptr + i, mask=i < n, other=0.0)
    total_s = tl.sum(total, 0)
    if count_ptr is not None:
        denom = tl.sum(cnt, 0)
    else:
        denom = _scalar(numel, ACC)
    out = total_s
    if MEAN:
        if count_ptr is not None:  # SPEC rule 6: a mean over zero counted rows is 0
            out = tl.where(denom != 0, total_s / tl.where(denom != 0, denom, 1.0), 0.0)
        else:  # elementwise: 0 / 0 = NaN for an empty input, as PyTorch
            out = total_s / denom
    tl.store(out_ptr, out.to(out_ptr.dtype.element_ty))
    tl.store(denom_ptr, denom)


REDUCE_BLOCK = 1024


def _reduce_rows(loss, count, reduction, out_dtype, numel=0):
    """(out, denom) from per-row losses (and counts), one launch of `_reduce_kernel`.
    Reduction 0 returns `loss` itself (the row kernel wrote it in the output dtype); the
    launch still writes denom (the op contract: defined for every reduction), the sum it
    computes going to a scratch scalar."""
    dev = loss.device
    denom = torch.empty((), dtype=acc_dtype_of(loss, count), device=dev)
    out = torch.empty((), dtype=out_dtype if reduction != 0 else denom.dtype, device=dev)
    if reduction == 0 and count is None:
        return loss, denom
    values = loss if reduction != 0 else count  # "none": only the counts are summed
    _reduce_kernel[(1,)](
        values, count, out, denom, values.numel(), float(numel), MEAN=reduction == 1, BLOCK=REDUCE_BLOCK, num_warps=4
    )
    return (out if reduction != 0 else loss), denom


def acc_dtype_of(loss, count):
    return count.dtype if count is not None else loss.dtype
