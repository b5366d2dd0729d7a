// Host interface of the CUDA softmax-row kernels (csrc/cuda/softmax_losses.cu), used by the
// torch binding (csrc/cuda/softmax_binding.cpp). Plain C++: raw pointers, int64 strides in
// elements and a cudaStream_t, so the .cu file needs no torch header.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "cuda/launch_common.h"

namespace fusedloss {
namespace cuda {

enum class SoftmaxLoss : int { kCeIndex = 0, kCeProb = 1, kFocal = 2 };

// ce_fwd / focal_fwd. One row = one (n, d) of the (N, C, D) logits; r = n * D + d. `acc` is
// double for float64 logits, float otherwise.
struct SoftmaxFwdParams {
  // pointers
  const void* logits;     // (N, C, D) dtype
  const int64_t* target;  // (N, D) class indices (kCeIndex, kFocal), else nullptr
  const void* prob;       // (N, C, D) dtype probability target (kCeProb), else nullptr
  const void* weight;     // (C,) acc, contiguous: class weight (ce) or alpha (focal); nullptr = 1
  const bool* mask;       // (N, C, D), True = allowed; nullptr = all allowed
  void* out;              // reduction none: (N * D,) out_dtype contiguous; else () out_dtype
  void* denom;            // () acc: sum of the rows' counts
  void* stats;            // (N * D, 4) acc contiguous: row::write_stats
  void* workspace;        // plan_softmax_fwd(p) bytes (per-block partial sums)
  // strides (elements)
  int64_t x_n, x_c, x_d;
  int64_t t_n, t_d;
  int64_t y_n, y_c, y_d;
  int64_t m_n, m_c, m_d;
  // sizes
  int64_t N, C, D;
  int64_t blocks;  // grid of the row kernel, set by plan_softmax_fwd
  // meta-parameters
  SoftmaxLoss kind;
  DType dtype, out_dtype;
  int reduction;  // Reduction
  int64_t ignore_index;
  double label_smoothing, z_loss, softcap;  // cross-entropy (0 = off)
  double gamma;                             // focal
};

// Sizes the row kernel's grid (p.blocks, from the current device) and returns the bytes of
// workspace the launch needs (0 when none). Call once, before launch_softmax_fwd.
int64_t plan_softmax_fwd(SoftmaxFwdParams& p);

// Enqueues the row kernel and the one-block reduction on `stream` (two launches); returns the
// launch error (cudaSuccess when none).
cudaError_t launch_softmax_fwd(const SoftmaxFwdParams& p, cudaStream_t stream);

// softmax_bwd: grad = dloss/dx (from the forward's stats) * scale, scale = grad_out[n, d]
// (none), grad_out (sum), row::mean_scale(grad_out, denom) (mean).
struct SoftmaxBwdParams {
  // pointers
  const void* grad_out;   // none: (N, D) grad_out_dtype, any strides; mean / sum: ()
  const void* logits;     // (N, C, D) dtype
  const int64_t* target;  // (N, D) class indices, or nullptr with probability targets
  const void* prob;       // (N, C, D) dtype probability target, or nullptr
  const void* weight;     // (C,) acc contiguous, or nullptr (= 1; focal passes none)
  const bool* mask;       // (N, C, D), or nullptr
  const void* stats;      // (N * D, 4) acc contiguous, from the forward
  const void* denom;      // () acc, from the forward
  void* grad;             // (N, C, D) dtype; may alias logits (each element read, then written)
  // strides (elements)
  int64_t go_n, go_d;
  int64_t x_n, x_c, x_d;
  int64_t t_n, t_d;
  int64_t y_n, y_c, y_d;
  int64_t m_n, m_c, m_d;
  int64_t g_n, g_c, g_d;
  // sizes
  int64_t N, C, D;
  // meta-parameters
  DType dtype, grad_out_dtype;
  int reduction;  // Reduction
  double softcap;
};

// Enqueues the backward kernel (one launch) on `stream`.
cudaError_t launch_softmax_bwd(const SoftmaxBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedloss
