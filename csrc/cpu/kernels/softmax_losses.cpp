// CPU kernels of ce_fwd and focal_fwd (schemas: csrc/ops.cpp; math: docs/formulas.md and
// csrc/common/softmax_row.h, whose per-row formulas the CUDA kernels share).
//
// Compiled once per CPU capability (setup.py), inside fusedloss::CPU_CAPABILITY, with
// at::vec::Vectorized<acc_t> (acc_t = float, or double for float64 logits; bf16/fp16 are
// converted to float on load). at::parallel_for splits the rows; each row is handled by one
// thread in at most two passes over its C logits:
//   pass 1  online max / sum-exp, by blocks of kBlock vectors held in registers: one
//           horizontal max per block, then one exp per element (the running sum is rescaled
//           once per block, not once per element). The smoothing and probability-target sums
//           ride along. When the gradient is wanted and the row is plain (float/double,
//           contiguous, no mask, smoothing or softcap), pass 1 also stores e_c = exp(z_c - M_b)
//           into grad with the block's running max M_b, so pass 2 needs no exp at all.
//   pass 2  only with grad: writes dloss/dx_c while the row is still in L2. In place
//           (grad aliasing logits) is safe: every element is read before it is written, in
//           the same order, and the target logit is read before pass 1.
// A row is "contiguous" when the class stride of logits (and grad, probability target) is 1,
// whatever the row strides; otherwise (K-dim inputs, transposed views) the same code gathers
// each vector with a strided scalar loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/softmax_row.h"

namespace fusedloss {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

namespace row {
// Vector adapter of the shared element formulas: Sleef exp/tanh (1 ulp; exp_u20 would break
// the 1e-6 float32 gradient tolerance).
template <typename T>
struct Math<Vectorized<T>> {
  static Vectorized<T> exp(const Vectorized<T>& x) { return x.exp(); }
  static Vectorized<T> tanh(const Vectorized<T>& x) { return x.tanh(); }
};
}  // namespace row

namespace {

enum class LossKind { kCeIndex, kCeProb, kFocal };

constexpr int kBlock = 8;  // vectors per pass-1 block (8 registers; 128 floats on AVX512)

template <typename acc_t>
struct Config {
  LossKind kind;
  int64_t C;
  int64_t ignore_index;
  const acc_t* weight;  // (C,) class weight (ce) or alpha (focal), or nullptr
  acc_t eps, zl, cap, gamma;
  bool smoothing;  // eps > 0
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
  scalar_t* g;  // grad or nullptr
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

// Pass 2 for one vector of classes: dloss/dz = coef_p p - coef_y, times the softcap factor,
// and the exact value at masked lanes: 0, or -(1 - eps) w y for a masked class with y > 0
// (rule 4; (1 - eps) = 0 gives 0). wy = w * y for probability targets (unused otherwise).
template <typename acc_t>
inline Vectorized<acc_t> pass2_grad(const Config<acc_t>& cfg, const Vectorized<acc_t>& z,
                                    const Vectorized<acc_t>& allowed, const Vectorized<acc_t>& dzdx,
                                    const Vectorized<acc_t>& w, const Vectorized<acc_t>& wy,
                                    const Vectorized<acc_t>& lse, const Vectorized<acc_t>& coef_p,
                                    const Vectorized<acc_t>& smooth) {
  using V = Vectorized<acc_t>;
  const V zero(acc_t(0)), hard(acc_t(1) - cfg.eps);
  V coef_y = zero, masked_g = zero;
  if (cfg.kind == LossKind::kCeProb) {
    masked_g = cfg.eps == acc_t(1) ? zero : zero - hard * wy;
    coef_y = (cfg.eps == acc_t(1) ? zero : hard * wy) + smooth * w;
  } else if (cfg.smoothing) {
    coef_y = smooth * w;
  }
  V g = row::grad_of_p(row::softmax_p(z, lse), coef_p, coef_y);
  if (cfg.softcap) g = g * dzdx;
  return V::blendv(masked_g, g, allowed);
}

template <typename acc_t>
struct RowResult {
  acc_t loss, count;
};

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

// `block_max`: scratch of ceil(C / (kBlock * kV)) entries, used when `store_e`.
template <typename acc_t, bool kContig, typename scalar_t>
RowResult<acc_t> softmax_row(const Config<acc_t>& cfg, const Row<scalar_t>& r, int64_t t, bool store_e,
                             acc_t* block_max) {
  using V = Vectorized<acc_t>;
  constexpr int kV = V::size();
  constexpr int64_t kStep = int64_t(kBlock) * kV;
  const int64_t C = cfg.C;
  const bool index_target = cfg.kind != LossKind::kCeProb;

  // --- classification, and the target's logit (read before anything is written: in place)
  acc_t z_t = 0, dzdx_t = 1, w_t = 1;
  bool t_allowed = false;
  if (index_target) {
    const auto kind = row::classify_target(t, cfg.ignore_index, C);
    TORCH_CHECK_INDEX(kind != row::kOutOfRange, "fusedloss: target ", t, " is out of bounds: class targets must be in [0, ",
                      C, ") (C = ", C, ") or equal ignore_index (", cfg.ignore_index, ")");
    if (kind == row::kIgnored) {
      if (r.g) zero_row_grad<kContig, acc_t>(r.g, r.gs, C);
      return {acc_t(0), acc_t(0)};
    }
    const acc_t x_t = static_cast<acc_t>(r.x[t * r.xs]);
    t_allowed = x_t != row::neg_inf<acc_t>() && (!cfg.has_mask || r.mask[t * r.ms]);
    z_t = t_allowed ? x_t : row::neg_inf<acc_t>();
    if (t_allowed && cfg.softcap) {
      // The same (vector) tanh as the row's max: a scalar tanh 1 ulp away made
      // (m - z_t) negative on a confident row, and so its loss.
      using V = Vectorized<acc_t>;
      V d;
      const V zv = row::softcap_z(V(x_t), V(cfg.cap), V(acc_t(1) / cfg.cap), V(acc_t(1)), d);
      acc_t zbuf[V::size()], dbuf[V::size()];
      zv.store(zbuf);
      d.store(dbuf);
      z_t = zbuf[0];
      dzdx_t = dbuf[0];
    }
    if (cfg.weight) w_t = cfg.weight[t];
  }

  // --- pass 1
  const bool side = cfg.smoothing || cfg.kind == LossKind::kCeProb;
  const V ninf(row::neg_inf<acc_t>()), zero(acc_t(0)), one(acc_t(1));
  acc_t M = row::neg_inf<acc_t>();
  V n_acc(acc_t(0));        // exact: integer counts
  V wyz_masked(acc_t(0));   // 1 in a lane that met a masked class with y > 0: wyz = -inf
  KahanVec<acc_t> s_acc, wa_acc, wz_acc, wy_acc, wyz_acc;
  for (int64_t c0 = 0, b = 0; c0 < C; c0 += kStep, ++b) {
    V z[kBlock], allowed[kBlock];
    V bmax = ninf;
    for (int j = 0; j < kBlock; ++j) {
      const int64_t c = c0 + int64_t(j) * kV;
      z[j] = c < C ? load_z<acc_t, kContig>(cfg, r, c, C - c, allowed[j], nullptr) : ninf;
      bmax = at::vec::maximum(bmax, z[j]);
    }
    const acc_t Mn = row::nan_max(M, reduce_max(bmax));
    if (side) {
      // Side sums relative to the running max (RowStats::zref): rebase what was summed
      // against the previous max, then add this block's w (z - Mn). While nothing is
      // allowed yet the terms are 0 or -inf, so there is nothing to rebase.
      const bool finite_ref = !row::is_empty_row(Mn);
      const acc_t ref = finite_ref ? Mn : acc_t(0);
      if (finite_ref && !row::is_empty_row(M) && !(Mn == M)) {
        const V shift(Mn - M);
        wz_acc.add(zero - shift * wa_acc.value());
        wyz_acc.add(zero - shift * wy_acc.value());
      }
      const V vref(ref);
      V wa[kBlock], wz[kBlock], wy[kBlock], wyz[kBlock];
      for (int j = 0; j < kBlock; ++j) {
        const int64_t c = c0 + int64_t(j) * kV;
        wa[j] = wz[j] = wy[j] = wyz[j] = zero;
        if (c >= C) continue;
        const V w = cfg.weight ? load_vec<acc_t, true>(cfg.weight + c, 1, C - c, acc_t(0)) : one;
        const V zr = z[j] - vref;
        if (cfg.smoothing) {
          n_acc += V::blendv(zero, one, allowed[j]);
          wa[j] = V::blendv(zero, w, allowed[j]);
          wz[j] = V::blendv(zero, w * zr, allowed[j]);  // w * -inf never reaches the sum
        }
        if (cfg.kind == LossKind::kCeProb) {
          wy[j] = w * load_vec<acc_t, kContig>(r.y + c * r.ys, r.ys, C - c, acc_t(0));
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
    if (row::is_empty_row(Mn)) {  // nothing allowed so far: e = 0
      if (store_e) {
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          for (int64_t c = c0; c < std::min(C, c0 + kStep); c += kV) zero.store(r.g + c, std::min<int64_t>(kV, C - c));
        }
        block_max[b] = Mn;
      }
      continue;
    }
    if (!(Mn == M)) s_acc.scale(V(row::Math<acc_t>::exp(M - Mn)));  // M = -inf: 0
    M = Mn;
    const V vM(M);
    V e[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      e[j] = row::Math<V>::exp(z[j] - vM);
      const int64_t c = c0 + int64_t(j) * kV;
      if (store_e && c < C) {
        if constexpr (std::is_same_v<scalar_t, acc_t>) e[j].store(r.g + c, std::min<int64_t>(kV, C - c));
      }
    }
    s_acc.add(pairwise_sum<V, kBlock>(e));
    if (store_e) block_max[b] = M;
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
  row::RowCoefs<acc_t> k;
  switch (cfg.kind) {
    case LossKind::kCeIndex: k = row::ce_finalize_index(st, z_t, w_t, cfg.eps, cfg.zl, cfg.smoothing); break;
    case LossKind::kCeProb: k = row::ce_finalize_prob(st, cfg.eps, cfg.zl, cfg.smoothing); break;
    case LossKind::kFocal: k = row::focal_finalize(st, z_t, w_t, cfg.gamma); break;
  }
  const RowResult<acc_t> res{k.loss, k.count};
  if (!r.g) return res;
  if (!k.grad) {
    zero_row_grad<kContig, acc_t>(r.g, r.gs, C);
    return res;
  }

  // --- pass 2
  if (store_e) {
    // grad holds e_c = exp(z_c - M_b): p_c = e_c exp(M_b - lse), one exp per block.
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int64_t c0 = 0, b = 0; c0 < C; c0 += kStep, ++b) {
        const V scale(k.coef_p * row::Math<acc_t>::exp(block_max[b] - k.lse));
        const int64_t end = std::min(C, c0 + kStep);
        int64_t c = c0;
        for (; c + kV <= end; c += kV) {
          row::grad_of_p(V::loadu(r.g + c), scale, zero).store(r.g + c);
        }
        if (c < end) row::grad_of_p(V::loadu(r.g + c, end - c), scale, zero).store(r.g + c, end - c);
      }
    }
  } else {
    const V lse(k.lse), coef_p(k.coef_p), smooth(k.smooth);
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t n = C - c;
      V allowed, dzdx, w = one, wy = zero;
      const V z = load_z<acc_t, kContig>(cfg, r, c, n, allowed, &dzdx);
      if (cfg.weight && (cfg.smoothing || cfg.kind == LossKind::kCeProb)) {
        w = load_vec<acc_t, true>(cfg.weight + c, 1, n, acc_t(0));
      }
      if (cfg.kind == LossKind::kCeProb) wy = w * load_vec<acc_t, kContig>(r.y + c * r.ys, r.ys, n, acc_t(0));
      store_vec<kContig>(r.g + c * r.gs, r.gs, n, pass2_grad(cfg, z, allowed, dzdx, w, wy, lse, coef_p, smooth));
    }
  }
  if (index_target) {
    r.g[t * r.gs] = static_cast<scalar_t>(row::target_grad(k, z_t, dzdx_t, w_t, t_allowed));
  }
  return res;
}

// ----------------------------------------------------------------------------- K-dim rows
// K-dim input (N, C, D) with positions contiguous (stride_d == 1, as in NCHW): a row's
// classes are D apart, so the row path gathers every vector element by element. Here the
// vector lanes are kV consecutive positions (rows) instead: each class is one contiguous
// load for kV rows. Pass 1 takes the lanes' max, then their sums against it (max-relative,
// so RowStats::zref = m exactly); the shared finalize runs per lane; pass 2 writes the
// gradient lane-wise. Same formulas and row kinds as softmax_row.
template <typename acc_t, typename scalar_t>
void softmax_lanes(const Config<acc_t>& cfg, const Row<scalar_t>& base, int64_t ys_d, int64_t ms_d,
                   const int64_t* tgt, int64_t t_stride, int64_t L, acc_t* loss_out, acc_t* count_out) {
  // base: operands of the block's first row; base.xs/ys/ms/gs are the CLASS strides; the
  // lane (position) stride is 1 for logits and grad, ys_d / ms_d for target / mask.
  using V = Vectorized<acc_t>;
  constexpr int kV = V::size();
  const int64_t C = cfg.C;
  const bool index_target = cfg.kind != LossKind::kCeProb;
  const V ninf(row::neg_inf<acc_t>()), zero(acc_t(0)), one(acc_t(1));
  auto lane_row = [&](int64_t c) {  // the kV rows' class c as a "row" of kV lanes
    return Row<scalar_t>{base.x + c * base.xs, 1, base.y ? base.y + c * base.ys : nullptr, ys_d,
                         base.mask ? base.mask + c * base.ms : nullptr, ms_d, nullptr, 1};
  };

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

  // pass 1a: the lanes' max
  V m = ninf;
  for (int64_t c = 0; c < C; ++c) {
    V allowed;
    m = at::vec::maximum(m, load_z<acc_t, true>(cfg, lane_row(c), 0, L, allowed, nullptr));
  }
  // pass 1b: sums relative to m (-inf lanes: nothing allowed, every term is 0 or -inf)
  const V ref = V::blendv(m, zero, m == ninf);
  KahanVec<acc_t> s_acc, wa_acc, wz_acc, wy_acc, wyz_acc;
  V n_acc = zero, wyz_masked = zero;
  for (int64_t c = 0; c < C; ++c) {
    V allowed;
    const Row<scalar_t> r = lane_row(c);
    const V zr = load_z<acc_t, true>(cfg, r, 0, L, allowed, nullptr) - ref;
    s_acc.add(row::Math<V>::exp(zr));  // masked: exp(-inf) = 0
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
  row::RowCoefs<acc_t> k[kV];
  alignas(64) acc_t lse[kV], coef_p[kV], smooth[kV], gate[kV];
  acc_t z_t[kV], dzdx_t[kV], w_t[kV];
  bool t_allowed[kV];
  for (int l = 0; l < kV; ++l) {
    k[l] = row::zero_row<acc_t>();
    z_t[l] = row::neg_inf<acc_t>(), dzdx_t[l] = acc_t(1), w_t[l] = acc_t(1), t_allowed[l] = false;
    if (live[l]) {
      row::RowStats<acc_t> st;
      st.m = mv[l];
      st.s = sv[l];
      st.zref = row::is_empty_row(mv[l]) ? acc_t(0) : mv[l];
      st.n_allowed = nv[l], st.w_allowed = wav[l], st.wz_allowed = wzv[l];
      st.wy = wyv[l], st.wyz = wyzm[l] > acc_t(0) ? row::neg_inf<acc_t>() : wyzv[l];
      if (index_target) {
        const int64_t tl = t[l];
        const acc_t x_t = static_cast<acc_t>(base.x[tl * base.xs + l]);
        t_allowed[l] = x_t != row::neg_inf<acc_t>() && (!base.mask || base.mask[tl * base.ms + l * ms_d]);
        if (t_allowed[l]) {
          // the target's z from the same vector load_z as pass 1 (same tanh, same bits)
          V allowed, d;
          const V zv = load_z<acc_t, true>(cfg, lane_row(tl), 0, L, allowed, &d);
          alignas(64) acc_t zb[kV], db[kV];
          zv.store(zb);
          d.store(db);
          z_t[l] = zb[l];
          dzdx_t[l] = cfg.softcap ? db[l] : acc_t(1);
        }
        if (cfg.weight) w_t[l] = cfg.weight[tl];
      }
      switch (cfg.kind) {
        case LossKind::kCeIndex: k[l] = row::ce_finalize_index(st, z_t[l], w_t[l], cfg.eps, cfg.zl, cfg.smoothing); break;
        case LossKind::kCeProb: k[l] = row::ce_finalize_prob(st, cfg.eps, cfg.zl, cfg.smoothing); break;
        case LossKind::kFocal: k[l] = row::focal_finalize(st, z_t[l], w_t[l], cfg.gamma); break;
      }
    }
    if (l < L) {
      loss_out[l] = k[l].loss;
      count_out[l] = k[l].count;
    }
    lse[l] = k[l].grad ? k[l].lse : acc_t(0);
    coef_p[l] = k[l].coef_p, smooth[l] = k[l].smooth;
    gate[l] = k[l].grad ? acc_t(1) : acc_t(0);
  }
  if (!base.g) return;

  // pass 2: lanes whose row has no gradient (ignored / empty) get exact zeros
  const V vlse = V::loadu(lse), vcoef = V::loadu(coef_p), vsmooth = V::loadu(smooth);
  const V vgate = V::loadu(gate) != zero;
  for (int64_t c = 0; c < C; ++c) {
    const Row<scalar_t> r = lane_row(c);
    V allowed, dzdx;
    const V z = load_z<acc_t, true>(cfg, r, 0, L, allowed, &dzdx);
    const V w = cfg.weight ? V(cfg.weight[c]) : one;
    const V wy = cfg.kind == LossKind::kCeProb ? w * load_vec<acc_t, false>(r.y, r.ys, L, acc_t(0)) : zero;
    const V g = pass2_grad(cfg, z, allowed, dzdx, w, wy, vlse, vcoef, vsmooth);
    store_vec<true>(base.g + c * base.gs, 1, L, V::blendv(zero, g, vgate));
  }
  if (index_target) {
    for (int l = 0; l < L; ++l) {
      if (k[l].grad) {
        base.g[t[l] * base.gs + l] = static_cast<scalar_t>(row::target_grad(k[l], z_t[l], dzdx_t[l], w_t[l], t_allowed[l]));
      }
    }
  }
}

// ----------------------------------------------------------------------------- all rows
template <typename scalar_t>
void run_rows(const Config<at::opmath_type<scalar_t>>& cfg, const at::Tensor& logits, const at::Tensor& target,
              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& grad,
              const at::Tensor& loss, const at::Tensor& count) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static_assert(std::is_same_v<acc_t, at::opmath_type<scalar_t>>);
  using V = Vectorized<acc_t>;
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2), R = N * D;
  if (R == 0) return;
  const bool prob = cfg.kind == LossKind::kCeProb;

  // pointers                                              strides (elements)
  const scalar_t* x = logits.const_data_ptr<scalar_t>();   const int64_t xN = logits.stride(0), xC = logits.stride(1), xD = logits.stride(2);
  const int64_t* tgt = prob ? nullptr : target.const_data_ptr<int64_t>();
  const int64_t tN = prob ? 0 : target.stride(0), tD = prob ? 0 : target.stride(1);
  const scalar_t* y = prob ? target.const_data_ptr<scalar_t>() : nullptr;
  const int64_t yN = prob ? target.stride(0) : 0, yC = prob ? target.stride(1) : 0, yD = prob ? target.stride(2) : 0;
  const bool* m = mask ? mask->const_data_ptr<bool>() : nullptr;
  const int64_t mN = mask ? mask->stride(0) : 0, mC = mask ? mask->stride(1) : 0, mD = mask ? mask->stride(2) : 0;
  scalar_t* g = grad ? grad->data_ptr<scalar_t>() : nullptr;
  const int64_t gN = grad ? grad->stride(0) : 0, gC = grad ? grad->stride(1) : 0, gD = grad ? grad->stride(2) : 0;
  acc_t* loss_p = loss.data_ptr<acc_t>();
  acc_t* count_p = count.data_ptr<acc_t>();

  // K-dim with contiguous positions: vector lanes across rows (softmax_lanes).
  if (D > 1 && xD == 1 && (!g || gD == 1) && xC != 1) {
    constexpr int64_t kV = V::size();
    const int64_t blocks_per_n = (D + kV - 1) / kV;
    const int64_t grain = std::max<int64_t>(1, 4096 / (kV * C));
    at::parallel_for(0, N * blocks_per_n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / blocks_per_n, d0 = (i % blocks_per_n) * kV, L = std::min(kV, D - d0);
        Row<scalar_t> base{x + n * xN + d0, xC, y ? y + n * yN + d0 * yD : nullptr, yC,
                           m ? m + n * mN + d0 * mD : nullptr, mC, g ? g + n * gN + d0 : nullptr, gC};
        softmax_lanes<acc_t, scalar_t>(cfg, base, yD, mD, tgt ? tgt + n * tN + d0 * tD : nullptr, tD, L,
                                       loss_p + n * D + d0, count_p + n * D + d0);
      }
    });
    return;
  }

  const bool contig = xC == 1 && (!g || gC == 1) && (!prob || yC == 1);
  // Pass 1 stores exp into grad (saving pass 2's exp) only on plain rows: no mask, smoothing
  // or softcap, which pass 2 would need the logits back for (gone when grad aliases them).
  const bool store_e = g && contig && std::is_same_v<scalar_t, acc_t> && !prob && !cfg.has_mask && !cfg.smoothing &&
                       !cfg.softcap;
  const int64_t n_blocks = (C + int64_t(kBlock) * V::size() - 1) / (int64_t(kBlock) * V::size());
  // ~32k elements per task: big rows get one row per task, small-C rows are batched.
  const int64_t grain = std::max<int64_t>(1, 32768 / C);

  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block_max(store_e ? n_blocks : 0);  // once per task, not per row
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / D, d = i % D;
      Row<scalar_t> row{x + n * xN + d * xD, xC, y ? y + n * yN + d * yD : nullptr, yC,
                        m ? m + n * mN + d * mD : nullptr, mC, g ? g + n * gN + d * gD : nullptr, gC};
      const int64_t t = tgt ? tgt[n * tN + d * tD] : -1;
      const RowResult<acc_t> res = contig ? softmax_row<acc_t, true>(cfg, row, t, store_e, block_max.data())
                                          : softmax_row<acc_t, false>(cfg, row, t, false, nullptr);
      loss_p[i] = res.loss;
      count_p[i] = res.count;
    }
  });
}

