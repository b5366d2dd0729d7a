// CUDA kernels of ce_fwd and focal_fwd. The per-row arithmetic (online max/sum-exp, row
// kinds, finalize, element gradient) is csrc/common/softmax_row.h, shared with the CPU
// kernels; this file adds the memory traffic and the thread layout. Only CUDA headers and
// csrc/ headers are included (the binding, csrc/cuda/softmax_binding.cpp, holds the torch side).
//
// Layout: a row (one (n, d) of the (N, C, D) logits) is handled by kWarps warps; a block holds
// kRows rows (blockDim = (32 * kWarps, kRows)). Small C: one warp per row, 4 rows per block;
// large C: 8 or 16 warps per row. Each thread walks its classes c = lane, lane + threads, ...
//   pass 1  per-thread online max / sum-exp (+ smoothing / probability sums), then a fixed
//           butterfly-shuffle and shared-memory tree merges the row: deterministic, no atomics;
//   pass 2  (grad only) the same classes again: each thread reads x_c, then writes grad_c, so
//           grad may alias the logits; the target logit is read by every thread before the
//           row reduction, whose barrier orders it before any write.
// Offsets are int64. bf16/fp16 are read through cuda_bf16.h / cuda_fp16.h and accumulated in
// float. An out-of-range class target reads nothing: loss NaN, count 0, gradient 0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/softmax_row.h"
#include "cuda/softmax_launch.h"

namespace fusedloss {
namespace cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Merges the row statistics of two threads (both halves of a butterfly).
template <typename T>
__device__ __forceinline__ void merge_stats(row::RowStats<T>& a, const row::RowStats<T>& b) {
  row::merge_max_sum(a.m, a.s, b.m, b.s);
  a.n_allowed += b.n_allowed;
  a.w_allowed += b.w_allowed;
  a.wz_allowed += b.wz_allowed;
  a.wy += b.wy;
  a.wyz += b.wyz;
}

template <typename T>
__device__ __forceinline__ row::RowStats<T> shfl_xor_stats(const row::RowStats<T>& a, int lane_mask) {
  row::RowStats<T> b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, lane_mask);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, lane_mask);
  b.n_allowed = __shfl_xor_sync(0xffffffffu, a.n_allowed, lane_mask);
  b.w_allowed = __shfl_xor_sync(0xffffffffu, a.w_allowed, lane_mask);
  b.wz_allowed = __shfl_xor_sync(0xffffffffu, a.wz_allowed, lane_mask);
  b.wy = __shfl_xor_sync(0xffffffffu, a.wy, lane_mask);
  b.wyz = __shfl_xor_sync(0xffffffffu, a.wyz, lane_mask);
  return b;
}

template <typename scalar_t, int kWarps, int kRows>
__global__ void __launch_bounds__(32 * kWarps * kRows)
softmax_rows_kernel(const SoftmaxRowParams p) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kThreads = 32 * kWarps;
  __shared__ row::RowStats<acc_t> warp_stats[kRows][kWarps];

  const bool index_target = p.kind != SoftmaxLoss::kCeProb;
  const bool prob = p.kind == SoftmaxLoss::kCeProb;
  const bool smoothing = p.label_smoothing > 0.0;
  const bool softcap = p.softcap > 0.0;
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  const acc_t cap = static_cast<acc_t>(p.softcap);
  const acc_t inv_cap = softcap ? acc_t(1) / cap : acc_t(0);
  const acc_t ninf = row::neg_inf<acc_t>();
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const scalar_t* probs = static_cast<const scalar_t*>(p.prob);
  scalar_t* grad = static_cast<scalar_t*>(p.grad);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t R = p.N * p.D, C = p.C;

  // Rows are uniform per (block, threadIdx.y): every early exit below is taken by the whole
  // row's threads together, so the barriers stay matched.
  for (int64_t r0 = int64_t(blockIdx.x) * kRows; r0 < R; r0 += int64_t(gridDim.x) * kRows) {
    const int64_t r = r0 + threadIdx.y;
    const bool active = r < R;
    const int64_t n = active ? r / p.D : 0, d = active ? r % p.D : 0;
    const scalar_t* x = logits + n * p.x_n + d * p.x_d;
    const scalar_t* y = prob ? probs + n * p.y_n + d * p.y_d : nullptr;
    const bool* mask = p.mask ? p.mask + n * p.m_n + d * p.m_d : nullptr;
    scalar_t* g = grad ? grad + n * p.g_n + d * p.g_d : nullptr;

    // --- classification and the target's logit
    int64_t t = -1;
    row::RowKind kind = row::kCounted;
    acc_t z_t = ninf, dzdx_t = acc_t(1), w_t = acc_t(1);
    bool t_allowed = false;
    if (active && index_target) {
      t = p.target[n * p.t_n + d * p.t_d];
      kind = row::classify_target(t, p.ignore_index, C);
      if (kind == row::kCounted) {
        const acc_t x_t = to_acc(x[t * p.x_c]);
        t_allowed = x_t != ninf && (!mask || mask[t * p.m_c]);
        if (t_allowed) z_t = softcap ? row::softcap_z(x_t, cap, inv_cap, acc_t(1), dzdx_t) : x_t;
        if (weight) w_t = weight[t];
      }
    }

    // --- pass 1: this thread's classes
    row::RowStats<acc_t> st;
    if (active && kind == row::kCounted) {
      for (int64_t c = tid; c < C; c += kThreads) {
        acc_t z = to_acc(x[c * p.x_c]);
        bool allowed = z != ninf && (!mask || mask[c * p.m_c]);
        if (!allowed) z = ninf;
        else if (softcap) z = cap * row::Math<acc_t>::tanh(z * inv_cap);
        row::add_max_sum(st.m, st.s, z);
        if (smoothing || prob) {
          const acc_t w = weight ? weight[c] : acc_t(1);
          if (smoothing && allowed) {
            st.n_allowed += acc_t(1);
            st.w_allowed += w;
            st.wz_allowed += w * z;
          }
          if (prob) {
            const acc_t wy = w * to_acc(y[c * p.y_c]);
            st.wy += wy;
            if (wy != acc_t(0)) st.wyz += wy * z;  // 0 * log 0 = 0 (rule 7)
          }
        }
      }
    }
    // --- row reduction: butterfly inside the warp, then the warps of the row in order
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) merge_stats(st, shfl_xor_stats(st, off));
    if (kWarps > 1) {
      if (lane == 0) warp_stats[threadIdx.y][warp] = st;
      __syncthreads();
      st = warp_stats[threadIdx.y][0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) merge_stats(st, warp_stats[threadIdx.y][w]);
      __syncthreads();  // warp_stats is reused by the next row
    }
    if (!active) continue;

    // --- finalize (every thread, same values)
    row::RowCoefs<acc_t> k;
    if (kind == row::kIgnored) {
      k = row::zero_row<acc_t>();
    } else if (kind == row::kOutOfRange) {
      k = row::out_of_range_row<acc_t>();
    } else if (p.kind == SoftmaxLoss::kCeIndex) {
      k = row::ce_finalize_index(st, z_t, w_t, eps, static_cast<acc_t>(p.z_loss), smoothing);
    } else if (p.kind == SoftmaxLoss::kCeProb) {
      k = row::ce_finalize_prob(st, eps, static_cast<acc_t>(p.z_loss), smoothing);
    } else {
      k = row::focal_finalize(st, z_t, w_t, static_cast<acc_t>(p.gamma));
    }
    if (tid == 0) {
      static_cast<acc_t*>(p.loss)[r] = k.loss;
      static_cast<acc_t*>(p.count)[r] = k.count;
    }
    if (!g) continue;

    // --- pass 2: dloss/dx_c
    const acc_t hard = acc_t(1) - eps;
    for (int64_t c = tid; c < C; c += kThreads) {
      acc_t gc = acc_t(0);
      if (k.grad) {
        if (c == t) {
          gc = row::target_grad(k, z_t, dzdx_t, w_t, t_allowed);
        } else {
          const acc_t xc = to_acc(x[c * p.x_c]);
          const bool allowed = xc != ninf && (!mask || mask[c * p.m_c]);
          const acc_t w = weight ? weight[c] : acc_t(1);
          const acc_t wy = prob ? w * to_acc(y[c * p.y_c]) : acc_t(0);
          if (allowed) {
            acc_t dzdx = acc_t(1);
            const acc_t z = softcap ? row::softcap_z(xc, cap, inv_cap, acc_t(1), dzdx) : xc;
            const acc_t coef_y = (prob ? row::coef_times(hard, wy) : acc_t(0)) + k.smooth * w;
            gc = row::grad_of_p(row::softmax_p(z, k.lse), k.coef_p, coef_y) * dzdx;
          } else if (prob) {
            gc = -row::coef_times(hard, wy);  // masked class with y > 0 (p = 0)
          }
        }
      }
      g[c * p.g_c] = from_acc<scalar_t>(gc);
    }
  }
}

template <typename scalar_t, int kWarps, int kRows>
cudaError_t launch(const SoftmaxRowParams& p, cudaStream_t stream) {
  const int64_t R = p.N * p.D;
  if (R == 0) return cudaSuccess;
  const int64_t blocks = (R + kRows - 1) / kRows;
  const unsigned grid = static_cast<unsigned>(blocks < (int64_t(1) << 30) ? blocks : (int64_t(1) << 30));
  softmax_rows_kernel<scalar_t, kWarps, kRows><<<grid, dim3(32 * kWarps, kRows), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_for_dtype(const SoftmaxRowParams& p, cudaStream_t stream) {
  // One warp per row up to 1k classes (4 rows per block); then 8 or 16 warps per row.
  if (p.C <= 1024) return launch<scalar_t, 1, 4>(p, stream);
  if (p.C <= 16384) return launch<scalar_t, 8, 1>(p, stream);
  return launch<scalar_t, 16, 1>(p, stream);
}

}  // namespace

cudaError_t launch_softmax_rows(const SoftmaxRowParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_for_dtype<float>(p, stream);
    case DType::kFloat64: return launch_for_dtype<double>(p, stream);
    case DType::kFloat16: return launch_for_dtype<__half>(p, stream);
    case DType::kBFloat16: return launch_for_dtype<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fusedloss
