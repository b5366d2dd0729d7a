// C entry points of the emulated binary kernels (BCE-with-logits, sigmoid focal) for
// tests/test_cuda_emu.py (ctypes): the launch interface of csrc/cuda/binary_launch.h with flat
// arguments, and the plan's vector width. The test writes binary_losses_emu.cpp
// (csrc/cuda/binary_losses.cu with its launches rewritten for emu_device.h) next to the
// rewritten cuda/kernel_common.cuh, and compiles this file with that directory first on the
// include path, with emu_api.cpp.
#include <vector>

#include "binary_losses_emu.cpp"

using fusedloss::cuda::BinaryArgs;
using fusedloss::cuda::DType;

namespace {

// s: strides input_s0, input_s1, target_s0, target_s1, weight_s0, weight_s1, pos_weight_s0,
// pos_weight_s1, grad_s0, grad_s1, grad_out_s0, grad_out_s1. f: gamma, alpha.
BinaryArgs binary_args(const void* input, const void* target, int target_u8, const void* weight,
                       const void* pos_weight, void* grad, const int64_t* s, int64_t M, int64_t L, int dtype,
                       int reduction, const double* f) {
  BinaryArgs a{};
  a.input = input, a.target = target, a.weight = weight, a.pos_weight = pos_weight, a.grad = grad;
  a.input_s0 = s[0], a.input_s1 = s[1], a.target_s0 = s[2], a.target_s1 = s[3];
  a.weight_s0 = s[4], a.weight_s1 = s[5], a.pos_weight_s0 = s[6], a.pos_weight_s1 = s[7];
  a.grad_s0 = s[8], a.grad_s1 = s[9], a.grad_out_s0 = s[10], a.grad_out_s1 = s[11];
  a.M = M, a.L = L;
  a.dtype = static_cast<DType>(dtype);
  a.target_u8 = target_u8 != 0;
  a.gamma = f[0], a.alpha = f[1];
  a.reduction = reduction;
  return a;
}

}  // namespace

extern "C" {

// binary_fwd: out (reduction none: (M, L) contiguous, else ()) in out_dtype; grad (mean / sum,
// or nullptr). Returns the cudaError_t; *vec: the vector width of the plan it ran.
int emu_binary_fwd(const void* input, const void* target, int target_u8, const void* weight, const void* pos_weight,
                   void* grad, void* out, const int64_t* s, int64_t M, int64_t L, int dtype, int out_dtype,
                   int reduction, const double* f, int* vec) {
  using namespace fusedloss::cuda;
  BinaryArgs a = binary_args(input, target, target_u8, weight, pos_weight, grad, s, M, L, dtype, reduction, f);
  a.out = out;
  a.out_dtype = static_cast<DType>(out_dtype);
  *vec = make_plan(a, reduction == kReduceNone ? kLoss : kSum).vec;
  std::vector<double2> workspace(plan_binary_fwd(a) / sizeof(double2) + 1);
  a.workspace = workspace.data();
  return static_cast<int>(binary_fwd_launch(a, nullptr));
}

// binary_bwd: grad = dloss/dx * grad_out (grad_out (M, L) for reduction none, else ()).
int emu_binary_bwd(const void* grad_out, const void* input, const void* target, int target_u8, const void* weight,
                   const void* pos_weight, void* grad, const int64_t* s, int64_t M, int64_t L, int dtype,
                   int grad_out_dtype, int reduction, const double* f, int* vec) {
  using namespace fusedloss::cuda;
  BinaryArgs a = binary_args(input, target, target_u8, weight, pos_weight, grad, s, M, L, dtype, reduction, f);
  a.grad_out = grad_out;
  a.grad_out_dtype = static_cast<DType>(grad_out_dtype);
  *vec = make_plan(a, kBwd).vec;
  return static_cast<int>(binary_bwd_launch(a, nullptr));
}

}  // extern "C"
