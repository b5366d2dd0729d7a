// Per-row arithmetic of the softmax losses (ce_fwd, focal_fwd), shared by the CPU kernels
// (csrc/cpu/kernels/softmax_losses.cpp) and the CUDA kernels (csrc/cuda/softmax_losses.cu),
// so the CPU tests exercise the very formulas the GPU runs. docs/formulas.md is the
// specification; the comments below give the derivations in the form the code uses them.
//
// The kernels around this header do the memory traffic (loads, strides, threads, block
// reductions). This header only sees values:
//   pass 1 (every row)        online max / sum-exp over the allowed classes (+ the sums the
//                             smoothing and probability targets need)       -> RowStats
//   finalize (once per row)   row stats -> loss, count, gradient coefficients -> RowCoefs
//   stats (forward output)    RowCoefs -> [lse, coef_p, smooth, target_coef]: write_stats
//   backward (softmax_bwd)    per element: coef_p * p_c - coef_y_c, p_c = exp(z_c - lse),
//                             times dz/dx under softcap, times grad_out (/ denom), from the
//                             stats alone (read_stats, index_elem_grad / prob_elem_grad); at
//                             c == t this is the value target_grad() gives.
//
// Namespacing: on the CPU every kernel file is compiled once per capability (DEFAULT, AVX2,
// AVX512) with different instruction-set flags. Inline functions with the same mangled name
// in those objects would be merged by the linker, which could then run an AVX512 copy on a
// CPU without AVX512. So, as ATen does, the CPU build puts this header in
// fusedloss::CPU_CAPABILITY::row (CPU_CAPABILITY is a macro: DEFAULT / AVX2 / AVX512) and the
// CUDA build in fusedloss::row.
#pragma once

#include <math.h>
#include <stdint.h>

#ifndef FUSEDLOSS_HD
// Always inlined on the host too: GCC left the per-row finalize out of line, and returning its
// RowCoefs through memory stalled the K-dim lane loop (20% of its forward).
#if defined(__CUDACC__)
#define FUSEDLOSS_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FUSEDLOSS_HD inline __attribute__((always_inline))
#else
#define FUSEDLOSS_HD inline
#endif
#endif

#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
#define FUSEDLOSS_ROW_NAMESPACE_BEGIN namespace fusedloss { namespace CPU_CAPABILITY { namespace row {
#define FUSEDLOSS_ROW_NAMESPACE_END } } }
#else
#define FUSEDLOSS_ROW_NAMESPACE_BEGIN namespace fusedloss { namespace row {
#define FUSEDLOSS_ROW_NAMESPACE_END } }
#endif

FUSEDLOSS_ROW_NAMESPACE_BEGIN

// ----------------------------------------------------------------------------- math adapters
// Math<V> gives the transcendental functions for a value type V. Scalars (float, double)
// are specialized here; the CPU kernel file adds Math<at::vec::Vectorized<T>> (Sleef exp and
// tanh, 1 ulp), so the element templates below run unchanged on vectors. A class template is
// used rather than overloads because its specializations are found at instantiation time,
// after this header (overloads declared later would not be, for a dependent call).
template <typename V>
struct Math;

template <>
struct Math<float> {
  static FUSEDLOSS_HD float exp(float x) { return ::expf(x); }
  static FUSEDLOSS_HD float log(float x) { return ::logf(x); }
  static FUSEDLOSS_HD float tanh(float x) { return ::tanhf(x); }
  static FUSEDLOSS_HD float expm1(float x) { return ::expm1f(x); }
  static FUSEDLOSS_HD float pow(float x, float y) { return ::powf(x, y); }
  static FUSEDLOSS_HD float splat(float x) { return x; }
};

template <>
struct Math<double> {
  static FUSEDLOSS_HD double exp(double x) { return ::exp(x); }
  static FUSEDLOSS_HD double log(double x) { return ::log(x); }
  static FUSEDLOSS_HD double tanh(double x) { return ::tanh(x); }
  static FUSEDLOSS_HD double expm1(double x) { return ::expm1(x); }
  static FUSEDLOSS_HD double pow(double x, double y) { return ::pow(x, y); }
  static FUSEDLOSS_HD double splat(double x) { return x; }
};

template <typename T>
FUSEDLOSS_HD T neg_inf() { return static_cast<T>(-INFINITY); }

template <typename T>
FUSEDLOSS_HD T pos_inf() { return static_cast<T>(INFINITY); }

template <typename T>
FUSEDLOSS_HD T quiet_nan() { return static_cast<T>(NAN); }

// max that propagates NaN from either side (fmax and std::max drop it). A NaN logit in a
// counted row must reach the loss (SPEC rule 8); carrying it through the running max does
// that for free: exp(z - NaN) = NaN poisons the sum, and m == -inf then reliably means
// "every class masked" (an empty row) rather than "every class masked, or NaN".
template <typename T>
FUSEDLOSS_HD T nan_max(T a, T b) { return (a != a || a > b) ? a : b; }

// ----------------------------------------------------------------------------- online max / sum-exp
// A partial row is summarized by (m, s): m = max of its z, s = sum exp(z - m). Two partial
// rows merge exactly:  m = max(m1, m2),  s = s1 exp(m1 - m) + s2 exp(m2 - m).
// m == -inf (nothing allowed yet) is kept out of the exponent, where -inf - -inf = NaN;
// m == +inf yields NaN, as PyTorch does for a +inf logit.
template <typename T>
FUSEDLOSS_HD void merge_max_sum(T& m, T& s, T m2, T s2) {
  const T mn = nan_max(m, m2);
  if (mn == neg_inf<T>()) return;  // both parts empty
  s = s * Math<T>::exp(m - mn) + s2 * Math<T>::exp(m2 - mn);  // exp(-inf - finite) = 0
  m = mn;
}

// Adds one value (z = -inf for a masked class: a no-op).
template <typename T>
FUSEDLOSS_HD void add_max_sum(T& m, T& s, T z) {
  if (z == neg_inf<T>()) return;
  if (z == pos_inf<T>()) {  // exp(z - m) = exp(inf - inf): NaN, as merge_max_sum and PyTorch give
    m = s = quiet_nan<T>();
    return;
  }
  if (z > m) {  // rescale the old sum to the new max; exp(-inf) = 0 when m was -inf
    s = s * Math<T>::exp(m - z) + T(1);
    m = z;
  } else if (z != z || m != m) {  // NaN: poison both
    m = s = quiet_nan<T>();
  } else {
    s += Math<T>::exp(z - m);
  }
}

// ----------------------------------------------------------------------------- row classification
// Order matters (docs/formulas.md): ignored first, whatever the logits hold (NaN too); then
// an out-of-range target (never used as an index); "empty" needs pass 1 (is_empty_row).
enum RowKind : int { kCounted = 0, kIgnored = 1, kOutOfRange = 2 };

FUSEDLOSS_HD RowKind classify_target(int64_t t, int64_t ignore_index, int64_t num_classes) {
  // ignore_index may be negative (e.g. -1), so compare with it before any range test.
  if (t == ignore_index) return kIgnored;
  if (t < 0 || t >= num_classes) return kOutOfRange;
  return kCounted;
}

// Every class masked and no NaN (nan_max keeps NaN in m, so NaN rows are not empty).
template <typename T>
FUSEDLOSS_HD bool is_empty_row(T m) { return m == neg_inf<T>(); }

// ----------------------------------------------------------------------------- pass-1 results
template <typename T>
struct RowStats {
  T m = neg_inf<T>();  // max_{c in A} z_c   (NaN when a counted logit is NaN)
  T s = T(0);          // sum_{c in A} exp(z_c - m)
  // label smoothing (class or probability targets), else left 0:
  T n_allowed = T(0);   // |A|
  T w_allowed = T(0);   // W_A = sum_{c in A} w_c
  T wz_allowed = T(0);  // sum_{c in A} w_c z_c
  // probability targets, else left 0:
  T wy = T(0);   // sum_c w_c y_c
  T wyz = T(0);  // sum_c w_c y_c z_c over terms with w_c y_c != 0 (0 * log 0 = 0, rule 7)
  // wz_allowed and wyz may be taken relative to a reference: sum w (z_c - zref). With zref
  // the row max the finalize computes (lse - zref) = log s exactly and the sums stay
  // small, instead of cancelling lse * sum(w) against sum(w z) (float32 over 32k classes
  // with logits ~20 lost ~3 digits of a small loss that way). 0 = raw sums.
  T zref = T(0);
  // m + log(s) in double, when the caller has it (the CPU lane path takes the logs of a
  // vector of rows at once); NaN: fold_lse_rounding computes it.
  double lse_d = NAN;
};

// What the gradient needs for one row. Every gradient of these losses has the form
//   dloss/dz_c = coef_p * p_c - coef_y_c        (allowed c != t)
// (the softmax Jacobian applied to a per-class "target" vector), with
//   coef_y_c = smooth * w_c                      class targets (0 without smoothing)
//            = w_c * ((1 - eps) y_c + smooth)    probability targets (smooth = eps/|A|)
// and the class-index target gets the extra -target_coef (target_grad below).
template <typename T>
struct RowCoefs {
  T loss = T(0);
  T count = T(0);
  T lse = T(0);          // logsumexp over the allowed classes
  T coef_p = T(0);       // multiplies p_c
  T smooth = T(0);       // eps / |A| (0 without smoothing)
  T target_coef = T(0);  // extra -target_coef at c == t; the whole gradient of a masked target
  bool grad = false;     // false: the row's gradient is exactly 0 (ignored / empty / out of range)
};

// A row whose loss is 0, count 0 and gradient 0 (ignored and empty rows, rules 2 and 3).
template <typename T>
FUSEDLOSS_HD RowCoefs<T> zero_row() { return RowCoefs<T>(); }

// GPU kernels only: an out-of-range class target reads nothing and yields loss NaN, count 0,
// gradient 0 (the CPU raises IndexError instead).
template <typename T>
FUSEDLOSS_HD RowCoefs<T> out_of_range_row() {
  RowCoefs<T> r;
  r.loss = quiet_nan<T>();
  return r;
}

// ----------------------------------------------------------------------------- finalize
// lse = m + log(s). Terms are written as (m - z) + log(s) where a single z is involved: the
// difference of two large logits is exact-ish, lse - z computed from a rounded lse is not.
template <typename T>
FUSEDLOSS_HD T lse_of(const RowStats<T>& st) { return st.m + Math<T>::log(st.s); }

// `a * b`, but 0 when a == 0 whatever b is (a term whose coefficient is 0 contributes 0:
// (1 - eps) * (lse - z_t) at eps = 1 with a masked target must not be 0 * inf = NaN).
template <typename T>
FUSEDLOSS_HD T coef_times(T a, T b) { return a == T(0) ? T(0) : a * b; }

// Float32 stats store lse rounded to float: an error of up to half an ulp of |lse| (5e-7 at
// lse ~ 12, 1e-6 past 16) that every p_c = exp(z_c - lse) in backward inherits, so ~1e-6 on a
// gradient near 1, the float32 tolerance (measured: 6.8e-7 from this alone). The rounding is
// known here: with lse_d = m + log(s) in double,
//   exp(z_c - lse_d) = exp(z_c - lse) * exp(lse - lse_d),   exp(lse - lse_d) = 1 - (lse_d - lse)
// to 1e-13, and coef_p is the only coefficient that multiplies p_c, so it takes the factor:
// backward's coef_p * exp(z_c - lse), with the stored lse, is then coef_p * p_c to float
// rounding (measured: 6.4e-7 -> 2.9e-7). One double log per row; float64 needs nothing.
// Called by the finalize functions, after coef_p is final.
template <typename T>
FUSEDLOSS_HD void fold_lse_rounding(const RowStats<T>& st, RowCoefs<T>& r) {
  if (sizeof(T) >= sizeof(double) || !(r.lse == r.lse) || r.lse == pos_inf<T>()) return;
  const double lse_d =
      st.lse_d == st.lse_d ? st.lse_d : static_cast<double>(st.m) + ::log(static_cast<double>(st.s));
  r.coef_p = static_cast<T>(static_cast<double>(r.coef_p) * (1.0 - (lse_d - static_cast<double>(r.lse))));
}

// A NaN logit in a counted row makes lse NaN; the loss must be NaN too (SPEC rule 8), even
// where coef_times dropped the term whose coefficient is 0 (w_t = 0, alpha_t = 0, eps = 1).
template <typename T>
FUSEDLOSS_HD T nan_of_row(T lse, T loss) { return lse != lse ? lse : loss; }

