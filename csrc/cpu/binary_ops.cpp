// fusedloss::binary_fwd on CPU: checks, allocation, and the call into the kernel build for
// this machine's capability (csrc/cpu/kernels/binary_losses.cpp, see dispatch.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/binary_checks.h"
#include "common/binary_elem.h"
#include "cpu/dispatch.h"

FUSEDLOSS_DECLARE_CPU_KERNEL(void, binary_fwd_kernel, const at::Tensor& input, const at::Tensor& target,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
                             const c10::optional<at::Tensor>& grad, const at::Tensor& out, int64_t gamma_kind,
                             double gamma, double alpha0, double alpha_slope, bool reduce)

namespace fusedloss {
namespace {

// input, target (M, L); weight, pos_weight (M, L) acc or None; grad (M, L) or None.
// Returns loss (M, L) acc, or (M,) acc row sums when reduce.
at::Tensor binary_fwd_cpu(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& pos_weight, const c10::optional<at::Tensor>& grad,
                          double gamma, double alpha, bool reduce) {
  check_binary_fwd(input, target, weight, pos_weight, grad, gamma);
  const auto acc = binary_acc_dtype(input.scalar_type());
  at::Tensor out = reduce ? at::empty({input.size(0)}, input.options().dtype(acc))
                          : at::empty(input.sizes(), input.options().dtype(acc));
  double alpha0, alpha_slope;
  binary::binary_alpha_coefficients(alpha, alpha0, alpha_slope);
  FUSEDLOSS_CPU_KERNEL(binary_fwd_kernel)(input, target, weight, pos_weight, grad, out, binary::gamma_kind(gamma),
                                          gamma, alpha0, alpha_slope, reduce);
  return out;
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("binary_fwd", &fusedloss::binary_fwd_cpu);
}
