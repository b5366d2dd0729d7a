// CUDA kernel of fusedloss::binary_fwd: BCE-with-logits and torchvision's sigmoid focal loss,
// elementwise over an (M, L) view, loss and gradient in one pass. Per-element math:
// csrc/common/binary_elem.h (the same code the CPU kernel runs). No torch headers here;
// csrc/cuda/binary_binding.cpp binds it to the op.
//
// Work decomposition: a *segment* is up to `cols` columns of one row; a *group* of G lanes
// (G a power of two <= 32, inside one warp) owns one segment at a time, each lane handling
// VEC consecutive elements per step (16-byte loads where x, target and grad are contiguous
// and aligned). Blocks grid-stride over segments with int64 indices. Per-row sums (reduce)
// are a fixed shuffle tree inside the group, then, for rows split into several segments, a
// second kernel adds the segment partials in order: deterministic, no float atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/binary_elem.h"
#include "cuda/binary_launch.h"

namespace fusedloss {
namespace cuda {
namespace {

using binary::BinaryParams;
using binary::binary_elem;

constexpr int kThreads = 256;
constexpr int kStepsPerSegment = 16;  // a segment is G * VEC * 16 columns at most

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

__device__ __forceinline__ void store_acc(__half& d, float v) { d = __float2half_rn(v); }
__device__ __forceinline__ void store_acc(__nv_bfloat16& d, float v) { d = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_acc(float& d, float v) { d = v; }
__device__ __forceinline__ void store_acc(double& d, double v) { d = v; }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Kernel view of BinaryArgs, typed, after the host's normalization.
template <typename scalar_t>
struct Problem {
  using acc_t = typename AccOf<scalar_t>::type;
  // pointers
  const scalar_t* x;
  const scalar_t* y;
  const acc_t* w;
  const acc_t* pw;
  scalar_t* g;
  acc_t* out;
  acc_t* partial;  // (M, chunks) per-segment sums when reduce and chunks > 1
  // strides
  int64_t xs0, xs1, ys0, ys1, ws0, ws1, pws0, pws1, gs0, gs1;
  // sizes
  int64_t M, L, cols, chunks;
  int group;  // G
  bool reduce;
  BinaryParams<acc_t> p;
};

template <typename acc_t>
__device__ __forceinline__ acc_t load_operand(const acc_t* ptr, int64_t offset) {
  return ptr == nullptr ? acc_t(1) : __ldg(ptr + offset);
}

// VEC > 1: x, target, grad have unit column stride, rows and base pointers aligned to VEC
// elements, and L % VEC == 0 (checked on the host). VEC == 1: any strides.
template <typename scalar_t, int kGamma, bool kGrad, int VEC>
__global__ void __launch_bounds__(kThreads) binary_fwd_kernel(const Problem<scalar_t> P) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int G = P.group;
  const int gl = threadIdx.x & (G - 1);
  const int64_t groups_per_block = kThreads / G;
  const int64_t nseg = P.M * P.chunks;
  // `base` is uniform across the block, so every lane runs the same number of iterations and
  // reaches the shuffles below together.
  for (int64_t base = int64_t(blockIdx.x) * groups_per_block; base < nseg; base += int64_t(gridDim.x) * groups_per_block) {
    const int64_t seg = base + threadIdx.x / G;
    acc_t sum = 0;
    int64_t i = 0, c = 0;
    if (seg < nseg) {
      i = seg / P.chunks;
      c = seg - i * P.chunks;
      const int64_t j1 = min(P.L, (c + 1) * P.cols);
      for (int64_t j = c * P.cols + int64_t(gl) * VEC; j < j1; j += int64_t(G) * VEC) {
        acc_t xv[VEC], yv[VEC], gv[VEC], lv[VEC];
        if (VEC > 1) {
          const Pack<scalar_t, VEC> xp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(P.x + i * P.xs0 + j);
          const Pack<scalar_t, VEC> yp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(P.y + i * P.ys0 + j);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            xv[k] = to_acc(xp.v[k]);
            yv[k] = to_acc(yp.v[k]);
          }
        } else {
          xv[0] = to_acc(P.x[i * P.xs0 + j * P.xs1]);
          yv[0] = to_acc(P.y[i * P.ys0 + j * P.ys1]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t w = load_operand(P.w, i * P.ws0 + (j + k) * P.ws1);
          const acc_t pw = load_operand(P.pw, i * P.pws0 + (j + k) * P.pws1);
          lv[k] = binary_elem<kGamma, kGrad>(xv[k], yv[k], w, pw, P.p, &gv[k]);
          sum += lv[k];
        }
        if (kGrad) {
          if (VEC > 1) {
            Pack<scalar_t, VEC> gp;
#pragma unroll
            for (int k = 0; k < VEC; ++k) store_acc(gp.v[k], gv[k]);
            *reinterpret_cast<Pack<scalar_t, VEC>*>(P.g + i * P.gs0 + j) = gp;
          } else {
            store_acc(P.g[i * P.gs0 + j * P.gs1], gv[0]);
          }
        }
        if (!P.reduce) {
          if (VEC > 1) {
            // acc_t may be wider than scalar_t: stores of at most 16 bytes.
            constexpr int kOut = VEC * sizeof(acc_t) <= 16 ? VEC : int(16 / sizeof(acc_t));
#pragma unroll
            for (int k0 = 0; k0 < VEC; k0 += kOut) {
              Pack<acc_t, kOut> lp;
#pragma unroll
              for (int k = 0; k < kOut; ++k) lp.v[k] = lv[k0 + k];
              *reinterpret_cast<Pack<acc_t, kOut>*>(P.out + i * P.L + j + k0) = lp;
            }
          } else {
            P.out[i * P.L + j] = lv[0];
          }
        }
      }
    }
    if (P.reduce) {
      for (int off = G / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (seg < nseg && gl == 0) {
        if (P.chunks == 1) {
          P.out[i] = sum;
        } else {
          P.partial[seg] = sum;
        }
      }
    }
  }
}

// out[i] = sum over c of partial[i, c], one warp per row, lanes in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) binary_rows_sum_kernel(const acc_t* __restrict__ partial,
                                                                   acc_t* __restrict__ out, int64_t M, int64_t chunks) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t i = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; i < M; i += warps) {
    acc_t s = 0;
    for (int64_t c = lane; c < chunks; c += 32) s += partial[i * chunks + c];
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) out[i] = s;
  }
}

