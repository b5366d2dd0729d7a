// CUDA implementations of fusedloss::ce_fwd, focal_fwd and softmax_bwd (schemas: csrc/ops.cpp):
// argument checks (csrc/common/op_checks.h, shared with the CPU impls in csrc/cpu/softmax_ops.cpp),
// output allocation, and the launches of csrc/cuda/softmax_losses.cu on the current stream.
// Compiled only when torch has CUDA.
//
// No host sync: the forward allocates its outputs and a few bytes of partial sums and enqueues
// two kernels; the backward reads grad_out and the denominator on the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/op_checks.h"
#include "cuda/binding_utils.h"
#include "cuda/softmax_launch.h"

namespace fusedloss {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Fills the operands of an (already checked) forward call, allocates out ((N, D) for reduction
// none, else ()), denom () and stats (N, D, 4), all contiguous, and the partial sums; launches.
Outputs run_fwd(cuda::SoftmaxFwdParams p, const at::Tensor& logits, const at::Tensor& target,
                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mask, TargetKind kind,
                int64_t reduction, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  const auto acc = logits.options().dtype(acc_dtype_of(logits.scalar_type()));
  const auto out_opts = logits.options().dtype(out_dtype);
  at::Tensor out = reduction == 0 ? at::empty({N, D}, out_opts) : at::empty({}, out_opts);
  at::Tensor denom = at::empty({}, acc);
  at::Tensor stats = at::empty({N, D, 4}, acc);

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
  p.out = out.data_ptr();
  p.denom = denom.data_ptr();
  p.stats = stats.data_ptr();
  p.N = N, p.C = C, p.D = D;
  p.dtype = cuda_dtype(logits.scalar_type());
  p.out_dtype = cuda_dtype(out_dtype);
  p.reduction = static_cast<int>(reduction);

  at::Tensor workspace;  // per-block partial sums (kept until the launch is enqueued)
  if (const int64_t bytes = cuda::plan_softmax_fwd(p); bytes > 0) {
    workspace = workspace_bytes(logits, bytes);
    p.workspace = workspace.data_ptr();
  }
  C10_CUDA_CHECK(cuda::launch_softmax_fwd(p, current_stream(logits)));
  return {out, denom, stats};
}

Outputs ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& mask, int64_t ignore_index, double label_smoothing, double z_loss,
                    double softcap, int64_t reduction, at::ScalarType out_dtype) {
  const TargetKind kind = check_softmax_fwd_args("ce_fwd", logits, target, weight, "weight", mask, /*allow_prob=*/true);
  check_ce_scalars(label_smoothing, softcap);
  check_reduction(reduction);
  check_out_dtype("ce_fwd", out_dtype);
  cuda::SoftmaxFwdParams p{};
  p.kind = kind == TargetKind::kProbability ? cuda::SoftmaxLoss::kCeProb : cuda::SoftmaxLoss::kCeIndex;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing, p.z_loss = z_loss, p.softcap = softcap;
  return run_fwd(p, logits, target, weight, mask, kind, reduction, out_dtype);
}

Outputs focal_fwd_cuda(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& alpha,
                       const std::optional<at::Tensor>& mask, int64_t ignore_index, double gamma, int64_t reduction,
                       at::ScalarType out_dtype) {
  const TargetKind kind = check_softmax_fwd_args("focal_fwd", logits, target, alpha, "alpha", mask, /*allow_prob=*/false);
  check_focal_gamma(gamma);
  check_reduction(reduction);
  check_out_dtype("focal_fwd", out_dtype);
  cuda::SoftmaxFwdParams p{};
  p.kind = cuda::SoftmaxLoss::kFocal;
  p.ignore_index = ignore_index;
  p.gamma = gamma;
  return run_fwd(p, logits, target, alpha, mask, kind, reduction, out_dtype);
}

// grad (N, C, D) = d(reduced loss)/d(logits), from the forward's stats and denom.
void softmax_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mask,
                      const at::Tensor& stats, const at::Tensor& denom, double softcap, int64_t reduction,
                      const at::Tensor& grad) {
  const TargetKind kind = check_softmax_bwd_args(grad_out, logits, target, weight, mask, stats, denom, grad, reduction);
  TORCH_CHECK(softcap >= 0.0, "softmax_bwd: softcap must be >= 0 (0 = off), got ", softcap);
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda::SoftmaxBwdParams p{};
  p.grad_out = grad_out.const_data_ptr();
  if (reduction == 0) p.go_n = grad_out.stride(0), p.go_d = grad_out.stride(1);
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
  p.stats = stats.const_data_ptr();
  p.denom = denom.const_data_ptr();
  p.grad = grad.data_ptr();
  p.g_n = grad.stride(0), p.g_c = grad.stride(1), p.g_d = grad.stride(2);
  p.N = logits.size(0), p.C = logits.size(1), p.D = logits.size(2);
  p.dtype = cuda_dtype(logits.scalar_type());
  p.grad_out_dtype = cuda_dtype(grad_out.scalar_type());
  p.reduction = static_cast<int>(reduction);
  p.softcap = softcap;
  C10_CUDA_CHECK(cuda::launch_softmax_bwd(p, current_stream(logits)));
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("ce_fwd", &fusedloss::ce_fwd_cuda);
  m.impl("focal_fwd", &fusedloss::focal_fwd_cuda);
  m.impl("softmax_bwd", &fusedloss::softmax_bwd_cuda);
}
