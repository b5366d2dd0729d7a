// Op-level checks of fusedloss::binary_fwd, shared by the CPU impl (csrc/cpu/binary_ops.cpp)
// and the CUDA binding (csrc/cuda/binary_binding.cpp). The Python layer (fusedloss/functional.py)
// makes the user-facing checks with PyTorch's messages; these guard the op itself, which
// torch.ops.fusedloss.binary_fwd exposes to anyone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace fusedloss {

inline at::ScalarType binary_acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_binary_operand(const char* name, const at::Tensor& t, const at::Tensor& input,
                                 at::ScalarType dtype, const char* dtype_rule) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == input.sizes(), "fusedloss::binary_fwd: ", name,
              " must have the input's shape ", input.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fusedloss::binary_fwd: ", name, " must be ", dtype_rule, " (",
              dtype, "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "fusedloss::binary_fwd: ", name, " is on ", t.device(),
              " but input is on ", input.device());
}

// input (M, L) float16/bfloat16/float32/float64; target (M, L) input's dtype;
// weight, pos_weight (M, L) acc dtype or None; grad (M, L) input's dtype or None.
inline void check_binary_fwd(const at::Tensor& input, const at::Tensor& target,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
                             const c10::optional<at::Tensor>& grad, double gamma) {
  TORCH_CHECK(input.dim() == 2, "fusedloss::binary_fwd: input must be 2-D (M, L), got shape ", input.sizes());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
              "fusedloss::binary_fwd: input must be float16, bfloat16, float32 or float64, got ", dt);
  const auto acc = binary_acc_dtype(dt);
  check_binary_operand("target", target, input, dt, "the input's dtype");
  if (weight.has_value()) check_binary_operand("weight", *weight, input, acc, "the accumulation dtype");
  if (pos_weight.has_value()) check_binary_operand("pos_weight", *pos_weight, input, acc, "the accumulation dtype");
  if (grad.has_value()) check_binary_operand("grad", *grad, input, dt, "the input's dtype");
  TORCH_CHECK(gamma >= 0, "fusedloss::binary_fwd: gamma must be >= 0, got ", gamma);
}

}  // namespace fusedloss
