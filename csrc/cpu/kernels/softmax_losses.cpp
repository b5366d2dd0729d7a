// CPU kernels of ce_fwd, focal_fwd and softmax_bwd (schemas: csrc/ops.cpp; math:
// docs/formulas.md and csrc/common/softmax_row.h, whose per-row formulas the CUDA kernels
// share).
//
// Compiled once per CPU capability (setup.py), inside fusedloss::CPU_CAPABILITY, with
// at::vec::Vectorized<acc_t> (acc_t = float, or double for float64 logits; bf16/fp16 are
// converted to float on load). at::parallel_for splits the rows; each row is handled by one
// thread:
//   forward   one pass over the row's logits: online max / sum-exp by chunks of kChunk
//             classes, each swept twice while it sits in L1: its max, then one exp per
//             element against the running max (the sum is rescaled once per chunk, not once
//             per element), added by blocks of kBlock vectors held in registers. The
//             smoothing and probability-target sums ride along in the second sweep. The shared finalize
//             turns them into the row's loss, count and the 4 stats backward needs; the
//             reduction ("mean" / "sum") is summed here in a fixed order.
//   backward  one pass: reads x_c (and y_c, mask_c), p_c = exp(z_c - lse) from the stats,
//             writes grad_c = dloss/dx_c * scale once, the target's extra term included in
//             the vector that holds it. In place (grad aliasing logits) is safe: each vector
//             of logits is read before the same vector of grad is written. A row whose lse
//             is -inf (no gradient) writes zeros and reads no logits.
// A row is "contiguous" when the class stride of logits (and grad, probability target) is 1,
// whatever the row strides; otherwise the same code gathers each vector with a strided
// scalar loop, except K-dim inputs with contiguous positions, which put positions in the
// vector lanes (softmax_lanes_fwd / _bwd).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/softmax_row.h"

namespace fusedloss {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

namespace row {
// Vector adapter of the shared element formulas: Sleef exp/tanh (1 ulp) for every p_c a
// gradient is made of. (The K-dim lane path's forward sum of exp alone takes exp_u20, whose
// error reaches the loss and lse once, not each element: softmax_lanes_fwd.)
template <typename T>
struct Math<Vectorized<T>> {
  static Vectorized<T> exp(const Vectorized<T>& x) { return x.exp(); }
  static Vectorized<T> tanh(const Vectorized<T>& x) { return x.tanh(); }
};
}  // namespace row

namespace {

enum class LossKind { kCeIndex, kCeProb, kFocal };

constexpr int kBlock = 8;  // vectors per pass-1 block (8 registers; 128 floats on AVX512)
// Classes per pass-1 chunk (a multiple of kBlock vectors on every capability): 8 KB of float,
// so the chunk's second sweep reads L1.
constexpr int64_t kChunk = 2048;

template <typename acc_t>
struct Config {
  LossKind kind;
  int64_t C;
  int64_t ignore_index;
  const acc_t* weight;  // (C,) class weight (ce) or alpha (focal), or nullptr
  acc_t eps, zl, cap, gamma;  // forward only, but cap
  bool smoothing;  // eps > 0 (forward; backward reads the row's smooth from its stats)
  bool softcap;    // cap > 0
  bool has_mask;
};

// One row's operands: base pointer and class stride.
template <typename scalar_t>
struct Row {
  const scalar_t* x;
  int64_t xs;
  const scalar_t* y;  // probability target or nullptr
  int64_t ys;
  const bool* mask;  // or nullptr
  int64_t ms;
  scalar_t* g;  // grad (backward) or nullptr
  int64_t gs;
};

// ----------------------------------------------------------------------------- vector I/O
// Loads n (<= size()) elements starting at p with stride `stride` into a vector of acc_t;
// lanes >= n get `pad` (-inf for logits: a padded lane is a masked class).
template <typename acc_t, bool kContig, typename scalar_t>
inline Vectorized<acc_t> load_vec(const scalar_t* p, int64_t stride, int64_t n, acc_t pad) {
  using V = Vectorized<acc_t>;
  constexpr int kV = V::size();
  if (kContig && n >= kV) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return V::loadu(p);
    } else {
      V out;
      at::vec::load_to_float(p, out);
      return out;
    }
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (kContig || stride == 1) {  // a masked load (AVX512), lanes >= n padded
      const int64_t m = std::min<int64_t>(std::max<int64_t>(n, 0), kV);
      return V::set(V(pad), V::loadu(p, m), m);
    }
  }
  alignas(64) acc_t buf[kV];
  for (int i = 0; i < kV; ++i) buf[i] = i < n ? static_cast<acc_t>(p[i * stride]) : pad;
  return V::loadu(buf);
}

template <bool kContig, typename acc_t, typename scalar_t>
inline void store_vec(scalar_t* p, int64_t stride, int64_t n, const Vectorized<acc_t>& v) {
  constexpr int kV = Vectorized<acc_t>::size();
  if (kContig && n >= kV) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, kV);
    }
    return;
  }
  alignas(64) acc_t buf[kV];
  v.store(buf);
  for (int64_t i = 0; i < std::min<int64_t>(n, kV); ++i) p[i * stride] = static_cast<scalar_t>(buf[i]);
}

// All-ones lanes where the mask is True (lanes >= n: False).
template <typename acc_t>
inline Vectorized<acc_t> load_mask(const bool* m, int64_t stride, int64_t n) {
  using V = Vectorized<acc_t>;
  alignas(64) acc_t buf[V::size()];
  for (int i = 0; i < V::size(); ++i) buf[i] = (i < n && m[i * stride]) ? acc_t(1) : acc_t(0);
  return V::loadu(buf) != V(acc_t(0));
}

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {  // NaN-propagating
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return a + b; }, v);
}

template <bool kContig, typename acc_t, typename scalar_t>
void zero_row_grad(scalar_t* g, int64_t gs, int64_t C) {
  constexpr int kV = Vectorized<acc_t>::size();
  const Vectorized<acc_t> zero(acc_t(0));
  for (int64_t c = 0; c < C; c += kV) store_vec<kContig>(g + c * gs, gs, C - c, zero);
}

// ----------------------------------------------------------------------------- one row
// Logits of n classes at c as they enter the softmax: masked (mask False or -inf) -> -inf,
// softcap applied to the others. `allowed` gets the allowed lanes.
template <typename acc_t, bool kContig, typename scalar_t>
inline Vectorized<acc_t> load_z(const Config<acc_t>& cfg, const Row<scalar_t>& r, int64_t c, int64_t n,
                                Vectorized<acc_t>& allowed, Vectorized<acc_t>* dzdx) {
  using V = Vectorized<acc_t>;
  const V ninf(row::neg_inf<acc_t>());
  V x = load_vec<acc_t, kContig>(r.x + c * r.xs, r.xs, n, row::neg_inf<acc_t>());
  allowed = x != ninf;
  if (cfg.has_mask) {
    allowed = allowed & load_mask<acc_t>(r.mask + c * r.ms, r.ms, n);
    x = V::blendv(ninf, x, allowed);  // a masked NaN logit is masked, not NaN
  }
  if (cfg.softcap) {
    V d;
    const V z = row::softcap_z(x, V(cfg.cap), V(acc_t(1) / cfg.cap), V(acc_t(1)), d);
    if (dzdx) *dzdx = d;
    return V::blendv(ninf, z, allowed);  // tanh(-inf) = -1 would unmask the class
  }
  return x;
}

// Compensated (Kahan) vector sum. A row's sums run over C / kV terms per lane, serially:
// plain float32 accumulation over 32k classes lost ~1e-5 relative in the sum of exp and
// in the probability-target sums, which the loss and every p_c inherit (measured: 10x
// eager's gradient error on confident soft-target rows). Each block's kBlock vectors are
// first added pairwise, then compensated into the running sum.
template <typename acc_t>
struct KahanVec {
  using V = Vectorized<acc_t>;
  V sum = V(acc_t(0)), comp = V(acc_t(0));
  void add(const V& v) {
    const V y = v - comp;
    const V t = sum + y;
    comp = (t - sum) - y;
    sum = t;
  }
  void scale(const V& f) {
    sum = sum * f;
    comp = comp * f;
  }
  V value() const { return sum - comp; }
};

template <typename V, int n>
inline V pairwise_sum(V* v) {  // destroys v
  for (int width = n / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) v[j] = v[j] + v[j + width];
  return v[0];
}

// ----------------------------------------------------------------------------- forward, one row
// Pass 1 over one row and the shared finalize. Ignored rows return without reading a logit.
template <typename acc_t, bool kContig, typename scalar_t>
row::RowCoefs<acc_t> softmax_row_fwd(const Config<acc_t>& cfg, const Row<scalar_t>& r, int64_t t) {
  using V = Vectorized<acc_t>;
  constexpr int kV = V::size();
  constexpr int64_t kStep = int64_t(kBlock) * kV;
  const int64_t C = cfg.C;
  const bool index_target = cfg.kind != LossKind::kCeProb;

  // --- classification, and the target's logit
  acc_t z_t = 0, w_t = 1;
  if (index_target) {
    const auto kind = row::classify_target(t, cfg.ignore_index, C);
    TORCH_CHECK_INDEX(kind != row::kOutOfRange, "fusedloss: target ", t, " is out of bounds: class targets must be in [0, ",
                      C, ") (C = ", C, ") or equal ignore_index (", cfg.ignore_index, ")");
    if (kind == row::kIgnored) return row::zero_row<acc_t>();
    const acc_t x_t = static_cast<acc_t>(r.x[t * r.xs]);
    const bool t_allowed = x_t != row::neg_inf<acc_t>() && (!cfg.has_mask || r.mask[t * r.ms]);
    z_t = t_allowed ? x_t : row::neg_inf<acc_t>();
    if (t_allowed && cfg.softcap) {
      // The same (vector) tanh as the row's max and as backward: a scalar tanh 1 ulp away
      // made (m - z_t) negative on a confident row, and so its loss.
      V d;
      const V zv = row::softcap_z(V(x_t), V(cfg.cap), V(acc_t(1) / cfg.cap), V(acc_t(1)), d);
      alignas(64) acc_t zt_buf[kV];
      zv.store(zt_buf);
      z_t = zt_buf[0];
    }
    if (cfg.weight) w_t = cfg.weight[t];
  }

  // --- pass 1, by chunks of kChunk classes: (a) the chunk's z and their max, (b) exp(z - M)
  // against the running max M (the sum so far rescaled once per chunk) and the side sums.
  // (b) re-reads the chunk from L1: x itself on a plain contiguous row, else the z that (a)
  // stored (no second tanh, mask test or strided gather). Splitting the max out of the exp
  // sweep removed the per-block horizontal max the exps waited on (25% of pass 1).
  const bool side = cfg.smoothing || cfg.kind == LossKind::kCeProb;
  const bool direct = kContig && std::is_same_v<scalar_t, acc_t> && !cfg.has_mask && !cfg.softcap;
  const acc_t* xrow = reinterpret_cast<const acc_t*>(r.x);  // read only when direct
  const V ninf(row::neg_inf<acc_t>()), zero(acc_t(0)), one(acc_t(1));
  acc_t M = row::neg_inf<acc_t>();
  V n_acc(acc_t(0));        // exact: integer counts
  V wyz_masked(acc_t(0));   // 1 in a lane that met a masked class with y > 0: wyz = -inf
  KahanVec<acc_t> s_acc, wa_acc, wz_acc, wy_acc, wyz_acc;
  alignas(64) acc_t zbuf[kChunk];
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    // (a) four independent max chains; lanes past n hold -inf
    V mx[4] = {ninf, ninf, ninf, ninf};
    if (direct) {
      int64_t c = 0;
      for (; c + 4 * kV <= n; c += 4 * kV) {
        for (int j = 0; j < 4; ++j) mx[j] = at::vec::maximum(mx[j], V::loadu(xrow + c0 + c + j * kV));
      }
      for (; c < n; c += kV) mx[0] = at::vec::maximum(mx[0], load_vec<acc_t, true>(xrow + c0 + c, 1, n - c, row::neg_inf<acc_t>()));
    } else {
      for (int64_t c = 0, j = 0; c < n; c += kV, j = (j + 1) & 3) {
        V allowed;
        const V z = load_z<acc_t, kContig>(cfg, r, c0 + c, n - c, allowed, nullptr);
        z.store(zbuf + c);  // c + kV <= kChunk: kChunk is a multiple of kV
        mx[j] = at::vec::maximum(mx[j], z);
      }
    }
    const acc_t Mn =
        row::nan_max(M, reduce_max(at::vec::maximum(at::vec::maximum(mx[0], mx[1]), at::vec::maximum(mx[2], mx[3]))));
    const bool live = !row::is_empty_row(Mn);  // something allowed so far (or NaN)
    if (side && live && !row::is_empty_row(M) && !(Mn == M)) {
      // Side sums relative to the running max (RowStats::zref): rebase what was summed
      // against the previous max, then add this chunk's w (z - Mn). While nothing is
      // allowed yet the terms are 0 or -inf, so there is nothing to rebase.
      const V shift(Mn - M);
      wz_acc.add(zero - shift * wa_acc.value());
      wyz_acc.add(zero - shift * wy_acc.value());
    }
    if (live && !(Mn == M)) s_acc.scale(V(row::Math<acc_t>::exp(M - Mn)));  // M = -inf: 0
    M = Mn;
    // (b) by blocks of kBlock vectors: pairwise within the block, compensated across blocks
    const V vM(live ? M : acc_t(0));  // the exps' and side sums' reference
    for (int64_t cb = 0; cb < n; cb += kStep) {
      V z[kBlock];
      for (int j = 0; j < kBlock; ++j) {
        const int64_t c = cb + int64_t(j) * kV;
        z[j] = c >= n ? ninf
                      : (direct ? load_vec<acc_t, true>(xrow + c0 + c, 1, n - c, row::neg_inf<acc_t>()) : V::loadu(zbuf + c));
      }
      if (side) {
        V wa[kBlock], wz[kBlock], wy[kBlock], wyz[kBlock];
        for (int j = 0; j < kBlock; ++j) {
          const int64_t c = cb + int64_t(j) * kV;
          wa[j] = wz[j] = wy[j] = wyz[j] = zero;
          if (c >= n) continue;
          const V allowed = z[j] != ninf;  // load_z made every masked class -inf
          const V w = cfg.weight ? load_vec<acc_t, true>(cfg.weight + c0 + c, 1, n - c, acc_t(0)) : one;
          const V zr = z[j] - vM;
          if (cfg.smoothing) {
            n_acc += V::blendv(zero, one, allowed);
            wa[j] = V::blendv(zero, w, allowed);
            wz[j] = V::blendv(zero, w * zr, allowed);  // w * -inf never reaches the sum
          }
          if (cfg.kind == LossKind::kCeProb) {
            wy[j] = w * load_vec<acc_t, kContig>(r.y + (c0 + c) * r.ys, r.ys, n - c, acc_t(0));
            // 0 * log 0 = 0 (rule 7); a masked class with y > 0 makes the sum -inf, kept
            // out of the compensated sum (inf - inf there would be NaN) and flagged.
            const V masked_y = (zr == ninf) & (wy[j] != zero);
            wyz_masked = V::blendv(wyz_masked, one, masked_y);
            wyz[j] = V::blendv(wy[j] * zr, zero, (wy[j] == zero) | masked_y);
          }
        }
        if (cfg.smoothing) {
          wa_acc.add(pairwise_sum<V, kBlock>(wa));
          wz_acc.add(pairwise_sum<V, kBlock>(wz));
        }
        if (cfg.kind == LossKind::kCeProb) {
          wy_acc.add(pairwise_sum<V, kBlock>(wy));
          wyz_acc.add(pairwise_sum<V, kBlock>(wyz));
        }
      }
      if (!live) continue;  // nothing allowed so far: e = 0
      V e[kBlock];
      for (int j = 0; j < kBlock; ++j) {  // no exp for the vectors past the row's end (small C)
        e[j] = cb + int64_t(j) * kV < n ? row::Math<V>::exp(z[j] - vM) : zero;
      }
      s_acc.add(pairwise_sum<V, kBlock>(e));
    }
  }

  row::RowStats<acc_t> st;
  st.m = M;
  st.s = reduce_sum(s_acc.value());
  st.zref = row::is_empty_row(M) ? acc_t(0) : M;  // the side sums' reference (see above)
  if (cfg.smoothing) {
    st.n_allowed = reduce_sum(n_acc);
    st.w_allowed = reduce_sum(wa_acc.value());
    st.wz_allowed = reduce_sum(wz_acc.value());
  }
  if (cfg.kind == LossKind::kCeProb) {
    st.wy = reduce_sum(wy_acc.value());
    st.wyz = reduce_max(wyz_masked) > acc_t(0) ? row::neg_inf<acc_t>() : reduce_sum(wyz_acc.value());
  }

  // --- finalize
  switch (cfg.kind) {
    case LossKind::kCeIndex: return row::ce_finalize_index(st, z_t, w_t, cfg.eps, cfg.zl, cfg.smoothing);
    case LossKind::kCeProb: return row::ce_finalize_prob(st, cfg.eps, cfg.zl, cfg.smoothing);
    case LossKind::kFocal: break;
  }
  return row::focal_finalize(st, z_t, w_t, cfg.gamma);
}

// ----------------------------------------------------------------------------- backward, one row
// grad_c = dloss/dx_c * scale from the row's stats, one pass. Per vector of classes:
//   allowed lanes:  (coef_p p_c - coef_y_c) dz/dx             (row::allowed_grad)
//   masked lanes:   0; probability targets -w_c target_coef y_c; a masked index target
//                   -target_coef                                (row::index_elem_grad /
//                                                                row::prob_elem_grad)
// with coef_y_c = smooth w_c (+ target_coef at c == t: added to the one vector holding t, so
// the target's element is written once, with the rest) or w_c (target_coef y_c + smooth).
// A plain row (class-index target, no mask, softcap or smoothing) is coef_p exp(x_c - lse):
// a logit of -inf gives exp = 0, so no blend is needed outside the target's vector.
template <typename acc_t, bool kContig, typename scalar_t>
void softmax_row_bwd(const Config<acc_t>& cfg, const Row<scalar_t>& r, int64_t t, const acc_t* stats, acc_t scale) {
  using V = Vectorized<acc_t>;
  constexpr int kV = V::size();
  const int64_t C = cfg.C;
  const row::BwdRow<acc_t> b = row::read_stats(stats, scale);
  if (!row::row_has_grad(b.lse)) {
    zero_row_grad<kContig, acc_t>(r.g, r.gs, C);
    return;
  }
  const bool prob = cfg.kind == LossKind::kCeProb;
  if (!prob) {
    // The forward marked ignored / out-of-range rows with lse = -inf; this only guards a
    // target that differs from the forward's.
    TORCH_CHECK_INDEX(t >= 0 && t < C, "fusedloss: softmax_bwd: target ", t, " is out of bounds for C = ", C,
                      " on a row whose stats carry a gradient (target differs from the forward's?)");
  }
  const V ninf(row::neg_inf<acc_t>()), zero(acc_t(0)), one(acc_t(1));
  const V lse(b.lse), coef_p(b.coef_p), smooth(b.smooth), tcoef(b.target_coef);
  const bool smoothing = b.smooth != acc_t(0);
  const bool use_w = cfg.weight && (prob || smoothing);
  const bool plain = !prob && !cfg.has_mask && !cfg.softcap && !smoothing;
  const int64_t t_chunk = prob ? -1 : t - t % kV;  // first class of the vector holding t
  for (int64_t c = 0; c < C; c += kV) {
    const int64_t n = C - c;
    V g;
    if (plain && c != t_chunk) {
      const V x = load_vec<acc_t, kContig>(r.x + c * r.xs, r.xs, n, row::neg_inf<acc_t>());
      g = coef_p * row::Math<V>::exp(x - lse);
    } else {
      V allowed, dzdx;
      const V z = load_z<acc_t, kContig>(cfg, r, c, n, allowed, &dzdx);
      const V w = use_w ? load_vec<acc_t, true>(cfg.weight + c, 1, n, acc_t(0)) : one;
      V coef_y = smoothing ? smooth * w : zero;
      V masked_g = zero;
      if (prob) {
        const V wy = w * load_vec<acc_t, kContig>(r.y + c * r.ys, r.ys, n, acc_t(0));
        const V wy_t = b.target_coef == acc_t(0) ? zero : tcoef * wy;  // row::coef_times
        coef_y = wy_t + coef_y;
        masked_g = zero - wy_t;
      } else if (c == t_chunk) {
        alignas(64) acc_t buf[kV] = {};
        buf[t - c] = b.target_coef;
        const V tv = V::loadu(buf);
        coef_y = coef_y + tv;
        masked_g = zero - tv;
      }
      g = row::grad_of_p(row::softmax_p(z, lse), coef_p, coef_y);
      if (cfg.softcap) g = g * dzdx;
      g = V::blendv(masked_g, g, allowed);
    }
    store_vec<kContig>(r.g + c * r.gs, r.gs, n, g);
  }
}

// ----------------------------------------------------------------------------- K-dim rows
// K-dim input (N, C, D) with positions contiguous (stride_d == 1, as in NCHW): a row's
// classes are D apart, so the row path would gather every vector element by element. Here
// the vector lanes are kV consecutive positions (rows) instead: each class is one contiguous
// load for kV rows. Pass 1 takes the lanes' max, then their sums against it (max-relative,
// so RowStats::zref = m exactly); the shared finalize runs per lane. Same formulas and row
// kinds as the row path.
//
// base: operands of the block's first row; base.xs/ys/ms/gs are the CLASS strides; the lane
// (position) stride is 1 for logits and grad, ys_d / ms_d for target / mask.
// A block reads each class's line of kV positions, D elements apart: C streams at once, more
// than the hardware prefetchers follow (NCHW cross-entropy ran at half the speed of the
// contiguous-row channels_last path). While a block runs, the same lines of the block
// kPrefetchBlocks ahead are requested (a hint: nothing faults past the end of the tensor).
constexpr int64_t kPrefetchBlocks = 2;

template <typename T>
inline void prefetch_read(const T* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#endif
}

template <typename T>
inline void prefetch_write(T* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 1, 3);
#endif
}

template <typename scalar_t>
Row<scalar_t> lane_row(const Row<scalar_t>& base, int64_t ys_d, int64_t ms_d, int64_t c) {
  return Row<scalar_t>{base.x + c * base.xs, 1, base.y ? base.y + c * base.ys : nullptr, ys_d,
                       base.mask ? base.mask + c * base.ms : nullptr, ms_d, nullptr, 1};
}

// Fills k[0..L) with the lanes' finalized rows.
template <typename acc_t, typename scalar_t>
void softmax_lanes_fwd(const Config<acc_t>& cfg, const Row<scalar_t>& base, int64_t ys_d, int64_t ms_d,
                       const int64_t* tgt, int64_t t_stride, int64_t L, row::RowCoefs<acc_t>* k) {
  using V = Vectorized<acc_t>;
  constexpr int kV = V::size();
  const int64_t C = cfg.C;
  const bool index_target = cfg.kind != LossKind::kCeProb;
  const V ninf(row::neg_inf<acc_t>()), zero(acc_t(0)), one(acc_t(1));

  // classification per lane (ignored / out of range / counted)
  int64_t t[kV];
  bool live[kV];
  for (int l = 0; l < kV; ++l) {
    t[l] = -1;
    live[l] = l < L;
    if (index_target && l < L) {
      t[l] = tgt[l * t_stride];
      const auto kind = row::classify_target(t[l], cfg.ignore_index, C);
      TORCH_CHECK_INDEX(kind != row::kOutOfRange, "fusedloss: target ", t[l], " is out of bounds: class targets must be in [0, ",
                        C, ") (C = ", C, ") or equal ignore_index (", cfg.ignore_index, ")");
      live[l] = kind == row::kCounted;
    }
  }
  bool any_live = false;
  for (int l = 0; l < kV; ++l) any_live = any_live || live[l];
  if (!any_live) {  // every lane ignored: no logit read
    for (int l = 0; l < L; ++l) k[l] = row::zero_row<acc_t>();
    return;
  }

  // pass 1a: the lanes' max (two chains: a max waits on the previous one)
  V m = ninf, m2 = ninf;
  for (int64_t c = 0; c < C; ++c) {
    V allowed;
    prefetch_read(base.x + c * base.xs + kPrefetchBlocks * kV);
    const V z = load_z<acc_t, true>(cfg, lane_row(base, ys_d, ms_d, c), 0, L, allowed, nullptr);
    if (c & 1) {
      m2 = at::vec::maximum(m2, z);
    } else {
      m = at::vec::maximum(m, z);
    }
  }
  m = at::vec::maximum(m, m2);
  // pass 1b: sums relative to m (-inf lanes: nothing allowed, every term is 0 or -inf)
  const V ref = V::blendv(m, zero, m == ninf);
  KahanVec<acc_t> s_acc, wa_acc, wz_acc, wy_acc, wyz_acc;
  V n_acc = zero, wyz_masked = zero;
  V e_even = zero;  // classes are added in pairs: half the compensated (serial) adds
  for (int64_t c = 0; c < C; ++c) {
    V allowed;
    const Row<scalar_t> r = lane_row(base, ys_d, ms_d, c);
    const V zr = load_z<acc_t, true>(cfg, r, 0, L, allowed, nullptr) - ref;
    // The sum alone takes at::vec's exp_u20 (measured here: <= 3.3e-7 relative on [-87, 0],
    // 0.19 ns against Sleef's 0.34 ns per float): its error enters the loss and lse as
    // <= 3.3e-7 absolute, under SPEC's 1e-6; each p_c of the gradient keeps the 1-ulp exp.
    const V e = zr.exp_u20();  // masked: exp(-inf) = 0
    if (c & 1) {
      s_acc.add(e_even + e);
    } else {
      e_even = e;
    }
    if (cfg.smoothing || cfg.kind == LossKind::kCeProb) {
      const V w = cfg.weight ? V(cfg.weight[c]) : one;
      if (cfg.smoothing) {
        n_acc += V::blendv(zero, one, allowed);
        wa_acc.add(V::blendv(zero, w, allowed));
        wz_acc.add(V::blendv(zero, w * zr, allowed));
      }
      if (cfg.kind == LossKind::kCeProb) {
        const V wy = w * load_vec<acc_t, false>(r.y, r.ys, L, acc_t(0));
        const V masked_y = (zr == ninf) & (wy != zero);
        wyz_masked = V::blendv(wyz_masked, one, masked_y);
        wy_acc.add(wy);
        wyz_acc.add(V::blendv(wy * zr, zero, (wy == zero) | masked_y));
      }
    }
  }

  if (C & 1) s_acc.add(e_even);

  // finalize per lane
  alignas(64) acc_t mv[kV], sv[kV], nv[kV], wav[kV], wzv[kV], wyv[kV], wyzv[kV], wyzm[kV];
  m.store(mv);
  s_acc.value().store(sv);
  n_acc.store(nv);
  wa_acc.value().store(wav);
  wz_acc.value().store(wzv);
  wy_acc.value().store(wyv);
  wyz_acc.value().store(wyzv);
  wyz_masked.store(wyzm);
  // m + log(s) in double for the float32 stats' rounding fold (row::fold_lse_rounding): one
  // vector log for the block instead of a scalar double log per row (+40% on 19 classes).
  alignas(64) double lse_d[kV];
  if constexpr (std::is_same_v<acc_t, float>) {
    using VD = Vectorized<double>;
    alignas(64) double md[kV], sd[kV];
    for (int l = 0; l < kV; ++l) md[l] = mv[l], sd[l] = sv[l];
    for (int l = 0; l < kV; l += VD::size()) (VD::loadu(md + l) + VD::loadu(sd + l).log()).store(lse_d + l);
  }
  for (int l = 0; l < L; ++l) {
    k[l] = row::zero_row<acc_t>();
    if (!live[l]) continue;
    row::RowStats<acc_t> st;
    st.m = mv[l];
    st.s = sv[l];
    st.zref = row::is_empty_row(mv[l]) ? acc_t(0) : mv[l];
    st.n_allowed = nv[l], st.w_allowed = wav[l], st.wz_allowed = wzv[l];
    st.wy = wyv[l], st.wyz = wyzm[l] > acc_t(0) ? row::neg_inf<acc_t>() : wyzv[l];
    if constexpr (std::is_same_v<acc_t, float>) st.lse_d = lse_d[l];
    acc_t z_t = row::neg_inf<acc_t>(), w_t = acc_t(1);
    if (index_target) {
      const int64_t tl = t[l];
      const acc_t x_t = static_cast<acc_t>(base.x[tl * base.xs + l]);
      if (x_t != row::neg_inf<acc_t>() && (!base.mask || base.mask[tl * base.ms + l * ms_d])) {
        // the target's z from the same vector load_z as pass 1 (same tanh, same bits)
        V allowed;
        const V zv = load_z<acc_t, true>(cfg, lane_row(base, ys_d, ms_d, tl), 0, L, allowed, nullptr);
        alignas(64) acc_t zb[kV];
        zv.store(zb);
        z_t = zb[l];
      }
      if (cfg.weight) w_t = cfg.weight[tl];
    }
    switch (cfg.kind) {
      case LossKind::kCeIndex: k[l] = row::ce_finalize_index(st, z_t, w_t, cfg.eps, cfg.zl, cfg.smoothing); break;
      case LossKind::kCeProb: k[l] = row::ce_finalize_prob(st, cfg.eps, cfg.zl, cfg.smoothing); break;
      case LossKind::kFocal: k[l] = row::focal_finalize(st, z_t, w_t, cfg.gamma); break;
    }
  }
}

// Backward of L <= kV lanes: the row path's arithmetic with per-lane coefficients. The
// target's extra term goes to the lanes whose target is this class (t as acc_t: exact, the
// caller keeps C below 2^24 for float).
template <typename acc_t, typename scalar_t>
void softmax_lanes_bwd(const Config<acc_t>& cfg, const Row<scalar_t>& base, int64_t ys_d, int64_t ms_d,
                       const int64_t* tgt, int64_t t_stride, int64_t L, const acc_t* stats, const acc_t* scale) {
  using V = Vectorized<acc_t>;
  constexpr int kV = V::size();
  const int64_t C = cfg.C;
  const bool prob = cfg.kind == LossKind::kCeProb;
  const V zero(acc_t(0)), one(acc_t(1));

  alignas(64) acc_t lse[kV], coef_p[kV], smooth[kV], tcoef[kV], gate[kV], tcls[kV];
  bool any_grad = false, any_smooth = false;
  for (int l = 0; l < kV; ++l) {
    row::BwdRow<acc_t> b;
    if (l < L) b = row::read_stats(stats + l * row::kNumStats, scale[l]);
    const bool has = row::row_has_grad(b.lse);
    lse[l] = has ? b.lse : acc_t(0);  // lanes without gradient compute junk, gated to 0 below
    coef_p[l] = b.coef_p, smooth[l] = b.smooth, tcoef[l] = b.target_coef;
    gate[l] = has ? acc_t(1) : acc_t(0);
    tcls[l] = acc_t(-1);
    if (has && !prob) {
      const int64_t t = tgt[l * t_stride];
      TORCH_CHECK_INDEX(t >= 0 && t < C, "fusedloss: softmax_bwd: target ", t, " is out of bounds for C = ", C,
                        " on a row whose stats carry a gradient (target differs from the forward's?)");
      tcls[l] = static_cast<acc_t>(t);
    }
    any_grad = any_grad || has;
    any_smooth = any_smooth || b.smooth != acc_t(0);
  }
  if (!any_grad) {  // no logit read
    for (int64_t c = 0; c < C; ++c) store_vec<true>(base.g + c * base.gs, 1, L, zero);
    return;
  }
  const V vlse = V::loadu(lse), vcoef = V::loadu(coef_p), vsmooth = V::loadu(smooth), vtc = V::loadu(tcoef);
  const V vgate = V::loadu(gate) != zero, vt = V::loadu(tcls);
  bool all_grad = true;
  for (int l = 0; l < L; ++l) all_grad = all_grad && gate[l] != acc_t(0);
  if (!prob && !cfg.has_mask && !cfg.softcap && !any_smooth) {
    // Plain rows (the segmentation case): coef_p exp(x_c - lse) - target_coef [c == t]. A
    // logit of -inf gives exp = 0, i.e. the masked class's gradient (0, or -target_coef at
    // the target), so no blend by `allowed` is needed; lanes without gradient are gated to 0
    // only where the block has some.
    V vc = zero;
    for (int64_t c = 0; c < C; ++c, vc = vc + one) {
      const scalar_t* x = base.x + c * base.xs;
      prefetch_read(x + kPrefetchBlocks * kV);
      prefetch_write(base.g + c * base.gs + kPrefetchBlocks * kV);
      const V tv = V::blendv(zero, vtc, vt == vc);
      V g = row::grad_of_p(row::softmax_p(load_vec<acc_t, true>(x, 1, L, row::neg_inf<acc_t>()), vlse), vcoef, tv);
      if (!all_grad) g = V::blendv(zero, g, vgate);
      store_vec<true>(base.g + c * base.gs, 1, L, g);
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const Row<scalar_t> r = lane_row(base, ys_d, ms_d, c);
    prefetch_read(r.x + kPrefetchBlocks * kV);
    prefetch_write(base.g + c * base.gs + kPrefetchBlocks * kV);
    V allowed, dzdx;
    const V z = load_z<acc_t, true>(cfg, r, 0, L, allowed, &dzdx);
    const V w = cfg.weight ? V(cfg.weight[c]) : one;
    V coef_y = any_smooth ? vsmooth * w : zero;
    V masked_g;
    if (prob) {
      const V wy = w * load_vec<acc_t, false>(r.y, r.ys, L, acc_t(0));
      const V wy_t = V::blendv(vtc * wy, zero, vtc == zero);  // row::coef_times
      coef_y = wy_t + coef_y;
      masked_g = zero - wy_t;
    } else {
      const V tv = V::blendv(zero, vtc, vt == V(static_cast<acc_t>(c)));
      coef_y = coef_y + tv;
      masked_g = zero - tv;
    }
    V g = row::grad_of_p(row::softmax_p(z, vlse), vcoef, coef_y);
    if (cfg.softcap) g = g * dzdx;
    g = V::blendv(masked_g, g, allowed);
    store_vec<true>(base.g + c * base.gs, 1, L, V::blendv(zero, g, vgate));
  }
}

// ----------------------------------------------------------------------------- fixed-order sums
// The reduced loss and its denominator must not depend on the thread count: rows are cut into
// groups whose size depends on the shape only, each group is summed serially, and the
// groups' partial sums are added in order afterwards. In double (a float32 loss over 16k rows
// loses nothing), Kahan-compensated for float64 losses; a non-finite term (a masked target's
// +inf loss, NaN) is added plainly, since compensation would turn inf - inf into NaN.
struct SumD {
  double sum = 0, comp = 0;
  void add(double v) {
    if (!std::isfinite(v) || !std::isfinite(sum)) {
      sum += v;
      return;
    }
    const double y = v - comp;
    const double t = sum + y;
    comp = (t - sum) - y;
    sum = t;
  }
  double value() const { return std::isfinite(sum) ? sum - comp : sum; }
};

// A tensor of any float dtype read or written element by element (the loss in out_dtype,
// grad_out).
struct AnyFloat {
  void* p;
  at::ScalarType t;
  template <typename acc_t>
  void set(int64_t i, acc_t v) const {
    switch (t) {
      case at::kDouble: static_cast<double*>(p)[i] = static_cast<double>(v); break;
      case at::kFloat: static_cast<float*>(p)[i] = static_cast<float>(v); break;
      case at::kHalf: static_cast<at::Half*>(p)[i] = static_cast<at::Half>(static_cast<float>(v)); break;
      default: static_cast<at::BFloat16*>(p)[i] = static_cast<at::BFloat16>(static_cast<float>(v)); break;
    }
  }
  template <typename acc_t>
  acc_t get(int64_t i) const {
    switch (t) {
      case at::kDouble: return static_cast<acc_t>(static_cast<const double*>(p)[i]);
      case at::kFloat: return static_cast<acc_t>(static_cast<const float*>(p)[i]);
      case at::kHalf: return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(p)[i]));
      default: return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(p)[i]));
    }
  }
};

