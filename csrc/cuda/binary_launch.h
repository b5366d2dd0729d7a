// Host interface of the CUDA kernel of fusedloss::binary_fwd (csrc/cuda/binary_losses.cu),
// used by the torch binding (csrc/cuda/binary_binding.cpp). Plain C++ / CUDA runtime types
// only, so the .cu file compiles without torch.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

namespace fusedloss {
namespace cuda {

enum class BinaryDtype { kHalf, kBFloat16, kFloat, kDouble };

// One (M, L) problem. Element (i, j) of an operand is at ptr[i * s0 + j * s1] (elements,
// int64; 0 strides for broadcast operands). Accumulation type `acc`: double for kDouble
// input, float otherwise.
struct BinaryArgs {
  // pointers
  const void* input;       // (M, L) dtype
  const void* target;      // (M, L) dtype
  const void* weight;      // (M, L) acc, or nullptr (= 1)
  const void* pos_weight;  // (M, L) acc, or nullptr (= 1)
  void* grad;              // (M, L) dtype, or nullptr (no gradient); may alias input
  void* out;               // (M, L) acc contiguous, or (M,) acc when reduce
  void* workspace;         // binary_fwd_workspace(args) acc elements, when that is > 0
  // strides (elements)
  int64_t input_s0, input_s1, target_s0, target_s1, weight_s0, weight_s1;
  int64_t pos_weight_s0, pos_weight_s1, grad_s0, grad_s1;
  // sizes
  int64_t M, L;
  // meta-parameters
  BinaryDtype dtype;
  double gamma;  // >= 0
  double alpha;  // < 0: no alpha term
  bool reduce;   // out = per-row sums (M,) instead of per-element losses (M, L)
};

// Number of acc elements of scratch the launch needs (per-chunk partial sums of long rows
// when reduce); 0 when none.
int64_t binary_fwd_workspace(const BinaryArgs& args);

// Enqueues the kernel(s) on `stream`; returns the launch error (cudaSuccess when none).
cudaError_t binary_fwd_launch(const BinaryArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedloss
