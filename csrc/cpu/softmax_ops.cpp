// CPU implementations of fusedloss::ce_fwd and fusedloss::focal_fwd (schemas: csrc/ops.cpp).
// Checks the arguments, allocates the per-row outputs and calls the kernel build for this
// CPU's capability (csrc/cpu/kernels/softmax_losses.cpp, dispatch.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/op_checks.h"
#include "cpu/dispatch.h"

FUSEDLOSS_DECLARE_CPU_KERNEL(void, ce_fwd_kernel, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mask,
                             const std::optional<at::Tensor>& grad, int64_t ignore_index, double label_smoothing,
                             double z_loss, double softcap, const at::Tensor& loss, const at::Tensor& count)
FUSEDLOSS_DECLARE_CPU_KERNEL(void, focal_fwd_kernel, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& mask,
                             const std::optional<at::Tensor>& grad, int64_t ignore_index, double gamma,
                             const at::Tensor& loss, const at::Tensor& count)

namespace fusedloss {
namespace {

// loss, count (N, D) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> row_outputs(const at::Tensor& logits) {
  const auto opts = logits.options().dtype(acc_dtype_of(logits.scalar_type()));
  return {at::empty({logits.size(0), logits.size(2)}, opts), at::empty({logits.size(0), logits.size(2)}, opts)};
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& mask,
                                              const std::optional<at::Tensor>& grad, int64_t ignore_index,
                                              double label_smoothing, double z_loss, double softcap) {
  check_softmax_row_args("ce_fwd", logits, target, weight, "weight", mask, grad, /*allow_prob=*/true);
  check_ce_scalars(label_smoothing, softcap);
  auto [loss, count] = row_outputs(logits);
  FUSEDLOSS_CPU_KERNEL(ce_fwd_kernel)(logits, target, weight, mask, grad, ignore_index, label_smoothing, z_loss,
                                      softcap, loss, count);
  return {loss, count};
}

std::tuple<at::Tensor, at::Tensor> focal_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                 const std::optional<at::Tensor>& alpha,
                                                 const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& grad, int64_t ignore_index,
                                                 double gamma) {
  check_softmax_row_args("focal_fwd", logits, target, alpha, "alpha", mask, grad, /*allow_prob=*/false);
  check_focal_gamma(gamma);
  auto [loss, count] = row_outputs(logits);
  FUSEDLOSS_CPU_KERNEL(focal_fwd_kernel)(logits, target, alpha, mask, grad, ignore_index, gamma, loss, count);
  return {loss, count};
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("ce_fwd", &fusedloss::ce_fwd_cpu);
  m.impl("focal_fwd", &fusedloss::focal_fwd_cpu);
}