// Cross-entropy with class-index target t (row already known counted: not ignored, in range).
//   loss = (1 - eps) w_t (lse - z_t) + (eps/|A|) sum_{c in A} w_c (lse - z_c) + zl w_t lse^2
//        = (1 - eps) w_t (lse - z_t) + (eps/|A|) (W_A lse - sum_A w_c z_c)  + zl w_t lse^2
//   dloss/dz_c = (1 - eps) w_t (p_c - [c == t])              d(lse)/dz_c = p_c
//              + (eps/|A|) (W_A p_c - w_c [c in A])
//              + 2 zl w_t lse p_c
// so coef_p = (1 - eps) w_t + (eps/|A|) W_A + 2 zl w_t lse, smooth = eps/|A|,
// target_coef = (1 - eps) w_t. A masked target (z_t = -inf, rule 4) gives loss +inf and the
// gradient -(1 - eps) w_t at t. `smoothing` false drops the eps terms entirely (no 0 * inf).
template <typename T>
FUSEDLOSS_HD RowCoefs<T> ce_finalize_index(const RowStats<T>& st, T z_t, T w_t, T eps, T zl, bool smoothing) {
  if (is_empty_row(st.m)) return zero_row<T>();
  RowCoefs<T> r;
  r.grad = true;
  r.count = w_t;
  const T log_s = Math<T>::log(st.s);
  r.lse = st.m + log_s;
  const T hard = (T(1) - eps) * w_t;
  r.loss = coef_times(hard, (st.m - z_t) + log_s);  // +inf for a masked target
  r.coef_p = hard;
  r.target_coef = hard;
  if (smoothing) {
    r.smooth = eps / st.n_allowed;
    r.loss += r.smooth * (st.w_allowed * ((st.m - st.zref) + log_s) - st.wz_allowed);
    r.coef_p += r.smooth * st.w_allowed;
  }
  if (zl != T(0)) {
    r.loss += zl * w_t * r.lse * r.lse;
    r.coef_p += T(2) * zl * w_t * r.lse;
  }
  fold_lse_rounding(st, r);
  r.loss = nan_of_row(r.lse, r.loss);
  return r;
}

// Cross-entropy with probability targets y (no ignore_index). With y'_c = (1 - eps) y_c +
// (eps/|A|) [c in A]:
//   loss = sum_c w_c y'_c (lse - z_c) + zl lse^2
//        = lse sum_c w_c y'_c - sum_c w_c y'_c z_c + zl lse^2
//   sum_c w_c y'_c     = (1 - eps) sum_c w_c y_c     + (eps/|A|) W_A
//   sum_c w_c y'_c z_c = (1 - eps) sum_c w_c y_c z_c + (eps/|A|) sum_A w_c z_c
//   dloss/dz_c = (sum_k w_k y'_k + 2 zl lse) p_c - w_c y'_c
// A masked class with y_c > 0 has z_c = -inf in wyz: loss +inf, gradient -w_c y'_c.
template <typename T>
FUSEDLOSS_HD RowCoefs<T> ce_finalize_prob(const RowStats<T>& st, T eps, T zl, bool smoothing) {
  if (is_empty_row(st.m)) return zero_row<T>();
  RowCoefs<T> r;
  r.grad = true;
  r.count = T(1);
  r.lse = lse_of(st);
  const T hard = T(1) - eps;
  T wy = coef_times(hard, st.wy);
  T wyz = coef_times(hard, st.wyz);
  if (smoothing) {
    r.smooth = eps / st.n_allowed;
    wy += r.smooth * st.w_allowed;
    wyz += r.smooth * st.wz_allowed;
  }
  r.loss = ((st.m - st.zref) + Math<T>::log(st.s)) * wy - wyz;  // (lse - zref) wy - wyz
  r.coef_p = wy;
  if (zl != T(0)) {
    r.loss += zl * r.lse * r.lse;
    r.coef_p += T(2) * zl * r.lse;
  }
  fold_lse_rounding(st, r);
  r.loss = nan_of_row(r.lse, r.loss);
  return r;
}

// Softmax focal loss, target t, alpha_t (1 when alpha is None).
//   logp = z_t - lse,  p = exp(logp),  q = 1 - p = -expm1(logp)   (expm1: exact when p ~ 1)
//   loss = -alpha_t q^gamma logp
// Through p = softmax_t (dp/dz_c = p (delta_ct - p_c)):
//   dloss/dp   = alpha_t (gamma q^(gamma-1) logp - q^gamma / p)
//   dloss/dz_c = dloss/dp * p (delta_ct - p_c) = G (p_c - delta_ct),
//   G = alpha_t q^gamma (1 - gamma p r),  r = logp / q
// r -> -1 as p -> 1 (logp ~ -q), so G stays finite for 0 < gamma < 1 where q^(gamma-1)
// alone overflows; r = -1 at q == 0 exactly. gamma = 0: G = alpha_t (cross-entropy).
// A masked target: logp = -inf, p = 0, q = 1: loss +inf, G = alpha_t.
template <typename T>
FUSEDLOSS_HD RowCoefs<T> focal_finalize(const RowStats<T>& st, T z_t, T alpha_t, T gamma) {
  if (is_empty_row(st.m)) return zero_row<T>();
  RowCoefs<T> r;
  r.grad = true;
  r.count = T(1);
  const T log_s = Math<T>::log(st.s);
  r.lse = st.m + log_s;
  const T logp = (z_t - st.m) - log_s;
  const T p = Math<T>::exp(logp);
  const T q = -Math<T>::expm1(logp);
  const T qg = gamma == T(0) ? T(1) : Math<T>::pow(q, gamma);
  // p == 0 (masked target, logp = -inf): gamma p r is 0, not 0 * -inf.
  const T ratio = q == T(0) ? T(-1) : (p == T(0) ? T(0) : logp / q);
  r.loss = coef_times(alpha_t * qg, -logp);  // alpha_t = 0 at a masked target: 0, not 0 * inf
  const T G = gamma == T(0) ? alpha_t : alpha_t * qg * (T(1) - gamma * p * ratio);
  r.coef_p = G;
  r.target_coef = G;
  fold_lse_rounding(st, r);
  r.loss = nan_of_row(r.lse, r.loss);
  return r;
}

// ----------------------------------------------------------------------------- per element (gradient)
// V is a scalar (float, double) or, on the CPU, at::vec::Vectorized<float/double>; every
// argument is already of type V (broadcast by the caller).

// softcap c: z = c tanh(x / c), dz/dx = 1 - tanh(x / c)^2. Returns z, writes dz/dx.
template <typename V>
FUSEDLOSS_HD V softcap_z(V x, V cap, V inv_cap, V one, V& dzdx) {
  const V t = Math<V>::tanh(x * inv_cap);
  dzdx = one - t * t;
  return cap * t;
}

// p_c = softmax_c = exp(z_c - lse).
template <typename V>
FUSEDLOSS_HD V softmax_p(V z, V lse) { return Math<V>::exp(z - lse); }

// dloss/dz_c of an allowed class other than the target: coef_p p_c - coef_y_c.
template <typename V>
FUSEDLOSS_HD V grad_of_p(V p, V coef_p, V coef_y) { return coef_p * p - coef_y; }

// The class-index target's gradient: allowed, (coef_p p_t - smooth w_t - target_coef) dz/dx;
// masked (rule 4), -target_coef, with no softcap factor (the class has no logit to cap).
template <typename T>
FUSEDLOSS_HD T target_grad(const RowCoefs<T>& r, T z_t, T dzdx_t, T w_t, bool t_allowed) {
  if (!t_allowed) return -r.target_coef;
  const T p_t = Math<T>::exp(z_t - r.lse);
  return (r.coef_p * p_t - r.smooth * w_t - r.target_coef) * dzdx_t;
}

// ----------------------------------------------------------------------------- stats (forward -> backward)
// The forward op stores per row what softmax_bwd needs, stats[4] in the accumulation type:
//   [0] lse          -inf marks a row whose gradient is exactly 0 (ignored / empty / out of
//                    range): backward writes zeros and reads none of its logits
//   [1] coef_p       [2] smooth       [3] target_coef       (0 on rows without gradient)
// For probability targets target_coef is (1 - eps): with y'_c = (1 - eps) y_c + smooth [c in A]
// (ce_finalize_prob), coef_y_c = w_c y'_c = w_c (target_coef y_c + smooth [c in A]).
enum StatsSlot : int { kStatLse = 0, kStatCoefP = 1, kStatSmooth = 2, kStatTargetCoef = 3, kNumStats = 4 };

// `prob_hard` is (1 - eps) for probability targets; index targets keep r.target_coef.
template <typename T>
FUSEDLOSS_HD void write_stats(const RowCoefs<T>& r, T* stats, bool prob, T prob_hard) {
  if (!r.grad) {
    stats[kStatLse] = neg_inf<T>();
    stats[kStatCoefP] = stats[kStatSmooth] = stats[kStatTargetCoef] = T(0);
    return;
  }
  stats[kStatLse] = r.lse;
  stats[kStatCoefP] = r.coef_p;
  stats[kStatSmooth] = r.smooth;
  stats[kStatTargetCoef] = prob ? prob_hard : r.target_coef;
}

// One row's backward coefficients, with the gradient's scale (grad_out, / denom) folded in:
//   dloss/dz_c * scale = (coef_p scale) p_c - (coef_y_c scale)
// (scale multiplies four numbers once per row instead of every element).
template <typename T>
struct BwdRow {
  T lse = neg_inf<T>();
  T coef_p = T(0), smooth = T(0), target_coef = T(0);
};

template <typename T>
FUSEDLOSS_HD bool row_has_grad(T lse) { return lse != neg_inf<T>(); }

template <typename T>
FUSEDLOSS_HD BwdRow<T> read_stats(const T* stats, T scale) {
  BwdRow<T> b;
  b.lse = stats[kStatLse];
  if (!row_has_grad(b.lse)) return b;
  b.coef_p = stats[kStatCoefP] * scale;
  b.smooth = stats[kStatSmooth] * scale;
  b.target_coef = stats[kStatTargetCoef] * scale;
  return b;
}

// The scale of a "mean" gradient: grad_out / denom, 0 when denom == 0 (SPEC rule 6: a mean
// over no counted row is 0, with zero gradient). "sum": grad_out; "none": grad_out[row].
template <typename T>
FUSEDLOSS_HD T mean_scale(T grad_out, T denom) { return denom == T(0) ? T(0) : grad_out / denom; }

// An allowed class's gradient (scalar or vector V): (coef_p p_c - coef_y_c) dz/dx, with
// p_c = exp(z_c - lse), coef_y_c as in RowCoefs (for a class-index target including its
// extra target_coef), dzdx = 1 without softcap.
template <typename V>
FUSEDLOSS_HD V allowed_grad(V z, V dzdx, V lse, V coef_p, V coef_y) {
  return grad_of_p(softmax_p(z, lse), coef_p, coef_y) * dzdx;
}

// Element c of a class-index row (scalar form; the CPU kernel runs the same arithmetic on
// vectors). z = softcap(x) of an allowed class; a masked class gets exactly 0, a masked
// target (rule 4) -target_coef, with no softcap factor (the class has no logit to cap).
template <typename T>
FUSEDLOSS_HD T index_elem_grad(const BwdRow<T>& b, T z, T dzdx, T w_c, bool allowed, bool is_target) {
  if (!allowed) return is_target ? -b.target_coef : T(0);
  const T coef_y = b.smooth * w_c + (is_target ? b.target_coef : T(0));
  return allowed_grad(z, dzdx, b.lse, b.coef_p, coef_y);
}

// Element c of a probability-target row: coef_y_c = w_c (target_coef y_c + smooth [c in A]).
// A masked class with y_c > 0 keeps -w_c target_coef y_c (rule 4); target_coef = 0 (eps = 1)
// drops that term outright.
template <typename T>
FUSEDLOSS_HD T prob_elem_grad(const BwdRow<T>& b, T z, T dzdx, T w_c, T y_c, bool allowed) {
  const T wy = coef_times(b.target_coef, w_c * y_c);
  if (!allowed) return -wy;
  return allowed_grad(z, dzdx, b.lse, b.coef_p, wy + b.smooth * w_c);
}

FUSEDLOSS_ROW_NAMESPACE_END
