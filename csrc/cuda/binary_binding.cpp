// fusedloss::binary_fwd on CUDA: checks (shared with the CPU impl), allocation, and the call
// into the launcher of csrc/cuda/binary_losses.cu on the current stream. Compiled only where
// torch has CUDA (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/binary_checks.h"
#include "cuda/binary_launch.h"

namespace fusedloss {
namespace {

cuda::BinaryDtype binary_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::BinaryDtype::kHalf;
    case at::kBFloat16:
      return cuda::BinaryDtype::kBFloat16;
    case at::kFloat:
      return cuda::BinaryDtype::kFloat;
    default:
      return cuda::BinaryDtype::kDouble;
  }
}

// input, target (M, L); weight, pos_weight (M, L) acc or None; grad (M, L) or None.
// Returns loss (M, L) acc, or (M,) acc row sums when reduce.
at::Tensor binary_fwd_cuda(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& pos_weight, const c10::optional<at::Tensor>& grad,
                           double gamma, double alpha, bool reduce) {
  check_binary_fwd(input, target, weight, pos_weight, grad, gamma);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc = input.options().dtype(binary_acc_dtype(input.scalar_type()));
  at::Tensor out = reduce ? at::empty({input.size(0)}, acc) : at::empty(input.sizes(), acc);

  cuda::BinaryArgs a{};
  a.input = input.data_ptr();
  a.target = target.data_ptr();
  a.weight = weight ? weight->data_ptr() : nullptr;
  a.pos_weight = pos_weight ? pos_weight->data_ptr() : nullptr;
  a.grad = grad ? grad->data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.input_s0 = input.stride(0), a.input_s1 = input.stride(1);
  a.target_s0 = target.stride(0), a.target_s1 = target.stride(1);
  if (weight) a.weight_s0 = weight->stride(0), a.weight_s1 = weight->stride(1);
  if (pos_weight) a.pos_weight_s0 = pos_weight->stride(0), a.pos_weight_s1 = pos_weight->stride(1);
  if (grad) a.grad_s0 = grad->stride(0), a.grad_s1 = grad->stride(1);
  a.M = input.size(0), a.L = input.size(1);
  a.dtype = binary_dtype(input.scalar_type());
  a.gamma = gamma, a.alpha = alpha, a.reduce = reduce;

  at::Tensor workspace;  // kept alive until the launch is enqueued; the caching allocator orders reuse on the stream
  if (const int64_t n = cuda::binary_fwd_workspace(a); n > 0) {
    workspace = at::empty({n}, acc);
    a.workspace = workspace.data_ptr();
  }
  C10_CUDA_CHECK(cuda::binary_fwd_launch(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("binary_fwd", &fusedloss::binary_fwd_cuda);
}