inline AnyFloat any_float(const at::Tensor& t) { return {const_cast<void*>(t.const_data_ptr()), t.scalar_type()}; }

// ----------------------------------------------------------------------------- all rows
// Pointers and strides of one softmax op's operands.
template <typename scalar_t>
struct Operands {
  const scalar_t* x;
  int64_t xN, xC, xD;
  const int64_t* tgt;
  int64_t tN, tD;
  const scalar_t* y;
  int64_t yN, yC, yD;
  const bool* m;
  int64_t mN, mC, mD;
  scalar_t* g;
  int64_t gN, gC, gD;
  int64_t N, C, D;

  Operands(const at::Tensor& logits, const at::Tensor& target, bool prob, const std::optional<at::Tensor>& mask,
           const at::Tensor* grad) {
    x = logits.const_data_ptr<scalar_t>();
    xN = logits.stride(0), xC = logits.stride(1), xD = logits.stride(2);
    tgt = prob ? nullptr : target.const_data_ptr<int64_t>();
    tN = prob ? 0 : target.stride(0), tD = prob ? 0 : target.stride(1);
    y = prob ? target.const_data_ptr<scalar_t>() : nullptr;
    yN = prob ? target.stride(0) : 0, yC = prob ? target.stride(1) : 0, yD = prob ? target.stride(2) : 0;
    m = mask ? mask->const_data_ptr<bool>() : nullptr;
    mN = mask ? mask->stride(0) : 0, mC = mask ? mask->stride(1) : 0, mD = mask ? mask->stride(2) : 0;
    g = grad ? grad->data_ptr<scalar_t>() : nullptr;
    gN = grad ? grad->stride(0) : 0, gC = grad ? grad->stride(1) : 0, gD = grad ? grad->stride(2) : 0;
    N = logits.size(0), C = logits.size(1), D = logits.size(2);
  }
  // Operands of row (n, d).
  Row<scalar_t> row_at(int64_t n, int64_t d) const {
    return Row<scalar_t>{x + n * xN + d * xD, xC, y ? y + n * yN + d * yD : nullptr, yC,
                         m ? m + n * mN + d * mD : nullptr, mC, g ? g + n * gN + d * gD : nullptr, gC};
  }
  int64_t target_at(int64_t n, int64_t d) const { return tgt ? tgt[n * tN + d * tD] : -1; }
  // K-dim with contiguous positions (and grad positions, when written): lanes across rows.
  bool lanes() const { return D > 1 && xD == 1 && (!g || gD == 1) && xC != 1; }
  bool contig_rows() const { return xC == 1 && (!g || gC == 1) && (!y || yC == 1); }
};

// Forward over all rows: per-row loss (reduction "none") or the fixed-order sums, the
// denominator, and the stats.
template <typename scalar_t>
void fwd_rows(const Config<at::opmath_type<scalar_t>>& cfg, const at::Tensor& logits, const at::Tensor& target,
              const std::optional<at::Tensor>& mask, int64_t reduction, const at::Tensor& out,
              const at::Tensor& denom, const at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const bool prob = cfg.kind == LossKind::kCeProb;
  const Operands<scalar_t> o(logits, target, prob, mask, nullptr);
  const int64_t N = o.N, C = o.C, D = o.D, R = N * D;
  const AnyFloat out_w = any_float(out);
  acc_t* st = stats.data_ptr<acc_t>();
  const acc_t prob_hard = acc_t(1) - cfg.eps;

  // One finished row: its loss (per row, or into the group's sum), count, stats.
  auto finish = [&](int64_t i, const row::RowCoefs<acc_t>& k, SumD& loss_sum, SumD& count_sum) {
    if (reduction == 0) {
      out_w.set(i, k.loss);
    } else {
      loss_sum.add(static_cast<double>(k.loss));
    }
    count_sum.add(static_cast<double>(k.count));
    row::write_stats(k, st + i * row::kNumStats, prob, prob_hard);
  };

  // Work items: one row, or (lane path) kV positions of one sample; groups of items summed
  // serially, ~4k elements each; tasks of ~32k elements.
  const bool lanes = o.lanes();
  const int64_t blocks_per_n = lanes ? (D + kV - 1) / kV : 0;
  const int64_t items = lanes ? N * blocks_per_n : R;
  const int64_t item_elems = lanes ? kV * C : C;
  const int64_t group = std::max<int64_t>(1, 4096 / item_elems);
  const int64_t groups = (items + group - 1) / group;
  const int64_t grain = std::max<int64_t>(1, 32768 / (group * item_elems));
  std::vector<double> partial(2 * groups);
  const bool contig = o.contig_rows();

  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      SumD loss_sum, count_sum;
      const int64_t i_end = std::min(items, (gi + 1) * group);
      for (int64_t i = gi * group; i < i_end; ++i) {
        if (lanes) {
          const int64_t n = i / blocks_per_n, d0 = (i % blocks_per_n) * kV, L = std::min(kV, D - d0);
          row::RowCoefs<acc_t> k[kV];
          softmax_lanes_fwd<acc_t, scalar_t>(cfg, o.row_at(n, d0), o.yD, o.mD,
                                             o.tgt ? o.tgt + n * o.tN + d0 * o.tD : nullptr, o.tD, L, k);
          for (int64_t l = 0; l < L; ++l) finish(n * D + d0 + l, k[l], loss_sum, count_sum);
        } else {
          const int64_t n = i / D, d = i % D;
          const Row<scalar_t> r = o.row_at(n, d);
          const int64_t t = o.target_at(n, d);
          finish(i, contig ? softmax_row_fwd<acc_t, true>(cfg, r, t) : softmax_row_fwd<acc_t, false>(cfg, r, t),
                 loss_sum, count_sum);
        }
      }
      partial[2 * gi] = loss_sum.value();
      partial[2 * gi + 1] = count_sum.value();
    }
  });

  SumD loss_total, count_total;
  for (int64_t gi = 0; gi < groups; ++gi) {
    loss_total.add(partial[2 * gi]);
    count_total.add(partial[2 * gi + 1]);
  }
  // "mean" in acc: total / denom, 0 when denom == 0 (SPEC rule 6)
  const acc_t den = static_cast<acc_t>(count_total.value());
  *denom.data_ptr<acc_t>() = den;
  if (reduction == 0) return;
  const acc_t total = static_cast<acc_t>(loss_total.value());
  out_w.set(0, reduction == 2 ? total : (den == acc_t(0) ? acc_t(0) : total / den));
}

// Backward over all rows. scale: per row from grad_out (reduction "none"), else `scale_all`.
template <typename scalar_t>
void bwd_rows(const Config<at::opmath_type<scalar_t>>& cfg, const at::Tensor& logits, const at::Tensor& target,
              const std::optional<at::Tensor>& mask, const at::Tensor& stats, const at::Tensor& grad,
              const at::Tensor& grad_out, int64_t reduction, at::opmath_type<scalar_t> scale_all) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const bool prob = cfg.kind == LossKind::kCeProb;
  const Operands<scalar_t> o(logits, target, prob, mask, &grad);
  const int64_t N = o.N, C = o.C, D = o.D, R = N * D;
  if (R == 0 || C == 0) return;
  const acc_t* st = stats.const_data_ptr<acc_t>();
  const AnyFloat go = any_float(grad_out);
  const int64_t goN = reduction == 0 ? grad_out.stride(0) : 0, goD = reduction == 0 ? grad_out.stride(1) : 0;
  auto scale_at = [&](int64_t n, int64_t d) { return reduction == 0 ? go.get<acc_t>(n * goN + d * goD) : scale_all; };

  // Lanes hold the target class as acc_t: exact below 2^24 (float) / 2^53 (double).
  const bool exact_classes = C < (int64_t(1) << (std::is_same_v<acc_t, float> ? 24 : 53));
  if (o.lanes() && (prob || exact_classes)) {
    const int64_t blocks_per_n = (D + kV - 1) / kV;
    const int64_t grain = std::max<int64_t>(1, 4096 / (kV * C));
    at::parallel_for(0, N * blocks_per_n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / blocks_per_n, d0 = (i % blocks_per_n) * kV, L = std::min(kV, D - d0);
        acc_t scale[kV];
        for (int64_t l = 0; l < L; ++l) scale[l] = scale_at(n, d0 + l);
        softmax_lanes_bwd<acc_t, scalar_t>(cfg, o.row_at(n, d0), o.yD, o.mD,
                                           o.tgt ? o.tgt + n * o.tN + d0 * o.tD : nullptr, o.tD, L,
                                           st + (n * D + d0) * row::kNumStats, scale);
      }
    });
    return;
  }

  const bool contig = o.contig_rows();
  // ~32k elements per task: big rows get one row per task, small-C rows are batched.
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / D, d = i % D;
      const Row<scalar_t> r = o.row_at(n, d);
      const int64_t t = o.target_at(n, d);
      const acc_t* s = st + i * row::kNumStats;
      if (contig) {
        softmax_row_bwd<acc_t, true>(cfg, r, t, s, scale_at(n, d));
      } else {
        softmax_row_bwd<acc_t, false>(cfg, r, t, s, scale_at(n, d));
      }
    }
  });
}

template <typename acc_t>
Config<acc_t> make_config(LossKind kind, const at::Tensor& logits, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& mask, int64_t ignore_index, double softcap) {
  Config<acc_t> cfg{};
  cfg.kind = kind;
  cfg.C = logits.size(1);
  cfg.ignore_index = ignore_index;
  cfg.weight = weight ? weight->const_data_ptr<acc_t>() : nullptr;
  cfg.has_mask = mask.has_value();
  cfg.cap = static_cast<acc_t>(softcap);
  cfg.softcap = softcap > 0;
  return cfg;
}

}  // namespace

// logits (N, C, D); target (N, D) int64 or (N, C, D) probabilities; weight (C,) acc;
// mask (N, C, D) bool; out (N, D) or () in out_dtype, denom () acc, stats (N, D, 4) acc,
// all three contiguous.
void ce_fwd_kernel(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& mask, int64_t ignore_index, double label_smoothing,
                   double z_loss, double softcap, int64_t reduction, const at::Tensor& out, const at::Tensor& denom,
                   const at::Tensor& stats) {
  const LossKind kind = at::isFloatingType(target.scalar_type()) ? LossKind::kCeProb : LossKind::kCeIndex;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_ce_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cfg = make_config<acc_t>(kind, logits, weight, mask, ignore_index, softcap);
    cfg.eps = static_cast<acc_t>(label_smoothing);
    cfg.smoothing = label_smoothing > 0;
    cfg.zl = static_cast<acc_t>(z_loss);
    fwd_rows<scalar_t>(cfg, logits, target, mask, reduction, out, denom, stats);
  });
}

// logits (N, C, D); target (N, D) int64; alpha (C,) acc; mask, out, denom, stats as ce_fwd.
void focal_fwd_kernel(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& alpha,
                      const std::optional<at::Tensor>& mask, int64_t ignore_index, double gamma, int64_t reduction,
                      const at::Tensor& out, const at::Tensor& denom, const at::Tensor& stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_focal_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cfg = make_config<acc_t>(LossKind::kFocal, logits, alpha, mask, ignore_index, 0.0);
    cfg.gamma = static_cast<acc_t>(gamma);
    fwd_rows<scalar_t>(cfg, logits, target, mask, reduction, out, denom, stats);
  });
}

// Backward of both: grad (N, C, D) logits' dtype, any strides (may be logits); stats from the
// forward; grad_out (N, D) for reduction 0, else grad_out_value / denom_value are its value
// and the forward's denominator (read by the caller).
void softmax_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mask,
                        const at::Tensor& stats, double softcap, int64_t reduction, double grad_out_value,
                        double denom_value, const at::Tensor& grad) {
  const LossKind kind = at::isFloatingType(target.scalar_type()) ? LossKind::kCeProb : LossKind::kCeIndex;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_softmax_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto cfg = make_config<acc_t>(kind, logits, weight, mask, /*ignore_index=*/0, softcap);
    const acc_t g = static_cast<acc_t>(grad_out_value);
    const acc_t scale = reduction == 1 ? row::mean_scale(g, static_cast<acc_t>(denom_value)) : g;
    bwd_rows<scalar_t>(cfg, logits, target, mask, stats, grad, grad_out, reduction, scale);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedloss
