// Host interface of the CUDA kernels of fusedloss::binary_fwd, binary_bwd and scale_grad
// (csrc/cuda/binary_losses.cu), used by the torch binding (csrc/cuda/binary_binding.cpp).
// Plain C++ / CUDA runtime types only, so the .cu file compiles without torch.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

#include "cuda/launch_common.h"

namespace fusedloss {
namespace cuda {

// One (M, L) problem. Element (i, j) of an operand is at ptr[i * s0 + j * s1] (elements,
// int64; 0 strides for broadcast operands). Accumulation type `acc`: double for kFloat64
// input, float otherwise.
struct BinaryArgs {
  // pointers
  const void* input;       // (M, L) dtype
  const void* target;      // (M, L) dtype, or bool / uint8 (one byte, 0 / 1) when target_u8
  const void* weight;      // (M, L) acc, or nullptr (= 1)
  const void* pos_weight;  // (M, L) acc, or nullptr (= 1)
  void* grad;              // (M, L) dtype; forward: or nullptr (no gradient); may alias input
  const void* grad_out;    // backward: (M, L) grad_out_dtype for reduction none, else ()
  void* out;               // forward: (M, L) out_dtype contiguous (none), else () out_dtype
  void* workspace;         // forward: plan_binary_fwd(args) bytes (per-block partial sums)
  // strides (elements)
  int64_t input_s0, input_s1, target_s0, target_s1, weight_s0, weight_s1;
  int64_t pos_weight_s0, pos_weight_s1, grad_s0, grad_s1, grad_out_s0, grad_out_s1;
  // sizes
  int64_t M, L;
  int64_t blocks;  // forward: grid of the reducing kernel, set by plan_binary_fwd
  // meta-parameters
  DType dtype, out_dtype, grad_out_dtype;
  bool target_u8;  // target is bool or uint8 (read as it is, converted on load), else dtype
  double gamma;   // >= 0
  double alpha;   // < 0: no alpha term
  int reduction;  // Reduction
};

// Forward: sizes the grid of the reducing kernel (args.blocks, from the current device) and
// returns the bytes of workspace the launch needs (0 when none). Call once, before
// binary_fwd_launch.
int64_t plan_binary_fwd(BinaryArgs& args);

// Forward: reduction none: out = per-element loss (one launch). Mean / sum: out = the reduced
// loss, and grad (when given) = d(reduced loss)/dx for grad_output == 1 (two launches: the
// elementwise kernel, then the one-block sum of its partials).
cudaError_t binary_fwd_launch(const BinaryArgs& args, cudaStream_t stream);

// Backward that recomputes: grad = dloss/dx * grad_out[i, j] (none), grad_out (sum),
// grad_out / (M * L) (mean). One launch; out and workspace are unused.
cudaError_t binary_bwd_launch(const BinaryArgs& args, cudaStream_t stream);

// scale_grad: grad (M, L) dtype, strides s0, s1, *= grad_out (a 0-dim value of
// grad_out_dtype); every block returns at once when grad_out == 1. One launch.
struct ScaleGradArgs {
  // pointers
  const void* grad_out;
  void* grad;
  // strides (elements)
  int64_t s0, s1;
  // sizes
  int64_t M, L;
  // meta-parameters
  DType dtype, grad_out_dtype;
};

cudaError_t scale_grad_launch(const ScaleGradArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedloss
