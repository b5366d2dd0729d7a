// Host interface of the CUDA softmax-row kernels (csrc/cuda/softmax_losses.cu), used by the
// torch binding (csrc/cuda/softmax_binding.cpp). Plain C++: raw pointers, int64 strides in
// elements and a cudaStream_t, so the .cu file needs no torch header.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace fusedloss {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class SoftmaxLoss : int { kCeIndex = 0, kCeProb = 1, kFocal = 2 };

// One row = one (n, d) of the (N, C, D) logits. Results in the accumulation type (double for
// float64 logits, float otherwise).
struct SoftmaxRowParams {
  // pointers
  const void* logits;     // (N, C, D) dtype
  const int64_t* target;  // (N, D) class indices (kCeIndex, kFocal), else nullptr
  const void* prob;       // (N, C, D) dtype probability target (kCeProb), else nullptr
  const void* weight;     // (C,) acc, contiguous: class weight (ce) or alpha (focal); nullptr = 1
  const bool* mask;       // (N, C, D), True = allowed; nullptr = all allowed
  void* grad;             // (N, C, D) dtype, may alias logits; nullptr = no gradient
  void* loss;             // (N * D,) acc, contiguous
  void* count;            // (N * D,) acc, contiguous
  // strides (elements)
  int64_t x_n, x_c, x_d;
  int64_t t_n, t_d;
  int64_t y_n, y_c, y_d;
  int64_t m_n, m_c, m_d;
  int64_t g_n, g_c, g_d;
  // sizes
  int64_t N, C, D;
  // meta-parameters
  SoftmaxLoss kind;
  DType dtype;
  int64_t ignore_index;
  double label_smoothing, z_loss, softcap;  // cross-entropy (0 = off)
  double gamma;                             // focal
};

// Launches on `stream`; returns the launch error (cudaSuccess when none).
cudaError_t launch_softmax_rows(const SoftmaxRowParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedloss
