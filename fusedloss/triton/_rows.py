"""Row machinery shared by the softmax losses (cross_entropy.py, focal.py).

A *row* is one sample's C logits: for a canonical (N, C, D) view, row r = (n, d) with
n = r // D, d = r % D, and class c at n * stride_n + c * stride_c + d * stride_d. Every
offset is formed in int64: with N * C > 2^31 (e.g. 16k tokens x 256k vocabulary)
`row * stride` overflows int32.

The helpers here are the pieces both losses need, written once:
  * `_row_base`      -- int64 offset of a row's first class in a strided (N, C, D) tensor
  * `_row_kind`      -- ignored / out-of-range classification of a class-index target
  * `_logit_tile`    -- masked load of a tile of classes: logits in acc dtype, the "allowed"
                        predicate (mask True and logit != -inf), softcapped logits z and dz/dx
  * `_online_merge`  -- merges a tile into a running (max, sum exp) pair, -inf safe
  * `_row_lse`       -- log-sum-exp of the merged pair, NaN when the row held a NaN
  * `_pow`           -- q ** gamma with the focal conventions (q^0 = 1)
  * `_expm1`         -- accurate exp(x) - 1 (tl has no expm1 on every version)
  * `_scalar`        -- a float64 scalar argument in the accumulation dtype
"""
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
def _softcap(x, cap):
    """z = cap * tanh(x / cap) and dz/dx = 1 - tanh(x / cap)^2, both accurate for every x.

    With a = |x| / cap and e = exp(-2a) (in (0, 1], never overflows):
        tanh(a)     = (1 - e) / (1 + e) = -expm1(-2a) / (2 + expm1(-2a))
        1 - tanh^2  = 4e / (1 + e)^2
    expm1 keeps tanh accurate for tiny a; at large a, e -> 0, tanh -> 1, dz/dx -> 0.
    """
    a = tl.abs(x) / cap
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
    """int64 offset of class 0 of row `row` = (n, d) in a strided (N, C, D) tensor."""
    row64 = row.to(tl.int64)
    return (row64 // D) * stride_n + (row64 % D) * stride_d


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
    softcap,  # cap > 0, or 0 = no softcap (runtime; constexpr 0.0 compiles it out)
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
    if softcap > 0:
        z, dzdx = _softcap(x, softcap)
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