template <typename acc_t>
Config<acc_t> make_config(LossKind kind, const at::Tensor& logits, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& mask, int64_t ignore_index) {
  Config<acc_t> cfg{};
  cfg.kind = kind;
  cfg.C = logits.size(1);
  cfg.ignore_index = ignore_index;
  cfg.weight = weight ? weight->const_data_ptr<acc_t>() : nullptr;
  cfg.has_mask = mask.has_value();
  return cfg;
}

}  // namespace

// logits (N, C, D); target (N, D) int64 or (N, C, D) probabilities; weight (C,) acc;
// mask (N, C, D) bool; grad (N, C, D); loss, count (N, D) acc, contiguous.
void ce_fwd_kernel(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& grad, int64_t ignore_index,
                   double label_smoothing, double z_loss, double softcap, const at::Tensor& loss,
                   const at::Tensor& count) {
  const LossKind kind = at::isFloatingType(target.scalar_type()) ? LossKind::kCeProb : LossKind::kCeIndex;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_ce_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cfg = make_config<acc_t>(kind, logits, weight, mask, ignore_index);
    cfg.eps = static_cast<acc_t>(label_smoothing);
    cfg.smoothing = label_smoothing > 0;
    cfg.zl = static_cast<acc_t>(z_loss);
    cfg.cap = static_cast<acc_t>(softcap);
    cfg.softcap = softcap > 0;
    run_rows<scalar_t>(cfg, logits, target, mask, grad, loss, count);
  });
}

// logits (N, C, D); target (N, D) int64; alpha (C,) acc; mask, grad, loss, count as ce_fwd.
void focal_fwd_kernel(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& alpha,
                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& grad,
                      int64_t ignore_index, double gamma, const at::Tensor& loss, const at::Tensor& count) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_focal_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cfg = make_config<acc_t>(LossKind::kFocal, logits, alpha, mask, ignore_index);
    cfg.gamma = static_cast<acc_t>(gamma);
    run_rows<scalar_t>(cfg, logits, target, mask, grad, loss, count);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedloss
