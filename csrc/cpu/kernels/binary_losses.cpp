// CPU kernel of fusedloss::binary_fwd: BCE-with-logits and torchvision's sigmoid focal loss,
// elementwise over an (M, L) view, loss and gradient in one pass.
//
// Compiled once per CPU capability (setup.py), everything inside
// namespace fusedloss::CPU_CAPABILITY; csrc/cpu/binary_ops.cpp picks the build at run time.
// The per-element math is csrc/common/binary_elem.h, run here on at::vec::Vectorized with
// Sleef's 1-ulp exp and pow (the u20 approximations would miss the 1e-6 float32 gradient
// tolerance) and, for float, binary_elem.h's 1.4-ulp log1p on [0, 1] (Sleef's general log1pf
// cost 40% of the kernel), so the CUDA kernel computes exactly these formulas too.
//
// Memory traffic: input and target are read once, the gradient written once, and either the
// per-element loss or one sum per row; weight and pos_weight are read through their (often
// 0) strides, never materialized at (M, L).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
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

// A work item covers up to kItemCols columns of one row; longer rows are split so that a
// single long row (1-D input) still spreads over threads. Row sums add the items' partial
// sums in a fixed order, so results do not depend on the thread count.
constexpr int64_t kItemCols = 4096;
// Strided / reduced-precision operands are staged through buffers of this many elements
// (5 buffers of acc_t stay in L1).
constexpr int64_t kStageCols = 256;

// A weight-like operand (acc dtype) read along one row: `ptr[j * inc]`, inc 0 (broadcast) or 1.
template <typename acc_t>
struct RowOperand {
  const acc_t* ptr;
  bool contiguous;
};

// Loss over n elements held in contiguous acc_t arrays (weight/pos_weight contiguous or
// broadcast). Writes the gradient (kGrad) and the per-element loss (loss != nullptr);
// returns the sum of the losses, added in a fixed order.
template <int kGamma, bool kGrad, typename acc_t>
acc_t binary_span(int64_t n, const acc_t* x, const acc_t* y, RowOperand<acc_t> w, RowOperand<acc_t> pw,
                  acc_t* grad, acc_t* loss, const BinaryParams<at::vec::Vectorized<acc_t>>& p) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec w_b(w.contiguous ? acc_t(0) : *w.ptr);
  const Vec pw_b(pw.contiguous ? acc_t(0) : *pw.ptr);
  Vec sum(acc_t(0));
  Vec g;
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const Vec wv = w.contiguous ? Vec::loadu(w.ptr + j) : w_b;
    const Vec pwv = pw.contiguous ? Vec::loadu(pw.ptr + j) : pw_b;
    const Vec l = binary_elem<kGamma, kGrad>(Vec::loadu(x + j), Vec::loadu(y + j), wv, pwv, p, &g);
    if (kGrad) g.store(grad + j);
    if (loss != nullptr) {
      l.store(loss + j);
    } else {
      sum = sum + l;
    }
  }
  if (j < n) {
    const int64_t r = n - j;
    const Vec wv = w.contiguous ? Vec::loadu(w.ptr + j, r) : w_b;
    const Vec pwv = pw.contiguous ? Vec::loadu(pw.ptr + j, r) : pw_b;
    const Vec l = binary_elem<kGamma, kGrad>(Vec::loadu(x + j, r), Vec::loadu(y + j, r), wv, pwv, p, &g);
    if (kGrad) g.store(grad + j, r);
    if (loss != nullptr) {
      l.store(loss + j, r);
    } else {
      sum = sum + Vec::set(Vec(acc_t(0)), l, r);  // lanes past n hold junk: drop them
    }
  }
  if (loss != nullptr) return acc_t(0);
  acc_t lanes[V];
  sum.store(lanes);
  acc_t total = 0;
  for (int64_t k = 0; k < V; ++k) total += lanes[k];
  return total;
}

// Strided (M, L) operand of any dtype: element (i, j) at ptr[i * s0 + j * s1].
template <typename T>
struct Strided {
  T* ptr;
  int64_t s0, s1;
  T* row(int64_t i) const { return ptr + i * s0; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1)};
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

template <typename scalar_t>
struct BinaryProblem {
  using acc_t = at::opmath_type<scalar_t>;
  // pointers (w, pw: nullptr = all ones; g: nullptr = no gradient)
  Strided<const scalar_t> x, y;
  Strided<const acc_t> w, pw;
  Strided<scalar_t> g;
  acc_t* out;  // (M, L) contiguous, or (M,) when reduce
  // sizes
  int64_t M, L;
  bool reduce;
  BinaryParams<at::vec::Vectorized<acc_t>> p;
};

// Columns [j0, j0 + n) of row i; returns their loss sum (0 when !reduce, where the loss is
// stored per element instead).
template <int kGamma, bool kGrad, typename scalar_t>
double binary_item(const BinaryProblem<scalar_t>& P, bool fast, int64_t i, int64_t j0, int64_t n) {
  using acc_t = typename BinaryProblem<scalar_t>::acc_t;
  static const acc_t kOne = acc_t(1);
  acc_t* loss = P.reduce ? nullptr : P.out + i * P.L + j0;
  // weight / pos_weight: contiguous or broadcast along the row are read in place.
  auto operand = [&](const Strided<const acc_t>& o, int64_t j, acc_t* buf, int64_t len) -> RowOperand<acc_t> {
    if (o.ptr == nullptr) return {&kOne, false};
    const acc_t* at = o.row(i) + j * o.s1;
    if (o.s1 == 0 || o.s1 == 1) return {at, o.s1 == 1};
    stage_in(at, o.s1, len, buf);
    return {buf, true};
  };

  if (fast) {  // scalar_t == acc_t, x / y / grad contiguous along the row
    const acc_t* x = reinterpret_cast<const acc_t*>(P.x.row(i)) + j0;
    const acc_t* y = reinterpret_cast<const acc_t*>(P.y.row(i)) + j0;
    acc_t* g = kGrad ? reinterpret_cast<acc_t*>(P.g.row(i)) + j0 : nullptr;
    if (P.w.ptr == nullptr || P.w.s1 <= 1) {
      if (P.pw.ptr == nullptr || P.pw.s1 <= 1) {
        return binary_span<kGamma, kGrad>(n, x, y, operand(P.w, j0, nullptr, 0), operand(P.pw, j0, nullptr, 0), g,
                                          loss, P.p);
      }
    }
  }

  // Staged: gather / convert kStageCols columns at a time into acc_t buffers.
  acc_t xb[kStageCols], yb[kStageCols], wb[kStageCols], pwb[kStageCols], gb[kStageCols];
  double total = 0;
  for (int64_t k = 0; k < n; k += kStageCols) {
    const int64_t len = std::min(kStageCols, n - k);
    const int64_t j = j0 + k;
    stage_in(P.x.row(i) + j * P.x.s1, P.x.s1, len, xb);
    stage_in(P.y.row(i) + j * P.y.s1, P.y.s1, len, yb);
    total += binary_span<kGamma, kGrad>(len, xb, yb, operand(P.w, j, wb, len), operand(P.pw, j, pwb, len), gb,
                                        loss == nullptr ? nullptr : loss + k, P.p);
    if (kGrad) stage_out(gb, len, P.g.row(i) + j * P.g.s1, P.g.s1);
  }
  return total;
}

template <int kGamma, bool kGrad, typename scalar_t>
void binary_run(const BinaryProblem<scalar_t>& P) {
  using acc_t = typename BinaryProblem<scalar_t>::acc_t;
  const int64_t M = P.M, L = P.L;
  if (M == 0 || L == 0) {
    if (P.reduce && M > 0) std::fill(P.out, P.out + M, acc_t(0));
    return;
  }
  const bool fast = std::is_same<scalar_t, acc_t>::value && P.x.s1 == 1 && P.y.s1 == 1 && (!kGrad || P.g.s1 == 1);
  const int64_t cols = std::min(L, kItemCols);
  const int64_t chunks = (L + cols - 1) / cols;  // items per row
  const int64_t items = M * chunks;
  // Row sums of split rows: per-item partials, added in order after the parallel loop.
  std::vector<double> partial(P.reduce && chunks > 1 ? items : 0);
  const int64_t grain = std::max<int64_t>(1, 32768 / cols);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t i = it / chunks, c = it - i * chunks;
      const int64_t j0 = c * cols;
      const double s = binary_item<kGamma, kGrad>(P, fast, i, j0, std::min(cols, L - j0));
      if (P.reduce) {
        if (chunks == 1) {
          P.out[i] = static_cast<acc_t>(s);
        } else {
          partial[it] = s;
        }
      }
    }
  });
  if (!partial.empty()) {
    at::parallel_for(0, M, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double s = 0;
        for (int64_t c = 0; c < chunks; ++c) s += partial[i * chunks + c];
        P.out[i] = static_cast<acc_t>(s);
      }
    });
  }
}

template <typename scalar_t>
void binary_dispatch(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& pos_weight, const c10::optional<at::Tensor>& grad,
                     const at::Tensor& out, int64_t gamma_kind, double gamma, double alpha0, double alpha_slope,
                     bool reduce) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  BinaryProblem<scalar_t> P{
      strided<const scalar_t>(input),
      strided<const scalar_t>(target),
      weight ? strided<const acc_t>(*weight) : Strided<const acc_t>{nullptr, 0, 0},
      pos_weight ? strided<const acc_t>(*pos_weight) : Strided<const acc_t>{nullptr, 0, 0},
      grad ? strided<scalar_t>(*grad) : Strided<scalar_t>{nullptr, 0, 0},
      out.data_ptr<acc_t>(),
      input.size(0),
      input.size(1),
      reduce,
      {Vec(acc_t(gamma)), Vec(acc_t(alpha0)), Vec(acc_t(alpha_slope))},
  };
  // A row of one element: its sum is the element, so reduce is the elementwise case.
  if (P.reduce && P.L == 1) P.reduce = false;
  // Elementwise output of operands that are all "row-major" (stride(0) == L * stride(1), 0
  // strides included): one long row, so the work splits evenly whatever the row length.
  auto flat = [&](int64_t s0, int64_t s1, bool present) { return !present || s0 == P.L * s1; };
  if (!P.reduce && P.M > 1 && flat(P.x.s0, P.x.s1, true) && flat(P.y.s0, P.y.s1, true) &&
      flat(P.w.s0, P.w.s1, P.w.ptr) && flat(P.pw.s0, P.pw.s1, P.pw.ptr) && flat(P.g.s0, P.g.s1, P.g.ptr)) {
    P.L *= P.M;
    P.M = 1;
  }
  const bool g = P.g.ptr != nullptr;
  switch (gamma_kind) {
    case binary::kGamma0:
      return g ? binary_run<binary::kGamma0, true>(P) : binary_run<binary::kGamma0, false>(P);
    case binary::kGamma2:
      return g ? binary_run<binary::kGamma2, true>(P) : binary_run<binary::kGamma2, false>(P);
    default:
      return g ? binary_run<binary::kGammaPow, true>(P) : binary_run<binary::kGammaPow, false>(P);
  }
}

}  // namespace

// input, target (M, L) scalar_t; weight, pos_weight (M, L) acc or None; grad (M, L) scalar_t
// or None; out (M, L) acc contiguous, or (M,) when reduce. gamma_kind: binary::GammaKind;
// alpha_t = alpha0 + alpha_slope * target (binary::binary_alpha_coefficients).
void binary_fwd_kernel(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& pos_weight, const c10::optional<at::Tensor>& grad,
                       const at::Tensor& out, int64_t gamma_kind, double gamma, double alpha0, double alpha_slope,
                       bool reduce) {
  switch (input.scalar_type()) {
    case at::kFloat:
      return binary_dispatch<float>(input, target, weight, pos_weight, grad, out, gamma_kind, gamma, alpha0,
                                    alpha_slope, reduce);
    case at::kDouble:
      return binary_dispatch<double>(input, target, weight, pos_weight, grad, out, gamma_kind, gamma, alpha0,
                                     alpha_slope, reduce);
    case at::kBFloat16:
      return binary_dispatch<c10::BFloat16>(input, target, weight, pos_weight, grad, out, gamma_kind, gamma, alpha0,
                                            alpha_slope, reduce);
    case at::kHalf:
      return binary_dispatch<c10::Half>(input, target, weight, pos_weight, grad, out, gamma_kind, gamma, alpha0,
                                        alpha_slope, reduce);
    default:
      TORCH_CHECK(false, "fusedloss::binary_fwd: unsupported input dtype ", input.scalar_type());
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedloss
