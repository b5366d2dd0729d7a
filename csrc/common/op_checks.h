// Op-level argument checks of the softmax-row ops (ce_fwd, focal_fwd), shared by the CPU
// implementation (csrc/cpu/softmax_ops.cpp) and the CUDA binding (csrc/cuda/softmax_binding.cpp).
// The user-facing validation, with PyTorch's messages, is in fusedloss/functional.py; these
// TORCH_CHECKs guard the op itself (called directly, through torch.ops.fusedloss, or by
// opcheck) so a kernel never reads out of bounds or misreads a dtype.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fusedloss {

// Accumulation dtype of the per-row outputs: float64 for float64 logits, else float32.
inline at::ScalarType acc_dtype_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), "fusedloss: ", name, " is on ", t.device(),
              " but logits are on ", logits.device());
}

// Scalar arguments of ce_fwd and focal_fwd (shared by the CPU op and the CUDA binding).
inline void check_ce_scalars(double label_smoothing, double softcap) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "ce_fwd: label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(softcap >= 0.0, "ce_fwd: softcap must be >= 0 (0 = off), got ", softcap);
}

inline void check_focal_gamma(double gamma) { TORCH_CHECK(gamma >= 0.0, "focal_fwd: gamma must be >= 0, got ", gamma); }

// Which target form ce_fwd received.
enum class TargetKind { kClassIndex, kProbability };

// logits (N, C, D); target (N, D) int64 or (N, C, D) logits' dtype; weight (C,) acc contiguous;
// mask (N, C, D) bool; grad (N, C, D) logits' dtype. `weight_name` is "weight" or "alpha".
// Returns the target kind (focal_fwd passes allow_prob = false).
inline TargetKind check_softmax_row_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight, const char* weight_name,
                                         const std::optional<at::Tensor>& mask,
                                         const std::optional<at::Tensor>& grad, bool allow_prob) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be (N, C, D), got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": logits must be float16, bfloat16, float32 or float64, got ", dt);
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  TORCH_CHECK(C > 0, op, ": logits must have at least one class, got shape ", logits.sizes());
  check_same_device("target", target, logits);

  TargetKind kind;
  if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK(allow_prob, op, ": target must be int64 class indices, got ", target.scalar_type());
    TORCH_CHECK(target.sizes() == logits.sizes(), op, ": probability target must have the logits' shape ",
                logits.sizes(), ", got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == dt, op, ": probability target must have the logits' dtype ", dt,
                ", got ", target.scalar_type());
    kind = TargetKind::kProbability;
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op, ": class target must be int64, got ", target.scalar_type());
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D, op,
                ": class target must be (N, D) = (", N, ", ", D, "), got ", target.sizes());
    kind = TargetKind::kClassIndex;
  }
  if (weight.has_value()) {
    const auto& w = *weight;
    check_same_device(weight_name, w, logits);
    TORCH_CHECK(w.dim() == 1 && w.size(0) == C, op, ": ", weight_name, " must be (C,) = (", C, ",), got ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == acc_dtype_of(dt), op, ": ", weight_name, " must be ",
                acc_dtype_of(dt), " for ", dt, " logits, got ", w.scalar_type());
    TORCH_CHECK(w.is_contiguous(), op, ": ", weight_name, " must be contiguous");
  }
  if (mask.has_value()) {
    const auto& m = *mask;
    check_same_device("mask", m, logits);
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.sizes() == logits.sizes(), op, ": mask must be (N, C, D) = ", logits.sizes(),
                " (expanded, 0 strides allowed), got ", m.sizes());
  }
  if (grad.has_value()) {
    const auto& g = *grad;
    check_same_device("grad", g, logits);
    TORCH_CHECK(g.sizes() == logits.sizes(), op, ": grad must have the logits' shape ", logits.sizes(),
                ", got ", g.sizes());
    TORCH_CHECK(g.scalar_type() == dt, op, ": grad must have the logits' dtype ", dt, ", got ",
                g.scalar_type());
    // Every element is written exactly once; overlapping storage (0 strides) would race.
    // grad may be the logits themselves (inplace_backward): the kernels read each element
    // before writing it.
    TORCH_CHECK(at::has_internal_overlap(g) != at::MemOverlap::Yes, op,
                ": grad must not have overlapping elements, got strides ", g.strides());
  }
  return kind;
}

}  // namespace fusedloss
