// Op-level checks of fusedloss::binary_fwd, binary_bwd and scale_grad, shared by the CPU impl
// (csrc/cpu/binary_ops.cpp) and the CUDA binding (csrc/cuda/binary_binding.cpp). The Python
// layer (fusedloss/functional.py) makes the user-facing checks with PyTorch's messages; these
// guard the ops themselves, which torch.ops.fusedloss exposes to anyone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/op_checks.h"  // check_reduction, check_writable, check_same_or_disjoint, ...

namespace fusedloss {

inline at::ScalarType binary_acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_binary_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                                 at::ScalarType dtype, const char* dtype_rule) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == input.sizes(), op, ": ", name, " must have the input's shape ",
              input.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_rule, " (", dtype, "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
}

// Target dtypes a kernel reads as they are, besides the input's (converted to acc on load:
// bool and integer 0/1 labels need no float copy). The CPU kernels read all of these.
inline bool is_native_target(at::ScalarType t) {
  return t == at::kBool || t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

// The one-byte label maps the CUDA kernels read as they are (bool is one byte, 0 / 1); the
// Python layer converts other integer targets for them (fusedloss/functional.py).
inline bool is_byte_target(at::ScalarType t) { return t == at::kBool || t == at::kByte; }

// Which target dtypes an op's kernels read besides the input's: none (false), every one of
// is_native_target (true: the CPU impls), or those of a predicate with its rule for messages.
struct NativeTargets {
  bool (*accepts)(at::ScalarType) = nullptr;
  const char* rule = "the input's dtype";
  NativeTargets(bool all = false)  // implicit: call sites pass true / false
      : accepts(all ? &is_native_target : nullptr),
        rule(all ? "bool, integer or the input's dtype" : "the input's dtype") {}
  NativeTargets(bool (*pred)(at::ScalarType), const char* r) : accepts(pred), rule(r) {}
};

// What the CUDA binding passes: bool and uint8 targets only.
inline NativeTargets byte_targets() { return NativeTargets(&is_byte_target, "bool, uint8 or the input's dtype"); }

// input (M, L) float16/bfloat16/float32/float64; target (M, L) input's dtype (or, where the
// kernels read them, native_targets: bool / integer, or the predicate's dtypes); weight,
// pos_weight (M, L) acc dtype or None; gamma >= 0; reduction 0, 1, 2.
inline void check_binary_inputs(const char* op, const at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& pos_weight, double gamma, int64_t reduction,
                                NativeTargets native_targets = {}) {
  check_reduction(reduction);
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D (M, L), got shape ", input.sizes());
  const auto dt = input.scalar_type();
  TORCH_CHECK(is_loss_float(dt), op, ": input must be float16, bfloat16, float32 or float64, got ", dt);
  const auto acc = binary_acc_dtype(dt);
  if (native_targets.accepts != nullptr && native_targets.accepts(target.scalar_type())) {
    check_binary_operand(op, "target", target, input, target.scalar_type(), native_targets.rule);
  } else {
    check_binary_operand(op, "target", target, input, dt, native_targets.rule);
  }
  if (weight.has_value()) check_binary_operand(op, "weight", *weight, input, acc, "the accumulation dtype");
  if (pos_weight.has_value()) check_binary_operand(op, "pos_weight", *pos_weight, input, acc, "the accumulation dtype");
  TORCH_CHECK(gamma >= 0, op, ": gamma must be >= 0, got ", gamma);
}

// grad (M, L) input's dtype, no self-overlap; it may be the input itself (read before written)
// but shares memory with no other operand.
inline void check_binary_grad(const char* op, const at::Tensor& grad, const at::Tensor& input,
                              const at::Tensor& target, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& pos_weight) {
  check_binary_operand(op, "grad", grad, input, input.scalar_type(), "the input's dtype");
  check_writable(op, "grad", grad);
  check_same_or_disjoint(op, "grad", grad, "input", input);
  check_disjoint(op, "grad", grad, "target", target);
  if (weight.has_value()) check_disjoint(op, "grad", grad, "weight", *weight);
  if (pos_weight.has_value()) check_disjoint(op, "grad", grad, "pos_weight", *pos_weight);
}

// grad_out: reduction 0 (M, L), else 0-dim; any float dtype, any strides, input's device.
inline void check_binary_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& ref,
                                  int64_t reduction) {
  TORCH_CHECK(grad_out.device() == ref.device(), op, ": grad_out is on ", grad_out.device(), " but the ",
              "gradient is on ", ref.device());
  TORCH_CHECK(is_loss_float(grad_out.scalar_type()), op,
              ": grad_out must be float16, bfloat16, float32 or float64, got ", grad_out.scalar_type());
  if (reduction == 0) {
    TORCH_CHECK(grad_out.sizes() == ref.sizes(), op, ": grad_out must have the input's shape ", ref.sizes(),
                " for reduction none, got ", grad_out.sizes());
  } else {
    TORCH_CHECK(grad_out.dim() == 0, op, ": grad_out must be 0-dim for reduction mean / sum, got ",
                grad_out.sizes());
  }
}

// binary_fwd: grad only with reduction mean / sum (it holds the gradient for grad_output == 1).
inline void check_binary_fwd(const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                             const std::optional<at::Tensor>& grad, double gamma, int64_t reduction,
                             NativeTargets native_targets = {}) {
  constexpr const char* op = "fusedloss::binary_fwd";
  check_binary_inputs(op, input, target, weight, pos_weight, gamma, reduction, native_targets);
  if (grad.has_value()) {
    TORCH_CHECK(reduction != 0, op, ": grad is only computed for reduction mean or sum (use binary_bwd for none)");
    check_binary_grad(op, *grad, input, target, weight, pos_weight);
  }
}

inline void check_binary_bwd(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                             const at::Tensor& grad, double gamma, int64_t reduction,
                             NativeTargets native_targets = {}) {
  constexpr const char* op = "fusedloss::binary_bwd";
  check_binary_inputs(op, input, target, weight, pos_weight, gamma, reduction, native_targets);
  check_binary_grad_out(op, grad_out, input, reduction);
  check_binary_grad(op, grad, input, target, weight, pos_weight);
  check_disjoint(op, "grad", grad, "grad_out", grad_out);
}

// scale_grad: grad_out 0-dim float on grad's device; grad float, no self-overlap.
inline void check_scale_grad(const at::Tensor& grad_out, const at::Tensor& grad) {
  constexpr const char* op = "fusedloss::scale_grad";
  TORCH_CHECK(is_loss_float(grad.scalar_type()), op, ": grad must be float16, bfloat16, float32 or float64, got ",
              grad.scalar_type());
  check_binary_grad_out(op, grad_out, grad, /*reduction=*/1);
  check_writable(op, "grad", grad);
  check_disjoint(op, "grad", grad, "grad_out", grad_out);
}

}  // namespace fusedloss