// ----------------------------------------------------------------------------- host side
struct Plan {
  BinaryArgs a;  // normalized
  int vec;       // 1 or 16 / sizeof(dtype)
  int group;     // G
  int64_t cols, chunks;
};

int64_t dtype_size(BinaryDtype d) {
  switch (d) {
    case BinaryDtype::kHalf:
    case BinaryDtype::kBFloat16:
      return 2;
    case BinaryDtype::kFloat:
      return 4;
    default:
      return 8;
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

Plan make_plan(const BinaryArgs& args) {
  Plan plan{args, 1, 32, 0, 0};
  BinaryArgs& a = plan.a;
  // A row of one element: its sum is the element, so reduce is the elementwise case.
  if (a.reduce && a.L == 1) a.reduce = false;
  // Elementwise output and all operands row-major (s0 == L * s1, 0 strides included):
  // treat the whole problem as one long row, so short rows do not waste lanes.
  auto flat = [&](int64_t s0, int64_t s1, bool present) { return !present || s0 == a.L * s1; };
  if (!a.reduce && a.M > 1 && flat(a.input_s0, a.input_s1, true) && flat(a.target_s0, a.target_s1, true) &&
      flat(a.weight_s0, a.weight_s1, a.weight) && flat(a.pos_weight_s0, a.pos_weight_s1, a.pos_weight) &&
      flat(a.grad_s0, a.grad_s1, a.grad)) {
    a.L *= a.M;
    a.M = 1;
  }
  const int64_t es = dtype_size(a.dtype);
  const int vec = int(16 / es);
  auto vec_ok = [&](const void* p, int64_t s0, int64_t s1) {
    return p == nullptr || (s1 == 1 && (a.M == 1 || s0 % vec == 0) && aligned(p, 16));
  };
  if (a.L % vec == 0 && vec_ok(a.input, a.input_s0, a.input_s1) && vec_ok(a.target, a.target_s0, a.target_s1) &&
      vec_ok(a.grad, a.grad_s0, a.grad_s1) && aligned(a.out, 16)) {
    plan.vec = vec;
  }
  // Group size: enough lanes for one pass over a short row, at most a warp.
  const int64_t steps = (a.L + plan.vec - 1) / plan.vec;
  int g = 1;
  while (g < 32 && g < steps) g *= 2;
  plan.group = g;
  plan.cols = int64_t(g) * plan.vec * kStepsPerSegment;
  plan.chunks = a.L == 0 ? 1 : (a.L + plan.cols - 1) / plan.cols;
  return plan;
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const Plan& plan) {
  using acc_t = typename AccOf<scalar_t>::type;
  const BinaryArgs& a = plan.a;
  Problem<scalar_t> P;
  P.x = static_cast<const scalar_t*>(a.input);
  P.y = static_cast<const scalar_t*>(a.target);
  P.w = static_cast<const acc_t*>(a.weight);
  P.pw = static_cast<const acc_t*>(a.pos_weight);
  P.g = static_cast<scalar_t*>(a.grad);
  P.out = static_cast<acc_t*>(a.out);
  P.partial = static_cast<acc_t*>(a.workspace);
  P.xs0 = a.input_s0, P.xs1 = a.input_s1, P.ys0 = a.target_s0, P.ys1 = a.target_s1;
  P.ws0 = a.weight_s0, P.ws1 = a.weight_s1, P.pws0 = a.pos_weight_s0, P.pws1 = a.pos_weight_s1;
  P.gs0 = a.grad_s0, P.gs1 = a.grad_s1;
  P.M = a.M, P.L = a.L, P.cols = plan.cols, P.chunks = plan.chunks;
  P.group = plan.group;
  P.reduce = a.reduce;
  P.p.gamma = acc_t(a.gamma);
  binary::binary_alpha_coefficients(a.alpha, P.p.alpha0, P.p.alpha_slope);
  return P;
}

int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    return 132;
  }
  return sms;
}

template <typename scalar_t, int kGamma, bool kGrad>
void launch_typed(const Problem<scalar_t>& P, int vec, int blocks, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (vec > 1) {
    binary_fwd_kernel<scalar_t, kGamma, kGrad, kVec><<<blocks, kThreads, 0, stream>>>(P);
  } else {
    binary_fwd_kernel<scalar_t, kGamma, kGrad, 1><<<blocks, kThreads, 0, stream>>>(P);
  }
}

template <typename scalar_t>
cudaError_t launch(const Plan& plan, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Problem<scalar_t> P = make_problem<scalar_t>(plan);
  const int64_t nseg = P.M * P.chunks;
  const int64_t groups_per_block = kThreads / P.group;
  const int64_t blocks = std::min<int64_t>((nseg + groups_per_block - 1) / groups_per_block, int64_t(num_sms()) * 16);
  const bool g = P.g != nullptr;
  switch (binary::gamma_kind(plan.a.gamma)) {
    case binary::kGamma0:
      g ? launch_typed<scalar_t, binary::kGamma0, true>(P, plan.vec, int(blocks), stream)
        : launch_typed<scalar_t, binary::kGamma0, false>(P, plan.vec, int(blocks), stream);
      break;
    case binary::kGamma2:
      g ? launch_typed<scalar_t, binary::kGamma2, true>(P, plan.vec, int(blocks), stream)
        : launch_typed<scalar_t, binary::kGamma2, false>(P, plan.vec, int(blocks), stream);
      break;
    default:
      g ? launch_typed<scalar_t, binary::kGammaPow, true>(P, plan.vec, int(blocks), stream)
        : launch_typed<scalar_t, binary::kGammaPow, false>(P, plan.vec, int(blocks), stream);
      break;
  }
  if (P.reduce && P.chunks > 1) {
    const int64_t rows_blocks = std::min<int64_t>((P.M + kThreads / 32 - 1) / (kThreads / 32), int64_t(num_sms()) * 16);
    binary_rows_sum_kernel<acc_t><<<int(rows_blocks), kThreads, 0, stream>>>(P.partial, P.out, P.M, P.chunks);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t binary_fwd_workspace(const BinaryArgs& args) {
  const Plan plan = make_plan(args);
  return plan.a.reduce && plan.chunks > 1 ? plan.a.M * plan.chunks : 0;
}

cudaError_t binary_fwd_launch(const BinaryArgs& args, cudaStream_t stream) {
  const Plan plan = make_plan(args);
  if (plan.a.M == 0) return cudaSuccess;
  if (plan.a.L == 0) {  // reduce over empty rows: sums are 0
    return plan.a.reduce ? cudaMemsetAsync(plan.a.out, 0, plan.a.M * (plan.a.dtype == BinaryDtype::kDouble ? 8 : 4), stream)
                         : cudaSuccess;
  }
  switch (plan.a.dtype) {
    case BinaryDtype::kHalf:
      return launch<__half>(plan, stream);
    case BinaryDtype::kBFloat16:
      return launch<__nv_bfloat16>(plan, stream);
    case BinaryDtype::kFloat:
      return launch<float>(plan, stream);
    default:
      return launch<double>(plan, stream);
  }
}

}  // namespace cuda
}  // namespace fusedloss
