// Per-element arithmetic of fusedloss::binary_fwd (BCE-with-logits and torchvision's sigmoid
// focal loss, with weight and pos_weight), shared by the CPU kernel (csrc/cpu/kernels/
// binary_losses.cpp, with T = at::vec::Vectorized<float/double>) and the CUDA kernel
// (csrc/cuda/binary_losses.cu, with T = float/double). The formulas are docs/formulas.md,
// section "BCE-with-logits and sigmoid focal"; the CPU tests therefore cover the CUDA math.
//
// This header includes no torch/ATen header, so nvcc can compile it. The math is written
// once, branch-free, against a small adapter ElemMath<T> (exp, log1p, pow, abs, max, where):
// the scalar adapters are here; the Vectorized adapters live in the CPU kernel file, which
// is the only place that knows at::vec.
#pragma once

#include <math.h>

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

namespace fusedloss {
namespace binary {

// log1p(e) for e in [0, 1], in float arithmetic: e * P(e), with P the degree-9 Chebyshev
// interpolant of log1p(e) / e on [0, 1] in monomial form (interpolation error 5e-9; measured
// float32 error at most 1.4 ulp over [0, 1], vs 1 ulp for Sleef's log1pf). The argument is
// always exp(-|x|), so no range reduction or special case is needed, which makes this about
// 4x cheaper than a general log1p, the largest cost of the CPU kernel. Only the loss goes
// through it (the gradient uses the sigmoids), and the loss tolerance is 1e-5 relative.
// Relative accuracy holds down to e -> 0 (P(0) = 1), where log1p(e) ~ e is the whole loss of
// a well-classified element.
template <typename T, typename M>
FUSEDLOSS_HD T log1p_unit_f32(const T& e) {
  T p(-3.176057053e-03f);
  p = M::fma(p, e, T(1.954252744e-02f));
  p = M::fma(p, e, T(-5.637361321e-02f));
  p = M::fma(p, e, T(1.054362384e-01f));
  p = M::fma(p, e, T(-1.526966710e-01f));
  p = M::fma(p, e, T(1.966327427e-01f));
  p = M::fma(p, e, T(-2.495161627e-01f));
  p = M::fma(p, e, T(3.332971050e-01f));
  p = M::fma(p, e, T(-4.999989265e-01f));
  p = M::fma(p, e, T(9.999999947e-01f));
  return p * e;
}

// Math adapter: specialized for float and double here, for at::vec::Vectorized in the CPU
// kernel. `Mask` is what a comparison returns (bool for scalars, a bit mask for vectors).
template <typename T>
struct ElemMath;

template <>
struct ElemMath<float> {
  using Mask = bool;
  static FUSEDLOSS_HD float exp(float v) { return ::expf(v); }
  static FUSEDLOSS_HD float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
  // log1p(v) for v in [0, 1]
  static FUSEDLOSS_HD float log1p_unit(float v) { return log1p_unit_f32<float, ElemMath<float>>(v); }
  static FUSEDLOSS_HD float pow(float b, float e) { return ::powf(b, e); }
  static FUSEDLOSS_HD float abs(float v) { return ::fabsf(v); }
  // NaN in `a` propagates (fmaxf would drop it).
  static FUSEDLOSS_HD float max0(float a) { return a < 0.0f ? 0.0f : a; }
  static FUSEDLOSS_HD float where(bool m, float a, float b) { return m ? a : b; }
  static FUSEDLOSS_HD bool is_zero(float v) { return v == 0.0f; }
  static FUSEDLOSS_HD bool is_nonneg(float v) { return v >= 0.0f; }
  static FUSEDLOSS_HD bool any(bool a, bool b) { return a || b; }
};

template <>
struct ElemMath<double> {
  using Mask = bool;
  static FUSEDLOSS_HD double exp(double v) { return ::exp(v); }
  static FUSEDLOSS_HD double log1p_unit(double v) { return ::log1p(v); }
  static FUSEDLOSS_HD double pow(double b, double e) { return ::pow(b, e); }
  static FUSEDLOSS_HD double abs(double v) { return ::fabs(v); }
  static FUSEDLOSS_HD double max0(double a) { return a < 0.0 ? 0.0 : a; }
  static FUSEDLOSS_HD double where(bool m, double a, double b) { return m ? a : b; }
  static FUSEDLOSS_HD bool is_zero(double v) { return v == 0.0; }
  static FUSEDLOSS_HD bool is_nonneg(double v) { return v >= 0.0; }
  static FUSEDLOSS_HD bool any(bool a, bool b) { return a || b; }
};

// Which power q^gamma the kernel computes; a template parameter so the common cases pay
// nothing for the general one.
enum GammaKind : int {
  kGamma0 = 0,    // gamma == 0: q^0 = 1 and no focal term (BCE, or alpha-weighted BCE)
  kGamma2 = 2,    // gamma == 2 (the usual focal loss): q * q, and no division (see below)
  kGammaPow = 1,  // any other gamma > 0: pow(q, gamma)
};

inline GammaKind gamma_kind(double gamma) {
  return gamma == 0.0 ? kGamma0 : gamma == 2.0 ? kGamma2 : kGammaPow;
}

// Loop-invariant parameters, already broadcast to T by the caller.
// alpha_t = alpha * y + (1 - alpha) * (1 - y) = alpha0 + alpha_slope * y with
// alpha0 = 1 - alpha, alpha_slope = 2 * alpha - 1; alpha < 0 (no alpha term) is
// alpha0 = 1, alpha_slope = 0, which gives exactly 1 (and w * 1 == w bit for bit).
template <typename T>
struct BinaryParams {
  T gamma;
  T alpha0;
  T alpha_slope;
};

template <typename S>
inline void binary_alpha_coefficients(double alpha, S& alpha0, S& alpha_slope) {
  if (alpha < 0) {
    alpha0 = S(1);
    alpha_slope = S(0);
  } else {
    alpha0 = S(1.0 - alpha);
    alpha_slope = S(2.0 * alpha - 1.0);
  }
}

// Loss of one element (x logit, y target, w weight, pw pos_weight); with kGrad also writes
// d(loss)/dx into *grad. Inputs and results in the accumulation type.
//
// Derivation (s = sigmoid(x), sn = sigmoid(-x) = 1 - s, sp = softplus):
//   ce      = pw * y * sp(-x) + (1 - y) * sp(x)
//             (= PyTorch's (1 - y) x + (1 + (pw - 1) y) sp(-x), since sp(x) = x + sp(-x);
//              this form has no inf - inf at x = +-inf, and a term whose coefficient is 0
//              is dropped instead of giving 0 * inf.)
//   dce/dx  = (1 - y) * s - pw * y * sn                  (sp'(x) = s, sp'(-x) = -sn)
// One exponential serves everything: with e = exp(-|x|) in (0, 1] (never overflows),
//   sp(+-x) = log1p(e) + max(+-x, 0),  sigmoid(|x|) = 1 / (1 + e),  sigmoid(-|x|) = e / (1 + e).
//
// Sigmoid focal loss (torchvision): q = 1 - p_t = (1 - y) * s + y * sn, c = w * alpha_t,
//   loss    = c * ce * q^gamma
//   dq/dx   = (1 - y) * s * sn - y * s * sn = (1 - 2y) * s * sn
//   dloss/dx = c * (dce/dx * q^gamma + gamma * ce * q^(gamma-1) * (1 - 2y) * s * sn)
//            = c * (dce/dx * q^gamma + gamma * ce * q^gamma * (1 - 2y) * r),  r = s * sn / q.
// r <= 1 (q is a convex combination of s and sn, so q >= min(s, sn) >= s * sn), so the
// gradient stays finite for 0 < gamma < 1 at saturated logits, where q^(gamma-1) alone
// overflows and autograd through torchvision's formula gives NaN (SPEC rule 13).
// At infinite x, s * sn == 0, so r == 0 and the second term is set to 0 (ce may be +inf
// there: 0 * inf must not become NaN). For gamma == 2, q^2 * r = q * s * sn: no division.
// c == 0 (weight 0, or alpha_t 0) gives loss 0 and gradient 0 whatever x is (rule 12).
template <int kGamma, bool kGrad, typename T, typename M = ElemMath<T>>
FUSEDLOSS_HD T binary_elem(T x, T y, T w, T pw, const BinaryParams<T>& p, T* grad) {
  const T zero(0), one(1);
  const T e = M::exp(-M::abs(x));
  const T log1p_e = M::log1p_unit(e);
  const T sig_abs = one / (one + e);  // sigmoid(|x|)
  const T sig_nabs = e * sig_abs;     // sigmoid(-|x|)
  const auto x_nonneg = M::is_nonneg(x);
  const T s = M::where(x_nonneg, sig_abs, sig_nabs);   // sigmoid(x)
  const T sn = M::where(x_nonneg, sig_nabs, sig_abs);  // sigmoid(-x)

  const T a = pw * y;   // coefficient of sp(-x): the positive part
  const T b = one - y;  // coefficient of sp(x): the negative part
  const T ce = M::where(M::is_zero(a), zero, a * (log1p_e + M::max0(-x))) +
               M::where(M::is_zero(b), zero, b * (log1p_e + M::max0(x)));
  const T c = w * (p.alpha0 + p.alpha_slope * y);
  const auto c_zero = M::is_zero(c);

  if (kGamma == kGamma0) {
    if (kGrad) *grad = M::where(c_zero, zero, c * (b * s - a * sn));
    return M::where(c_zero, zero, c * ce);
  } else {
    const T q = b * s + y * sn;
    const T ssn = s * sn;
    T qg, focal;  // q^gamma and gamma * q^gamma * r
    if (kGamma == kGamma2) {
      qg = q * q;
      focal = T(2) * q * ssn;  // 2 q^2 (s sn / q)
    } else {
      qg = M::pow(q, p.gamma);
      focal = M::where(M::is_zero(q), zero, p.gamma * qg * (ssn / q));
    }
    if (kGrad) {
      const T term2 = M::where(M::any(M::is_zero(ssn), M::is_zero(focal)), zero, focal * ce * (one - T(2) * y));
      *grad = M::where(c_zero, zero, c * ((b * s - a * sn) * qg + term2));
    }
    return M::where(c_zero, zero, c * ce * qg);
  }
}

}  // namespace binary
}  // namespace fusedloss
