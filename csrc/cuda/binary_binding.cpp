// fusedloss::binary_fwd, binary_bwd and scale_grad on CUDA (schemas: csrc/ops.cpp): checks
// (csrc/common/binary_checks.h, shared with the CPU impls in csrc/cpu/binary_ops.cpp),
// allocation, and the calls into the launchers of csrc/cuda/binary_losses.cu on the current
// stream. Compiled only where torch has CUDA (setup.py). No host sync: grad_out is read on the
// device, by the kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "common/binary_checks.h"
#include "cuda/binary_launch.h"
#include "cuda/binding_utils.h"

namespace fusedloss {
namespace {

// The operands shared by forward and backward (checked by the caller).
cuda::BinaryArgs binary_args(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& pos_weight, double gamma, double alpha,
                             int64_t reduction) {
  cuda::BinaryArgs a{};
  a.input = input.const_data_ptr();
  a.target = target.const_data_ptr();
  a.weight = weight ? weight->const_data_ptr() : nullptr;
  a.pos_weight = pos_weight ? pos_weight->const_data_ptr() : nullptr;
  a.input_s0 = input.stride(0), a.input_s1 = input.stride(1);
  a.target_s0 = target.stride(0), a.target_s1 = target.stride(1);
  if (weight) a.weight_s0 = weight->stride(0), a.weight_s1 = weight->stride(1);
  if (pos_weight) a.pos_weight_s0 = pos_weight->stride(0), a.pos_weight_s1 = pos_weight->stride(1);
  a.M = input.size(0), a.L = input.size(1);
  a.dtype = cuda_dtype(input.scalar_type());
  a.target_u8 = is_byte_target(target.scalar_type());  // bool / uint8, read as it is (checked)
  a.gamma = gamma, a.alpha = alpha, a.reduction = static_cast<int>(reduction);
  return a;
}

// input (M, L); target (M, L) input's dtype, bool or uint8; weight, pos_weight (M, L) acc or
// None; grad (M, L) or None (mean / sum only: the gradient for grad_output == 1). Returns out: (M, L) per-element loss (reduction
// none), or () the mean / sum, in out_dtype.
at::Tensor binary_fwd_cuda(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& grad,
                           double gamma, double alpha, int64_t reduction, at::ScalarType out_dtype) {
  check_binary_fwd(input, target, weight, pos_weight, grad, gamma, reduction, byte_targets());
  check_out_dtype("fusedloss::binary_fwd", out_dtype);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options().dtype(out_dtype);
  at::Tensor out = reduction == 0 ? at::empty(input.sizes(), opts) : at::empty({}, opts);

  cuda::BinaryArgs a = binary_args(input, target, weight, pos_weight, gamma, alpha, reduction);
  if (grad) {
    a.grad = grad->data_ptr();
    a.grad_s0 = grad->stride(0), a.grad_s1 = grad->stride(1);
  }
  a.out = out.data_ptr();
  a.out_dtype = cuda_dtype(out_dtype);
  at::Tensor workspace;  // per-block partial sums (kept until the launch is enqueued)
  if (const int64_t bytes = cuda::plan_binary_fwd(a); bytes > 0) {
    workspace = workspace_bytes(input, bytes);
    a.workspace = workspace.data_ptr();
  }
  C10_CUDA_CHECK(cuda::binary_fwd_launch(a, current_stream(input)));
  return out;
}

// grad (M, L) = dloss/dx * grad_out[m, l] (none), grad_out (sum), grad_out / (M * L) (mean).
void binary_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight, double gamma,
                     double alpha, int64_t reduction, const at::Tensor& grad) {
  check_binary_bwd(grad_out, input, target, weight, pos_weight, grad, gamma, reduction, byte_targets());
  const c10::cuda::CUDAGuard guard(input.device());
  cuda::BinaryArgs a = binary_args(input, target, weight, pos_weight, gamma, alpha, reduction);
  a.grad = grad.data_ptr();
  a.grad_s0 = grad.stride(0), a.grad_s1 = grad.stride(1);
  a.grad_out = grad_out.const_data_ptr();
  if (reduction == 0) a.grad_out_s0 = grad_out.stride(0), a.grad_out_s1 = grad_out.stride(1);
  a.grad_out_dtype = cuda_dtype(grad_out.scalar_type());
  C10_CUDA_CHECK(cuda::binary_bwd_launch(a, current_stream(input)));
}

// grad *= grad_out, in place; every block returns at once when grad_out (read on the device)
// is 1, the usual training step: binary_fwd already wrote the gradient for grad_output == 1.
void scale_grad_cuda(const at::Tensor& grad_out, const at::Tensor& grad) {
  check_scale_grad(grad_out, grad);
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  cuda::ScaleGradArgs a{};
  a.grad_out = grad_out.const_data_ptr();
  a.grad_out_dtype = cuda_dtype(grad_out.scalar_type());
  a.grad = grad.data_ptr();
  a.dtype = cuda_dtype(grad.scalar_type());
  if (grad.is_non_overlapping_and_dense()) {
    // Its elements fill one contiguous span from data_ptr (strides are >= 0), in some order:
    // scale the span.
    a.M = 1, a.L = grad.numel(), a.s0 = a.L, a.s1 = 1;
  } else if (grad.dim() <= 2) {
    a.M = grad.dim() == 2 ? grad.size(0) : 1;
    a.L = grad.dim() == 0 ? 1 : grad.size(-1);
    a.s0 = grad.dim() == 2 ? grad.stride(0) : 0;
    a.s1 = grad.dim() == 0 ? 1 : grad.stride(-1);
  } else {
    // A non-dense view of 3 or more dims (never what binary_fwd writes): aten's in-place
    // multiply, which reads the 0-dim factor on the device too, but without the skip at 1.
    const_cast<at::Tensor&>(grad).mul_(grad_out);
    return;
  }
  C10_CUDA_CHECK(cuda::scale_grad_launch(a, current_stream(grad)));
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("binary_fwd", &fusedloss::binary_fwd_cuda);
  m.impl("binary_bwd", &fusedloss::binary_bwd_cuda);
  m.impl("scale_grad", &fusedloss::scale_grad_cuda);
}
