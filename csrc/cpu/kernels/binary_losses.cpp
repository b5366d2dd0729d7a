// CPU kernels of fusedloss::binary_fwd and binary_bwd: BCE-with-logits and torchvision's
// sigmoid focal loss, elementwise over an (M, L) view. binary_fwd computes the loss (per
// element, or its sum / mean) and, given grad, the gradient for grad_output == 1 in the same
// pass; binary_bwd recomputes the gradient times grad_output (per element or scalar).
//
// Compiled once per CPU capability (setup.py), everything inside
// namespace fusedloss::CPU_CAPABILITY; csrc/cpu/binary_ops.cpp picks the build at run time.
// The per-element math is csrc/common/binary_elem.h, run here on at::vec::Vectorized with
// Sleef's 1-ulp exp and pow (the u20 approximations would miss the 1e-6 float32 gradient
// tolerance) and, for float, binary_elem.h's 1.4-ulp log1p on [0, 1] (Sleef's general log1pf
// cost 40% of the kernel), so the CUDA kernel computes exactly these formulas too.
//
// Memory traffic: input and target are read once, the gradient written once, and either the
// per-element loss or nothing (the sum stays in registers and per-item partials); weight,
// pos_weight and grad_out are read through their (often 0) strides, never materialized at
// (M, L); a bool or integer target is read as it is (converted to acc_t in L1), never copied
// to a float tensor first.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/binary_elem.h"

namespace fusedloss {
namespace binary {

// at::vec adapter for binary_elem (Vectorized is already per capability: at::vec::CPU_CAPABILITY).
template <typename S>
struct ElemMath<at::vec::Vectorized<S>> {
  using T = at::vec::Vectorized<S>;
  using Mask = T;  // comparisons give all-ones / all-zeros lanes
  static T exp(const T& v) { return v.exp(); }        // Sleef u10
  static T fma(const T& a, const T& b, const T& c) { return at::vec::fmadd(a, b, c); }
  // log1p(v) for v in [0, 1]: the shared polynomial for float (binary_elem.h), Sleef u10 for double
  static T log1p_unit(const T& v) {
    if constexpr (std::is_same<S, float>::value) {
      return log1p_unit_f32<T, ElemMath>(v);
    } else {
      return v.log1p();
    }
  }
  static T pow(const T& b, const T& e) { return b.pow(e); }
  static T abs(const T& v) { return v.abs(); }
  static T max0(const T& v) { return at::vec::maximum(v, T(S(0))); }  // propagates NaN
  static T where(const T& m, const T& a, const T& b) { return T::blendv(b, a, m); }
  static T is_zero(const T& v) { return v == T(S(0)); }
  static T is_nonneg(const T& v) { return v >= T(S(0)); }
  static T any(const T& a, const T& b) { return a | b; }
};

}  // namespace binary

namespace CPU_CAPABILITY {
namespace {

using binary::BinaryParams;
using binary::binary_elem;

// A work item covers up to kItemCols elements: a piece of one long row (so that a single long
// row, a 1-D input, still spreads over threads) or several short rows. The reduced loss adds
// the items' partial sums in a fixed order afterwards, so it does not depend on the thread
// count.
constexpr int64_t kItemCols = 4096;
// Strided / reduced-precision operands are staged through buffers of this many elements
// (a few buffers of acc_t stay in L1); it is also the length of the vector partial sums
// (kStageCols / kV adds per lane before a flush into double).
constexpr int64_t kStageCols = 256;

// An acc_t operand read along one row: `ptr[j]` (contiguous) or `*ptr` (broadcast).
template <typename acc_t>
struct RowOperand {
  const acc_t* ptr;
  bool contiguous;
};

template <typename acc_t>
inline double hsum(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  alignas(64) acc_t lanes[Vec::size()];
  v.store(lanes);
  double total = 0;
  for (int64_t k = 0; k < Vec::size(); ++k) total += lanes[k];
  return total;
}

// n elements held in contiguous acc_t arrays (weight / pos_weight / gradient scale contiguous
// or broadcast). kGrad: writes the gradient times gs into grad. loss != nullptr: stores the
// per-element loss; kSum: returns the sum of the losses, in a fixed order (vector partials of
// kStageCols elements flushed into double).
template <int kGamma, bool kGrad, bool kSum, typename acc_t>
double binary_span(int64_t n, const acc_t* x, const acc_t* y, RowOperand<acc_t> w, RowOperand<acc_t> pw,
                   RowOperand<acc_t> gs, acc_t* grad, acc_t* loss,
                   const BinaryParams<at::vec::Vectorized<acc_t>>& p) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec w_b(w.contiguous ? acc_t(0) : *w.ptr);
  const Vec pw_b(pw.contiguous ? acc_t(0) : *pw.ptr);
  const Vec gs_b(gs.contiguous ? acc_t(0) : *gs.ptr);
  double total = 0;
  Vec sum(acc_t(0));
  Vec g;
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const Vec wv = w.contiguous ? Vec::loadu(w.ptr + j) : w_b;
    const Vec pwv = pw.contiguous ? Vec::loadu(pw.ptr + j) : pw_b;
    const Vec l = binary_elem<kGamma, kGrad>(Vec::loadu(x + j), Vec::loadu(y + j), wv, pwv, p, &g);
    if (kGrad) (g * (gs.contiguous ? Vec::loadu(gs.ptr + j) : gs_b)).store(grad + j);
    if (loss != nullptr) l.store(loss + j);
    if (kSum) {
      sum = sum + l;
      if ((j + V) % kStageCols == 0) {
        total += hsum(sum);
        sum = Vec(acc_t(0));
      }
    }
  }
  if (j < n) {
    const int64_t r = n - j;
    const Vec wv = w.contiguous ? Vec::loadu(w.ptr + j, r) : w_b;
    const Vec pwv = pw.contiguous ? Vec::loadu(pw.ptr + j, r) : pw_b;
    const Vec l = binary_elem<kGamma, kGrad>(Vec::loadu(x + j, r), Vec::loadu(y + j, r), wv, pwv, p, &g);
    if (kGrad) (g * (gs.contiguous ? Vec::loadu(gs.ptr + j, r) : gs_b)).store(grad + j, r);
    if (loss != nullptr) l.store(loss + j, r);
    if (kSum) sum = sum + Vec::set(Vec(acc_t(0)), l, r);  // lanes past n hold junk: drop them
  }
  return kSum ? total + hsum(sum) : 0.0;
}

// Strided (M, L) operand: element (i, j) at ptr[i * s0 + j * s1]; `dtype` for operands of
// any float dtype (grad_out, the loss output).
template <typename T>
struct Strided {
  T* ptr;
  int64_t s0, s1;
  at::ScalarType dtype;
  T* row(int64_t i) const { return ptr + i * s0; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  return {static_cast<T*>(const_cast<void*>(t.const_data_ptr())), t.stride(0), t.stride(1), t.scalar_type()};
}

template <typename T>
Strided<T> strided_none() {
  return {nullptr, 0, 0, at::kFloat};
}

// Contiguous acc_t copy of n elements at src[j * s1] (converting bf16/fp16 to float).
template <typename scalar_t, typename acc_t>
void stage_in(const scalar_t* src, int64_t s1, int64_t n, acc_t* dst) {
  if (s1 == 1) {
    at::vec::convert(src, dst, n);
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc_t>(src[k * s1]);
  }
}

template <typename scalar_t, typename acc_t>
void stage_out(const acc_t* src, int64_t n, scalar_t* dst, int64_t s1) {
  if (s1 == 1) {
    at::vec::convert(src, dst, n);
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k * s1] = static_cast<scalar_t>(src[k]);
  }
}

// The same for an operand whose dtype is only known at run time.
template <typename acc_t>
void stage_in_any(const void* src, at::ScalarType t, int64_t s1, int64_t n, acc_t* dst) {
  switch (t) {
    case at::kDouble: return stage_in(static_cast<const double*>(src), s1, n, dst);
    case at::kFloat: return stage_in(static_cast<const float*>(src), s1, n, dst);
    case at::kHalf: return stage_in(static_cast<const at::Half*>(src), s1, n, dst);
    default: return stage_in(static_cast<const at::BFloat16*>(src), s1, n, dst);
  }
}

// A target of the input's dtype, bool or integer, as acc_t (0/1 labels: exact).
template <typename acc_t>
void stage_in_target(const void* src, at::ScalarType t, int64_t s1, int64_t n, acc_t* dst) {
  switch (t) {
    case at::kBool: return stage_in(static_cast<const bool*>(src), s1, n, dst);
    case at::kByte: return stage_in(static_cast<const uint8_t*>(src), s1, n, dst);
    case at::kChar: return stage_in(static_cast<const int8_t*>(src), s1, n, dst);
    case at::kShort: return stage_in(static_cast<const int16_t*>(src), s1, n, dst);
    case at::kInt: return stage_in(static_cast<const int32_t*>(src), s1, n, dst);
    case at::kLong: return stage_in(static_cast<const int64_t*>(src), s1, n, dst);
    default: return stage_in_any(src, t, s1, n, dst);
  }
}

template <typename acc_t>
void stage_out_any(const acc_t* src, int64_t n, void* dst, at::ScalarType t, int64_t s1) {
  switch (t) {
    case at::kDouble: return stage_out(src, n, static_cast<double*>(dst), s1);
    case at::kFloat: return stage_out(src, n, static_cast<float*>(dst), s1);
    case at::kHalf: return stage_out(src, n, static_cast<at::Half*>(dst), s1);
    default: return stage_out(src, n, static_cast<at::BFloat16*>(dst), s1);
  }
}

inline size_t elem_size(at::ScalarType t) { return c10::elementSize(t); }

template <typename scalar_t>
struct BinaryProblem {
  using acc_t = at::opmath_type<scalar_t>;
  // pointers (w, pw: nullptr = all ones; g: nullptr = no gradient; out: nullptr = no loss)
  Strided<const scalar_t> x;
  Strided<const void> y;  // target: input's dtype, bool or integer (y.dtype)
  Strided<const acc_t> w, pw;
  Strided<scalar_t> g;
  Strided<void> out;        // per-element loss (reduction none), out_dtype, or nullptr
  Strided<const void> gsc;  // per-element gradient scale (binary_bwd, reduction none), or nullptr
  acc_t gscale;             // the gradient scale otherwise
  // sizes
  int64_t M, L;
  BinaryParams<at::vec::Vectorized<acc_t>> p;
};

// Elements [j0, j0 + n) of row i; returns their loss sum when kSum.
template <int kGamma, bool kGrad, bool kSum, typename scalar_t>
double binary_item(const BinaryProblem<scalar_t>& P, int64_t i, int64_t j0, int64_t n) {
  using acc_t = typename BinaryProblem<scalar_t>::acc_t;
  static const acc_t kOne = acc_t(1);
  constexpr bool kSameType = std::is_same<scalar_t, acc_t>::value;
  const at::ScalarType acc_type = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  // An acc_t operand is read in place when contiguous or broadcast along the row.
  auto direct = [](const Strided<const acc_t>& o) { return o.ptr == nullptr || o.s1 == 0 || o.s1 == 1; };
  auto operand = [&](const Strided<const acc_t>& o, int64_t j, acc_t* buf, int64_t len) -> RowOperand<acc_t> {
    if (o.ptr == nullptr) return {&kOne, false};
    const acc_t* at = o.row(i) + j * o.s1;
    if (o.s1 == 0 || o.s1 == 1) return {at, o.s1 == 1};
    stage_in(at, o.s1, len, buf);
    return {buf, true};
  };
  auto scale_operand = [&](int64_t j, acc_t* buf, int64_t len) -> RowOperand<acc_t> {
    if (P.gsc.ptr == nullptr) return {&P.gscale, false};
    const char* at = static_cast<const char*>(P.gsc.ptr) + (i * P.gsc.s0 + j * P.gsc.s1) * elem_size(P.gsc.dtype);
    if (P.gsc.dtype == acc_type && (P.gsc.s1 == 0 || P.gsc.s1 == 1)) {
      return {reinterpret_cast<const acc_t*>(at), P.gsc.s1 == 1};
    }
    stage_in_any(at, P.gsc.dtype, P.gsc.s1, len, buf);
    return {buf, true};
  };
  const bool out_direct = P.out.ptr == nullptr || (P.out.dtype == acc_type && P.out.s1 == 1);
  const bool gsc_direct = P.gsc.ptr == nullptr || (P.gsc.dtype == acc_type && P.gsc.s1 <= 1);
  // input, target and gradient in place when contiguous acc_t; else staged through buffers
  const bool x_direct = kSameType && P.x.s1 == 1;
  const bool y_direct = P.y.dtype == acc_type && P.y.s1 == 1;
  const bool g_direct = !kGrad || (kSameType && P.g.s1 == 1);
  auto y_at = [&](int64_t j) {
    return static_cast<const char*>(P.y.ptr) + (i * P.y.s0 + j * P.y.s1) * elem_size(P.y.dtype);
  };
  auto out_at = [&](int64_t j) {
    return static_cast<char*>(P.out.ptr) + (i * P.out.s0 + j * P.out.s1) * elem_size(P.out.dtype);
  };

  if (x_direct && y_direct && g_direct && direct(P.w) && direct(P.pw) && out_direct && gsc_direct) {
    const acc_t* x = reinterpret_cast<const acc_t*>(P.x.row(i)) + j0;
    const acc_t* y = reinterpret_cast<const acc_t*>(y_at(j0));
    acc_t* g = kGrad ? reinterpret_cast<acc_t*>(P.g.row(i)) + j0 : nullptr;
    acc_t* loss = P.out.ptr ? reinterpret_cast<acc_t*>(out_at(j0)) : nullptr;
    return binary_span<kGamma, kGrad, kSum>(n, x, y, operand(P.w, j0, nullptr, 0), operand(P.pw, j0, nullptr, 0),
                                            scale_operand(j0, nullptr, 0), g, loss, P.p);
  }

  // Staged: gather / convert kStageCols elements at a time into acc_t buffers (only the
  // operands that need it: a bool target beside a contiguous float input stages the target).
  acc_t xb[kStageCols], yb[kStageCols], wb[kStageCols], pwb[kStageCols], sb[kStageCols], gb[kStageCols],
      lb[kStageCols];
  double total = 0;
  for (int64_t k = 0; k < n; k += kStageCols) {
    const int64_t len = std::min(kStageCols, n - k);
    const int64_t j = j0 + k;
    const acc_t* xp = xb;
    if (x_direct) {
      xp = reinterpret_cast<const acc_t*>(P.x.row(i)) + j;
    } else {
      stage_in(P.x.row(i) + j * P.x.s1, P.x.s1, len, xb);
    }
    const acc_t* yp = yb;
    if (y_direct) {
      yp = reinterpret_cast<const acc_t*>(y_at(j));
    } else {
      stage_in_target(y_at(j), P.y.dtype, P.y.s1, len, yb);
    }
    acc_t* gp = kGrad && g_direct ? reinterpret_cast<acc_t*>(P.g.row(i)) + j : gb;
    acc_t* lp = P.out.ptr == nullptr ? nullptr : out_direct ? reinterpret_cast<acc_t*>(out_at(j)) : lb;
    total += binary_span<kGamma, kGrad, kSum>(len, xp, yp, operand(P.w, j, wb, len), operand(P.pw, j, pwb, len),
                                              scale_operand(j, sb, len), gp, lp, P.p);
    if (kGrad && !g_direct) stage_out(gb, len, P.g.row(i) + j * P.g.s1, P.g.s1);
    if (P.out.ptr && !out_direct) stage_out_any(lb, len, out_at(j), P.out.dtype, P.out.s1);
  }
  return total;
}

// Runs every element; returns the loss sum when kSum (fixed order: items' partials in order).
template <int kGamma, bool kGrad, bool kSum, typename scalar_t>
double binary_run(const BinaryProblem<scalar_t>& P) {
  const int64_t M = P.M, L = P.L;
  if (M == 0 || L == 0) return 0.0;
  // Items: a row piece of kItemCols columns (long rows), or `rows` whole short rows.
  const int64_t cols = std::min(L, kItemCols);
  const int64_t chunks = (L + cols - 1) / cols;
  const int64_t rows = chunks == 1 ? std::max<int64_t>(1, kItemCols / L) : 1;
  const int64_t items = chunks == 1 ? (M + rows - 1) / rows : M * chunks;
  std::vector<double> partial(kSum ? items : 0);
  const int64_t grain = std::max<int64_t>(1, 32768 / (rows * cols));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      double s = 0;
      if (chunks == 1) {
        for (int64_t i = it * rows; i < std::min(M, (it + 1) * rows); ++i) s += binary_item<kGamma, kGrad, kSum>(P, i, 0, L);
      } else {
        const int64_t i = it / chunks, j0 = (it - i * chunks) * cols;
        s = binary_item<kGamma, kGrad, kSum>(P, i, j0, std::min(cols, L - j0));
      }
      if (kSum) partial[it] = s;
    }
  });
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

template <bool kGrad, bool kSum, typename scalar_t>
double binary_gamma(const BinaryProblem<scalar_t>& P, int64_t gamma_kind) {
  switch (gamma_kind) {
    case binary::kGamma0: return binary_run<binary::kGamma0, kGrad, kSum>(P);
    case binary::kGamma2: return binary_run<binary::kGamma2, kGrad, kSum>(P);
    default: return binary_run<binary::kGammaPow, kGrad, kSum>(P);
  }
}

// Shared set-up of binary_fwd and binary_bwd.
template <typename scalar_t>
BinaryProblem<scalar_t> make_problem(const at::Tensor& input, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& pos_weight, const at::Tensor* grad,
                                     const at::Tensor* out, const at::Tensor* grad_scale, double gamma, double alpha0,
                                     double alpha_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  BinaryProblem<scalar_t> P{
      strided<const scalar_t>(input),
      strided<const void>(target),
      weight ? strided<const acc_t>(*weight) : strided_none<const acc_t>(),
      pos_weight ? strided<const acc_t>(*pos_weight) : strided_none<const acc_t>(),
      grad ? strided<scalar_t>(*grad) : strided_none<scalar_t>(),
      out ? strided<void>(*out) : strided_none<void>(),
      grad_scale ? strided<const void>(*grad_scale) : strided_none<const void>(),
      acc_t(1),
      input.size(0),
      input.size(1),
      {Vec(acc_t(gamma)), Vec(acc_t(alpha0)), Vec(acc_t(alpha_slope))},
  };
  // Operands that are all "row-major" (stride(0) == L * stride(1), 0 strides included) form one
  // long row, so the work splits evenly whatever the row length.
  auto flat = [&](int64_t s0, int64_t s1, bool present) { return !present || s0 == P.L * s1; };
  if (P.M > 1 && flat(P.x.s0, P.x.s1, true) && flat(P.y.s0, P.y.s1, true) && flat(P.w.s0, P.w.s1, P.w.ptr) &&
      flat(P.pw.s0, P.pw.s1, P.pw.ptr) && flat(P.g.s0, P.g.s1, P.g.ptr) && flat(P.out.s0, P.out.s1, P.out.ptr) &&
      flat(P.gsc.s0, P.gsc.s1, P.gsc.ptr)) {
    P.L *= P.M;
    P.M = 1;
  }
  return P;
}

template <typename scalar_t>
void binary_fwd_typed(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& grad,
                      const at::Tensor& out, int64_t gamma_kind, double gamma, double alpha0, double alpha_slope,
                      int64_t reduction) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = input.size(0) * input.size(1);
  auto P = make_problem<scalar_t>(input, target, weight, pos_weight, grad ? &*grad : nullptr,
                                  reduction == 0 ? &out : nullptr, nullptr, gamma, alpha0, alpha_slope);
  if (reduction == 0) {
    binary_gamma<false, false>(P, gamma_kind);
    return;
  }
  // The gradient for grad_output == 1: of the sum, or of the mean (times 1 / numel).
  if (reduction == 1 && numel > 0) P.gscale = static_cast<acc_t>(1.0 / static_cast<double>(numel));
  const double sum = grad ? binary_gamma<true, true>(P, gamma_kind) : binary_gamma<false, true>(P, gamma_kind);
  // "mean" in acc: sum / numel, NaN (0 / 0) for an empty input, as PyTorch
  const acc_t total = static_cast<acc_t>(sum);
  const acc_t value = reduction == 2 ? total : total / static_cast<acc_t>(numel);
  stage_out_any(&value, 1, out.data_ptr(), out.scalar_type(), 1);
}

template <typename scalar_t>
void binary_bwd_typed(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                      const at::Tensor& grad, int64_t gamma_kind, double gamma, double alpha0, double alpha_slope,
                      int64_t reduction, double grad_out_value) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = input.size(0) * input.size(1);
  auto P = make_problem<scalar_t>(input, target, weight, pos_weight, &grad, nullptr,
                                  reduction == 0 ? &grad_out : nullptr, gamma, alpha0, alpha_slope);
  if (reduction != 0) {
    const acc_t g = static_cast<acc_t>(grad_out_value);
    P.gscale = reduction == 2 || numel == 0 ? g : g / static_cast<acc_t>(numel);
  }
  binary_gamma<true, false>(P, gamma_kind);
}

}  // namespace

// input (M, L) scalar_t; target (M, L) scalar_t, bool or integer; weight, pos_weight (M, L) acc or None; grad (M, L) scalar_t
// or None (reduction mean / sum only); out (M, L) contiguous (reduction none) or (), in
// out_dtype. gamma_kind: binary::GammaKind; alpha_t = alpha0 + alpha_slope * target
// (binary::binary_alpha_coefficients).
void binary_fwd_kernel(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& grad,
                       const at::Tensor& out, int64_t gamma_kind, double gamma, double alpha0, double alpha_slope,
                       int64_t reduction) {
  switch (input.scalar_type()) {
    case at::kFloat:
      return binary_fwd_typed<float>(input, target, weight, pos_weight, grad, out, gamma_kind, gamma, alpha0,
                                     alpha_slope, reduction);
    case at::kDouble:
      return binary_fwd_typed<double>(input, target, weight, pos_weight, grad, out, gamma_kind, gamma, alpha0,
                                      alpha_slope, reduction);
    case at::kBFloat16:
      return binary_fwd_typed<c10::BFloat16>(input, target, weight, pos_weight, grad, out, gamma_kind, gamma, alpha0,
                                             alpha_slope, reduction);
    case at::kHalf:
      return binary_fwd_typed<c10::Half>(input, target, weight, pos_weight, grad, out, gamma_kind, gamma, alpha0,
                                         alpha_slope, reduction);
    default:
      TORCH_CHECK(false, "fusedloss::binary_fwd: unsupported input dtype ", input.scalar_type());
  }
}

// grad (M, L) = dloss/dx * scale: grad_out[m, l] (reduction none; grad_out (M, L) any float
// dtype, any strides), grad_out_value (sum), grad_out_value / (M * L) (mean).
void binary_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                       const at::Tensor& grad, int64_t gamma_kind, double gamma, double alpha0, double alpha_slope,
                       int64_t reduction, double grad_out_value) {
  switch (input.scalar_type()) {
    case at::kFloat:
      return binary_bwd_typed<float>(grad_out, input, target, weight, pos_weight, grad, gamma_kind, gamma, alpha0,
                                     alpha_slope, reduction, grad_out_value);
    case at::kDouble:
      return binary_bwd_typed<double>(grad_out, input, target, weight, pos_weight, grad, gamma_kind, gamma, alpha0,
                                      alpha_slope, reduction, grad_out_value);
    case at::kBFloat16:
      return binary_bwd_typed<c10::BFloat16>(grad_out, input, target, weight, pos_weight, grad, gamma_kind, gamma,
                                             alpha0, alpha_slope, reduction, grad_out_value);
    case at::kHalf:
      return binary_bwd_typed<c10::Half>(grad_out, input, target, weight, pos_weight, grad, gamma_kind, gamma,
                                         alpha0, alpha_slope, reduction, grad_out_value);
    default:
      TORCH_CHECK(false, "fusedloss::binary_bwd: unsupported input dtype ", input.scalar_type());
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedloss
