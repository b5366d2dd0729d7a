// CUDA implementations of fusedloss::ce_fwd and fusedloss::focal_fwd: argument checks
// (csrc/common/op_checks.h, shared with the CPU), output allocation, and the launch of
// csrc/cuda/softmax_losses.cu on the current stream. Compiled only when torch has CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/op_checks.h"
#include "cuda/softmax_launch.h"

namespace fusedloss {
namespace {

cuda::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "fusedloss: unsupported logits dtype ", t);
  }
}

// Fills everything but the loss-specific meta-parameters; allocates loss and count (N, D).
std::tuple<at::Tensor, at::Tensor> run(cuda::SoftmaxRowParams p, const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mask,
                                       const std::optional<at::Tensor>& grad, TargetKind kind) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(acc_dtype_of(logits.scalar_type()));
  at::Tensor loss = at::empty({logits.size(0), logits.size(2)}, opts);
  at::Tensor count = at::empty({logits.size(0), logits.size(2)}, opts);
  p.logits = logits.const_data_ptr();
  p.x_n = logits.stride(0), p.x_c = logits.stride(1), p.x_d = logits.stride(2);
  if (kind == TargetKind::kProbability) {
    p.prob = target.const_data_ptr();
    p.y_n = target.stride(0), p.y_c = target.stride(1), p.y_d = target.stride(2);
  } else {
    p.target = target.const_data_ptr<int64_t>();
    p.t_n = target.stride(0), p.t_d = target.stride(1);
  }
  p.weight = weight ? weight->const_data_ptr() : nullptr;
  if (mask) {
    p.mask = mask->const_data_ptr<bool>();
    p.m_n = mask->stride(0), p.m_c = mask->stride(1), p.m_d = mask->stride(2);
  }
  if (grad) {
    p.grad = grad->data_ptr();
    p.g_n = grad->stride(0), p.g_c = grad->stride(1), p.g_d = grad->stride(2);
  }
  p.loss = loss.data_ptr();
  p.count = count.data_ptr();
  p.N = logits.size(0), p.C = logits.size(1), p.D = logits.size(2);
  p.dtype = dtype_of(logits.scalar_type());
  C10_CUDA_CHECK(cuda::launch_softmax_rows(p, c10::cuda::getCurrentCUDAStream(logits.get_device()).stream()));
  return {loss, count};
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& mask,
                                               const std::optional<at::Tensor>& grad, int64_t ignore_index,
                                               double label_smoothing, double z_loss, double softcap) {
  const TargetKind kind = check_softmax_row_args("ce_fwd", logits, target, weight, "weight", mask, grad, true);
  check_ce_scalars(label_smoothing, softcap);
  cuda::SoftmaxRowParams p{};
  p.kind = kind == TargetKind::kProbability ? cuda::SoftmaxLoss::kCeProb : cuda::SoftmaxLoss::kCeIndex;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing, p.z_loss = z_loss, p.softcap = softcap;
  return run(p, logits, target, weight, mask, grad, kind);
}

std::tuple<at::Tensor, at::Tensor> focal_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                  const std::optional<at::Tensor>& alpha,
                                                  const std::optional<at::Tensor>& mask,
                                                  const std::optional<at::Tensor>& grad, int64_t ignore_index,
                                                  double gamma) {
  const TargetKind kind = check_softmax_row_args("focal_fwd", logits, target, alpha, "alpha", mask, grad, false);
  check_focal_gamma(gamma);
  cuda::SoftmaxRowParams p{};
  p.kind = cuda::SoftmaxLoss::kFocal;
  p.ignore_index = ignore_index;
  p.gamma = gamma;
  return run(p, logits, target, alpha, mask, grad, kind);
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("ce_fwd", &fusedloss::ce_fwd_cuda);
  m.impl("focal_fwd", &fusedloss::focal_fwd_cuda);
}
