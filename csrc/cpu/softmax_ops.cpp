// CPU implementations of fusedloss::ce_fwd, focal_fwd and softmax_bwd (schemas: csrc/ops.cpp).
// Checks the arguments, allocates the outputs and calls the kernel build for this CPU's
// capability (csrc/cpu/kernels/softmax_losses.cpp, dispatch.h).
//
// Host overhead: a training step calls one forward and one backward op, so each allocates
// only its outputs (forward: out, denom, stats; backward: nothing) and runs no other aten op.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/op_checks.h"
#include "cpu/dispatch.h"

FUSEDLOSS_DECLARE_CPU_KERNEL(void, ce_fwd_kernel, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mask,
                             int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                             int64_t reduction, const at::Tensor& out, const at::Tensor& denom,
                             const at::Tensor& stats)
FUSEDLOSS_DECLARE_CPU_KERNEL(void, focal_fwd_kernel, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& mask,
                             int64_t ignore_index, double gamma, int64_t reduction, const at::Tensor& out,
                             const at::Tensor& denom, const at::Tensor& stats)
FUSEDLOSS_DECLARE_CPU_KERNEL(void, softmax_bwd_kernel, const at::Tensor& grad_out, const at::Tensor& logits,
                             const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& mask, const at::Tensor& stats, double softcap,
                             int64_t reduction, double grad_out_value, double denom_value, const at::Tensor& grad)

namespace fusedloss {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// out: (N, D) for reduction none, else (); denom (); stats (N, D, 4); all contiguous.
Outputs softmax_outputs(const at::Tensor& logits, int64_t reduction, at::ScalarType out_dtype) {
  const int64_t N = logits.size(0), D = logits.size(2);
  const auto acc = logits.options().dtype(acc_dtype_of(logits.scalar_type()));
  at::Tensor out = reduction == 0 ? at::empty({N, D}, logits.options().dtype(out_dtype))
                                  : at::empty({}, logits.options().dtype(out_dtype));
  return {out, at::empty({}, acc), at::empty({N, D, 4}, acc)};
}

// Value of a 0-dim CPU tensor of any float dtype.
double scalar_value(const at::Tensor& t) {
  const void* p = t.const_data_ptr();
  switch (t.scalar_type()) {
    case at::kDouble: return *static_cast<const double*>(p);
    case at::kFloat: return *static_cast<const float*>(p);
    case at::kHalf: return static_cast<float>(*static_cast<const at::Half*>(p));
    case at::kBFloat16: return static_cast<float>(*static_cast<const at::BFloat16*>(p));
    default: TORCH_CHECK(false, "fusedloss: expected a float tensor, got ", t.scalar_type());
  }
}

Outputs ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& mask, int64_t ignore_index, double label_smoothing, double z_loss,
                   double softcap, int64_t reduction, at::ScalarType out_dtype) {
  check_softmax_fwd_args("ce_fwd", logits, target, weight, "weight", mask, /*allow_prob=*/true);
  check_ce_scalars(label_smoothing, softcap);
  check_reduction(reduction);
  check_out_dtype("ce_fwd", out_dtype);
  auto outs = softmax_outputs(logits, reduction, out_dtype);
  FUSEDLOSS_CPU_KERNEL(ce_fwd_kernel)(logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap,
                                      reduction, std::get<0>(outs), std::get<1>(outs), std::get<2>(outs));
  return outs;
}

Outputs focal_fwd_cpu(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& alpha,
                      const std::optional<at::Tensor>& mask, int64_t ignore_index, double gamma, int64_t reduction,
                      at::ScalarType out_dtype) {
  check_softmax_fwd_args("focal_fwd", logits, target, alpha, "alpha", mask, /*allow_prob=*/false);
  check_focal_gamma(gamma);
  check_reduction(reduction);
  check_out_dtype("focal_fwd", out_dtype);
  auto outs = softmax_outputs(logits, reduction, out_dtype);
  FUSEDLOSS_CPU_KERNEL(focal_fwd_kernel)(logits, target, alpha, mask, ignore_index, gamma, reduction,
                                         std::get<0>(outs), std::get<1>(outs), std::get<2>(outs));
  return outs;
}

void softmax_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mask,
                     const at::Tensor& stats, const at::Tensor& denom, double softcap, int64_t reduction,
                     const at::Tensor& grad) {
  check_softmax_bwd_args(grad_out, logits, target, weight, mask, stats, denom, grad, reduction);
  TORCH_CHECK(softcap >= 0.0, "softmax_bwd: softcap must be >= 0 (0 = off), got ", softcap);
  // CPU tensors: the scalars are read here, once, rather than per row.
  const double g = reduction == 0 ? 1.0 : scalar_value(grad_out);
  const double den = reduction == 1 ? scalar_value(denom) : 1.0;
  FUSEDLOSS_CPU_KERNEL(softmax_bwd_kernel)(grad_out, logits, target, weight, mask, stats, softcap, reduction, g, den,
                                           grad);
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("ce_fwd", &fusedloss::ce_fwd_cpu);
  m.impl("focal_fwd", &fusedloss::focal_fwd_cpu);
  m.impl("softmax_bwd", &fusedloss::softmax_bwd_cpu);
}
