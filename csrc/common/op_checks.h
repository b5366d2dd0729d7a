// Op-level argument checks of the softmax-row ops (ce_fwd, focal_fwd, softmax_bwd), shared by
// the CPU implementation (csrc/cpu/softmax_ops.cpp) and the CUDA binding
// (csrc/cuda/softmax_binding.cpp). The user-facing validation, with PyTorch's messages, is in
// fusedloss/functional.py; these TORCH_CHECKs guard the op itself (called directly, through
// torch.ops.fusedloss, or by opcheck) so a kernel never reads out of bounds, misreads a dtype
// or races on its output.
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

inline bool is_loss_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), "fusedloss: ", name, " is on ", t.device(),
              " but logits are on ", logits.device());
}

// at::Reduction: 0 = "none", 1 = "mean", 2 = "sum".
inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "fusedloss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// out_dtype of the forward ops: the dtype the loss is returned in.
inline void check_out_dtype(const char* op, at::ScalarType out_dtype) {
  TORCH_CHECK(is_loss_float(out_dtype), op, ": out_dtype must be float16, bfloat16, float32 or float64, got ",
              out_dtype);
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

// An output `out` that the kernel writes element by element, each exactly once: no two of its
// elements may share memory (0 strides, overlapping views: the writes would race).
inline void check_writable(const char* op, const char* name, const at::Tensor& out) {
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op, ": ", name,
              " must not have overlapping elements (expanded or self-overlapping view), got sizes ", out.sizes(),
              " strides ", out.strides());
}

// `out` may be `in` itself, element for element (same address, same strides: the kernels read
// each element before writing it; inplace_backward), or share no memory with it. Any other
// overlap would let a write clobber an input element not read yet.
inline void check_same_or_disjoint(const char* op, const char* out_name, const at::Tensor& out, const char* in_name,
                                   const at::Tensor& in) {
  const auto lap = at::get_overlap_status(out, in);
  if (lap == at::MemOverlapStatus::Full || lap == at::MemOverlapStatus::No) return;
  // Partial, or TooHard (a non-dense view, not analysed): accept only the same view of the
  // same storage, or another storage.
  const bool same = !out.is_alias_of(in) || (out.data_ptr() == in.data_ptr() && out.strides() == in.strides() &&
                                             out.sizes() == in.sizes());
  TORCH_CHECK(same, op, ": ", out_name, " partially overlaps ", in_name, "; it must be ", in_name,
              " itself (same storage offset and strides) or not share its memory");
}

// `out` shares no memory with the input `in` (which is read after `out` may have been written).
inline void check_disjoint(const char* op, const char* out_name, const at::Tensor& out, const char* in_name,
                           const at::Tensor& in) {
  const auto lap = at::get_overlap_status(out, in);
  TORCH_CHECK(lap != at::MemOverlapStatus::Full && lap != at::MemOverlapStatus::Partial, op, ": ", out_name,
              " must not share memory with ", in_name);
}

// logits (N, C, D); target (N, D) int64 or (N, C, D) logits' dtype; weight (C,) acc contiguous;
// mask (N, C, D) bool. `weight_name` is "weight" or "alpha". Returns the target kind
// (focal_fwd passes allow_prob = false).
inline TargetKind check_softmax_fwd_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight, const char* weight_name,
                                         const std::optional<at::Tensor>& mask, bool allow_prob) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be (N, C, D), got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(is_loss_float(dt), op, ": logits must be float16, bfloat16, float32 or float64, got ", dt);
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
  return kind;
}

// softmax_bwd: the forward's arguments as above (weight None for focal), plus
//   grad_out  reduction 0: (N, D) any float dtype, any strides; 1, 2: () any float dtype
//   stats     (N, D, 4) acc contiguous; denom () acc
//   grad      (N, C, D) logits' dtype, any strides without self-overlap; it may be the logits
//             (inplace_backward) but shares memory with no other argument.
inline TargetKind check_softmax_bwd_args(const at::Tensor& grad_out, const at::Tensor& logits,
                                         const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& mask, const at::Tensor& stats,
                                         const at::Tensor& denom, const at::Tensor& grad, int64_t reduction) {
  constexpr const char* op = "softmax_bwd";
  check_reduction(reduction);
  const TargetKind kind = check_softmax_fwd_args(op, logits, target, weight, "weight", mask, /*allow_prob=*/true);
  const auto dt = logits.scalar_type();
  const auto acc = acc_dtype_of(dt);
  const int64_t N = logits.size(0), D = logits.size(2);

  check_same_device("grad_out", grad_out, logits);
  TORCH_CHECK(is_loss_float(grad_out.scalar_type()), op,
              ": grad_out must be float16, bfloat16, float32 or float64, got ", grad_out.scalar_type());
  if (reduction == 0) {
    TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == D, op,
                ": grad_out must be (N, D) = (", N, ", ", D, ") for reduction none, got ", grad_out.sizes());
  } else {
    TORCH_CHECK(grad_out.dim() == 0, op, ": grad_out must be 0-dim for reduction mean / sum, got ",
                grad_out.sizes());
  }
  check_same_device("stats", stats, logits);
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == N && stats.size(1) == D && stats.size(2) == 4, op,
              ": stats must be (N, D, 4) = (", N, ", ", D, ", 4), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == acc, op, ": stats must be ", acc, " for ", dt, " logits, got ",
              stats.scalar_type());
  TORCH_CHECK(stats.is_contiguous(), op, ": stats must be contiguous");
  check_same_device("denom", denom, logits);
  TORCH_CHECK(denom.dim() == 0, op, ": denom must be 0-dim, got ", denom.sizes());
  TORCH_CHECK(denom.scalar_type() == acc, op, ": denom must be ", acc, " for ", dt, " logits, got ",
              denom.scalar_type());

  check_same_device("grad", grad, logits);
  TORCH_CHECK(grad.sizes() == logits.sizes(), op, ": grad must have the logits' shape ", logits.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == dt, op, ": grad must have the logits' dtype ", dt, ", got ",
              grad.scalar_type());
  check_writable(op, "grad", grad);
  check_same_or_disjoint(op, "grad", grad, "logits", logits);
  check_disjoint(op, "grad", grad, "target", target);
  if (weight.has_value()) check_disjoint(op, "grad", grad, "weight", *weight);
  if (mask.has_value()) check_disjoint(op, "grad", grad, "mask", *mask);
  check_disjoint(op, "grad", grad, "stats", stats);
  check_disjoint(op, "grad", grad, "denom", denom);
  check_disjoint(op, "grad", grad, "grad_out", grad_out);
  return kind;
}

}  // namespace fusedloss
