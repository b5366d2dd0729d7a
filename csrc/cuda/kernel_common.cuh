// Device code shared by the CUDA kernels (softmax_losses.cu, binary_losses.cu): element type
// conversions, loads and stores of a run-time dtype, and the deterministic two-stage sum
// behind every reduced loss. CUDA headers only (no torch).
//
// Reductions ("mean", "sum", and the "mean" denominator) never use float atomics: the main
// kernel runs on a grid fixed by the problem size and the device's SM count, each thread adds
// its own rows / elements in a fixed order, and each block writes one partial (block_sum2, a
// fixed shuffle tree); then finish_sum_kernel, one block, adds the partials in a fixed order
// and writes the 0-dim results. Same input on the same device: bitwise the same result. The
// partials are double: they are added once per row (softmax) or once per vector of elements
// (binary), so the float32 results lose nothing to a long serial float sum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/launch_common.h"

namespace fusedloss {
namespace cuda {

// ----------------------------------------------------------------------------- element types
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// minBlocksPerMultiprocessor of __launch_bounds__ for a kernel accumulating in T: 0 (none:
// ptxas' default) in float; 1 in double, where the default aims at two 256- or 512-thread
// blocks per SM (64 or 80 registers) and then spills the values live across the double
// division's slow-path calls to the stack.
template <typename T> struct MinBlocks { static constexpr int value = 0; };
template <> struct MinBlocks<double> { static constexpr int value = 1; };

// p[i] of run-time dtype t (grad_out, which comes in any float dtype), as V.
template <typename V>
__device__ __forceinline__ V load_as(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat32: return V(static_cast<const float*>(p)[i]);
    case DType::kFloat64: return V(static_cast<const double*>(p)[i]);
    case DType::kFloat16: return V(__half2float(static_cast<const __half*>(p)[i]));
    default: return V(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
  }
}

// p[i] = v in run-time dtype t (the loss in out_dtype). Half types round from float.
template <typename V>
__device__ __forceinline__ void store_as(void* p, int64_t i, DType t, V v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::kFloat64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
  }
}

// ----------------------------------------------------------------------------- deterministic sums
// Sum of v over the kThreads threads of the block (blockDim.x * blockDim.y == kThreads, a
// multiple of 32), in a fixed order: a butterfly inside each warp, then warp 0's thread 0 adds
// the warps in order. The result is valid in the block's first thread. Every thread must call
// it (it has a barrier); `smem` holds kThreads / 32 entries.
template <int kThreads>
__device__ __forceinline__ double2 block_sum2(double2 v, double2* smem) {
  static_assert(kThreads % 32 == 0, "whole warps");
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, off);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, off);
  }
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  if (kThreads == 32) return v;
  if ((tid & 31) == 0) smem[tid >> 5] = v;
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < kThreads / 32; ++w) {
      v.x += smem[w].x;
      v.y += smem[w].y;
    }
  }
  return v;
}

// What finish_sum_kernel writes from the total (loss, count) of all partials.
struct FinishArgs {
  // pointers
  const double2* partial;  // (n,) per-block (loss sum, count sum) of the main kernel
  void* out;               // () out_dtype: the reduced loss; nullptr for reduction "none"
  void* denom;             // () denom_dtype (float32 / float64): the count sum; or nullptr
  // sizes
  int64_t n;
  // meta-parameters
  DType out_dtype, denom_dtype;
  int reduction;  // kReduceMean or kReduceSum (out), anything with out == nullptr
  // "mean" divides by numel when numel >= 0 (binary losses: an empty input gives 0 / 0 =
  // NaN, as PyTorch), else by the count sum, and is 0 when that is 0 (SPEC rule 6, as
  // row::mean_scale in backward).
  double numel;
};

constexpr int kFinishThreads = 512;

// Internal linkage: each .cu file that includes this header gets its own copy of the kernel.
namespace {

// One block: adds the partials in a fixed order and writes out / denom.
__global__ void __launch_bounds__(kFinishThreads) finish_sum_kernel(const FinishArgs a) {
  __shared__ double2 smem[kFinishThreads / 32];
  double2 v = make_double2(0.0, 0.0);
  for (int64_t i = threadIdx.x; i < a.n; i += kFinishThreads) {
    const double2 q = a.partial[i];
    v.x += q.x;
    v.y += q.y;
  }
  v = block_sum2<kFinishThreads>(v, smem);
  if (threadIdx.x != 0) return;
  // The denominator as stored (rounded to its dtype): the forward's "mean" and the backward's
  // row::mean_scale then agree on it, and on whether it is 0.
  const double den = a.denom_dtype == DType::kFloat32 ? double(float(v.y)) : v.y;
  if (a.denom) store_as(a.denom, 0, a.denom_dtype, den);
  if (a.out) {
    double loss = v.x;
    if (a.reduction == kReduceMean) {
      if (a.numel >= 0.0) {
        loss = loss / a.numel;
      } else {
        loss = den == 0.0 ? 0.0 : loss / den;
      }
    }
    store_as(a.out, 0, a.out_dtype, loss);
  }
}

// Enqueues finish_sum_kernel (one block).
cudaError_t launch_finish_sum(const FinishArgs& a, cudaStream_t stream) {
  finish_sum_kernel<<<1, kFinishThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

// ----------------------------------------------------------------------------- host helpers
// SM count of the current device (the binding's CUDAGuard selected it). The grids of the
// reducing kernels are sized from it once, by the plan functions (the grid is also the number
// of partials the binding allocates), so it fixes the summation order: deterministic per device.
inline int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms <= 0) {
    return 132;
  }
  return sms;
}

}  // namespace cuda
}  // namespace fusedloss
