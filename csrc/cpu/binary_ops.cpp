// fusedloss::binary_fwd, binary_bwd and scale_grad on CPU: checks, allocation, and the call
// into the kernel build for this machine's capability (csrc/cpu/kernels/binary_losses.cpp,
// see dispatch.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "common/binary_checks.h"
#include "common/binary_elem.h"
#include "cpu/dispatch.h"

FUSEDLOSS_DECLARE_CPU_KERNEL(void, binary_fwd_kernel, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                             const std::optional<at::Tensor>& grad, const at::Tensor& out, int64_t gamma_kind,
                             double gamma, double alpha0, double alpha_slope, int64_t reduction)
FUSEDLOSS_DECLARE_CPU_KERNEL(void, binary_bwd_kernel, const at::Tensor& grad_out, const at::Tensor& input,
                             const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& pos_weight, const at::Tensor& grad, int64_t gamma_kind,
                             double gamma, double alpha0, double alpha_slope, int64_t reduction,
                             double grad_out_value)

namespace fusedloss {
namespace {

// Value of a 0-dim CPU tensor of any float dtype (checked by the caller).
double scalar_value(const at::Tensor& t) {
  const void* p = t.const_data_ptr();
  switch (t.scalar_type()) {
    case at::kDouble: return *static_cast<const double*>(p);
    case at::kFloat: return *static_cast<const float*>(p);
    case at::kHalf: return static_cast<float>(*static_cast<const at::Half*>(p));
    default: return static_cast<float>(*static_cast<const at::BFloat16*>(p));
  }
}

// input (M, L); target (M, L) input's dtype, bool or integer (read as they are); weight,
// pos_weight (M, L) acc or None; grad (M, L) or None.
// Returns out: (M, L) per-element loss (reduction none), or () the mean / sum, in out_dtype.
at::Tensor binary_fwd_cpu(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& grad,
                          double gamma, double alpha, int64_t reduction, at::ScalarType out_dtype) {
  check_binary_fwd(input, target, weight, pos_weight, grad, gamma, reduction, /*native_targets=*/true);
  check_out_dtype("fusedloss::binary_fwd", out_dtype);
  const auto opts = input.options().dtype(out_dtype);
  at::Tensor out = reduction == 0 ? at::empty(input.sizes(), opts) : at::empty({}, opts);
  double alpha0, alpha_slope;
  binary::binary_alpha_coefficients(alpha, alpha0, alpha_slope);
  FUSEDLOSS_CPU_KERNEL(binary_fwd_kernel)(input, target, weight, pos_weight, grad, out, binary::gamma_kind(gamma),
                                          gamma, alpha0, alpha_slope, reduction);
  return out;
}

void binary_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight, double gamma,
                    double alpha, int64_t reduction, const at::Tensor& grad) {
  check_binary_bwd(grad_out, input, target, weight, pos_weight, grad, gamma, reduction, /*native_targets=*/true);
  double alpha0, alpha_slope;
  binary::binary_alpha_coefficients(alpha, alpha0, alpha_slope);
  const double g = reduction == 0 ? 1.0 : scalar_value(grad_out);
  FUSEDLOSS_CPU_KERNEL(binary_bwd_kernel)(grad_out, input, target, weight, pos_weight, grad,
                                          binary::gamma_kind(gamma), gamma, alpha0, alpha_slope, reduction, g);
}

// grad *= grad_out, in place; nothing read or written when grad_out == 1 (the usual training
// step: binary_fwd already wrote the gradient for grad_output == 1).
void scale_grad_cpu(const at::Tensor& grad_out, const at::Tensor& grad) {
  check_scale_grad(grad_out, grad);
  const double g = scalar_value(grad_out);
  if (g == 1.0) return;
  // Any strides; computed in the opmath type (float for bf16 / fp16), the factor as a double.
  const_cast<at::Tensor&>(grad).mul_(g);
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("binary_fwd", &fusedloss::binary_fwd_cpu);
  m.impl("binary_bwd", &fusedloss::binary_bwd_cpu);
  m.impl("scale_grad", &fusedloss::scale_grad_cpu);
}
