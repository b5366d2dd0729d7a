// CUDA kernels of fusedloss::binary_fwd, binary_bwd and scale_grad: BCE-with-logits and
// torchvision's sigmoid focal loss, elementwise over an (M, L) view. Per-element math:
// csrc/common/binary_elem.h (the same code the CPU kernel runs). No torch headers here;
// csrc/cuda/binary_binding.cpp binds it to the ops.
//
// The training step with grad_output == 1 (the usual case) is 1 read of the input (+ target)
// and 1 write of the gradient: binary_fwd with reduction mean / sum writes the gradient of the
// reduced loss in the same pass, and the backward calls scale_grad, which every block leaves at
// once when grad_output (read on the device) is 1. binary_bwd recomputes (reduction none, or a
// second backward).
//
// Work decomposition: a *segment* is up to `cols` columns of one row; a *group* of G lanes
// (G a power of two <= 32, inside one warp) owns one segment at a time, each lane handling
// VEC consecutive elements per step (16-byte loads where x, target and grad are contiguous
// and aligned; a bool / uint8 target VEC bytes at a time, aligned to VEC bytes). Blocks
// grid-stride over segments with int64 indices. When every operand is row-major the (M, L)
// view is one long row. One kernel, three modes (a template parameter):
//   kLoss  reduction none: out[i, j] = loss, in out_dtype
//   kSum   mean / sum: each thread adds its elements (in float per VEC step, then in double),
//          each block writes one partial (block_sum2), finish_sum_kernel (kernel_common.cuh,
//          one block, fixed order) writes the reduced loss: deterministic, no float atomics.
//          With grad: grad = dloss/dx * (1 / numel for mean, 1 for sum).
//   kBwd   grad = dloss/dx * scale: grad_out[i, j] (none), grad_out (sum), grad_out / numel
//          (mean), grad_out read on the device.
// grad may alias the input: each lane reads its elements before writing them.
//
// Targets (a template parameter target_t): the input's dtype, or uint8_t for bool and uint8
// label maps (bool is one byte, 0 / 1), read as they are and converted to acc on load, so a
// label map needs no input-sized float copy. Other integer targets are converted by the Python
// layer (fusedloss/functional.py), which keeps the instantiations at two per input dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/binary_elem.h"
#include "cuda/binary_launch.h"
#include "cuda/kernel_common.cuh"

namespace fusedloss {
namespace cuda {
namespace {

using binary::BinaryParams;
using binary::binary_elem;

constexpr int kThreads = 256;
constexpr int kStepsPerSegment = 16;  // a segment is G * VEC * 16 columns at most

enum Mode : int { kLoss = 0, kSum = 1, kBwd = 2 };

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// A target element as acc: a float of the input's dtype (to_acc), or a bool / uint8 label
// (0 / 1: exact; other uint8 values as their number, as target.to(dtype) would read them).
template <typename acc_t, typename target_t>
__device__ __forceinline__ acc_t target_to_acc(target_t v) {
  return static_cast<acc_t>(to_acc(v));
}
template <typename acc_t>
__device__ __forceinline__ acc_t target_to_acc(uint8_t v) {
  return static_cast<acc_t>(v);
}

// Kernel view of BinaryArgs, typed, after the host's normalization (make_plan).
template <typename scalar_t, typename target_t>
struct Problem {
  using acc_t = typename AccOf<scalar_t>::type;
  // pointers
  const scalar_t* x;
  const target_t* y;
  const acc_t* w;
  const acc_t* pw;
  scalar_t* g;        // kSum: the gradient or nullptr; kBwd: the gradient
  void* out;          // kLoss: (M, L) out_dtype contiguous
  double2* partial;   // kSum: (gridDim.x,) per-block (loss sum, 0)
  const void* go;     // kBwd: grad_out
  // strides
  int64_t xs0, xs1, ys0, ys1, ws0, ws1, pws0, pws1, gs0, gs1, gos0, gos1;
  // sizes
  int64_t M, L, cols, chunks;
  int group;  // G
  // meta-parameters
  DType out_dtype, go_dtype;
  bool out_packed;      // kLoss: out_dtype == dtype, stored as VEC-wide packs
  bool go_elementwise;  // kBwd: grad_out per element (reduction none)
  acc_t grad_factor;    // multiplies dloss/dx: 1 / numel for mean, else 1
  BinaryParams<acc_t> p;
};

template <typename acc_t>
__device__ __forceinline__ acc_t load_operand(const acc_t* ptr, int64_t offset) {
  return ptr == nullptr ? acc_t(1) : __ldg(ptr + offset);
}

// VEC > 1: x, target and grad have unit column stride, rows and base pointers aligned to VEC
// elements (VEC * sizeof(T) bytes: 16 for x and grad, VEC for a uint8_t target), and
// L % VEC == 0 (checked on the host). VEC == 1: any strides.
template <typename scalar_t, typename target_t, int kGamma, int kMode, int VEC>
__global__ void __launch_bounds__(kThreads) binary_kernel(const Problem<scalar_t, target_t> P) {
  using acc_t = typename Problem<scalar_t, target_t>::acc_t;
  constexpr bool kGrad = kMode != kLoss;
  __shared__ double2 block_partial[kThreads / 32];
  const int G = P.group;
  const int gl = threadIdx.x & (G - 1);
  const int64_t groups_per_block = kThreads / G;
  const int64_t nseg = P.M * P.chunks;
  // kBwd with one grad_out for every element: read once per thread, on the device
  const acc_t go_all = kMode == kBwd && !P.go_elementwise ? load_as<acc_t>(P.go, 0, P.go_dtype) : acc_t(1);
  double sum = 0.0;  // kSum: this thread's elements

  // Segment seg = i * chunks + c, walked with (i, c) kept up to date by additions: one 64-bit
  // division here instead of one per segment (its slow-path call would put the loop's live
  // values on the stack).
  const int64_t first = int64_t(blockIdx.x) * groups_per_block + threadIdx.x / G;
  const int64_t step = int64_t(gridDim.x) * groups_per_block;
  const int64_t step_i = step / P.chunks, step_c = step % P.chunks;
  int64_t i = first / P.chunks, c = first % P.chunks;
  for (int64_t seg = first; seg < nseg; seg += step) {
    const int64_t j1 = min(P.L, (c + 1) * P.cols);
    for (int64_t j = c * P.cols + int64_t(gl) * VEC; j < j1; j += int64_t(G) * VEC) {
      // Elements stay packed in their storage type and are converted one at a time, so only
      // a few values are live across each element's math (and its slow-path calls).
      Pack<scalar_t, VEC> xp, gp, lp;
      Pack<target_t, VEC> yp;
      if (VEC > 1) {
        xp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(P.x + i * P.xs0 + j);
        yp = *reinterpret_cast<const Pack<target_t, VEC>*>(P.y + i * P.ys0 + j);
      } else {
        xp.v[0] = P.x[i * P.xs0 + j * P.xs1];
        yp.v[0] = P.y[i * P.ys0 + j * P.ys1];
      }
      acc_t step = acc_t(0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t w = load_operand(P.w, i * P.ws0 + (j + k) * P.ws1);
        const acc_t pw = load_operand(P.pw, i * P.pws0 + (j + k) * P.pws1);
        acc_t gk = acc_t(0);
        const acc_t yk = target_to_acc<acc_t>(yp.v[k]);
        const acc_t lk = binary_elem<kGamma, kGrad>(to_acc(xp.v[k]), yk, w, pw, P.p, &gk);
        step += lk;
        if (kGrad) {
          // (dloss/dx * grad_factor) * grad_out, in this order: binary_bwd then equals
          // binary_fwd's gradient scaled by scale_grad (float32: bit for bit)
          gk *= P.grad_factor;
          if (kMode == kBwd) {
            gk *= P.go_elementwise ? load_as<acc_t>(P.go, i * P.gos0 + (j + k) * P.gos1, P.go_dtype) : go_all;
          }
          gp.v[k] = from_acc<scalar_t>(gk);
        }
        if (kMode == kLoss) {
          if (VEC > 1 && P.out_packed) {
            lp.v[k] = from_acc<scalar_t>(lk);
          } else {
            store_as(P.out, i * P.L + j + k, P.out_dtype, lk);
          }
        }
      }
      if (kMode == kSum) sum += static_cast<double>(step);
      if (kGrad && (kMode == kBwd || P.g != nullptr)) {
        if (VEC > 1) {
          *reinterpret_cast<Pack<scalar_t, VEC>*>(P.g + i * P.gs0 + j) = gp;
        } else {
          P.g[i * P.gs0 + j * P.gs1] = gp.v[0];
        }
      }
      if (kMode == kLoss && VEC > 1 && P.out_packed) {
        *reinterpret_cast<Pack<scalar_t, VEC>*>(static_cast<scalar_t*>(P.out) + i * P.L + j) = lp;
      }
    }
    i += step_i;
    c += step_c;
    if (c >= P.chunks) {
      c -= P.chunks;
      ++i;
    }
  }

  if (kMode == kSum) {  // every thread gets here (no early exit above)
    const double2 total = block_sum2<kThreads>(make_double2(sum, 0.0), block_partial);
    if (threadIdx.x == 0) P.partial[blockIdx.x] = total;
  }
}

// grad *= grad_out. VEC > 1: grad is one contiguous, 16-byte aligned run of L elements (M == 1).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(const ScaleGradArgs a) {
  using acc_t = typename AccOf<scalar_t>::type;
  const double go = load_as<double>(a.grad_out, 0, a.grad_out_dtype);
  if (go == 1.0) return;  // the training step's usual case: nothing read or written
  const acc_t s = static_cast<acc_t>(go);
  scalar_t* g = static_cast<scalar_t*>(a.grad);
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  if (VEC > 1) {
    const int64_t packs = a.L / VEC;
    Pack<scalar_t, VEC>* gp = reinterpret_cast<Pack<scalar_t, VEC>*>(g);
    for (int64_t q = first; q < packs; q += stride) {
      Pack<scalar_t, VEC> v = gp[q];
#pragma unroll
      for (int k = 0; k < VEC; ++k) v.v[k] = from_acc<scalar_t>(to_acc(v.v[k]) * s);
      gp[q] = v;
    }
    for (int64_t e = packs * VEC + first; e < a.L; e += stride) g[e] = from_acc<scalar_t>(to_acc(g[e]) * s);
  } else {
    const int64_t n = a.M * a.L;
    for (int64_t e = first; e < n; e += stride) {
      const int64_t i = e / a.L, j = e - i * a.L;
      scalar_t& v = g[i * a.s0 + j * a.s1];
      v = from_acc<scalar_t>(to_acc(v) * s);
    }
  }
}

// ----------------------------------------------------------------------------- host side
struct Plan {
  BinaryArgs a;  // normalized
  int vec;       // 1 or 16 / sizeof(dtype) (for every operand, a 1-byte target included)
  int group;     // G
  int64_t cols, chunks;
};

int64_t dtype_size(DType d) {
  switch (d) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    default:
      return 8;
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

Plan make_plan(const BinaryArgs& args, Mode mode) {
  Plan plan{args, 1, 32, 0, 0};
  BinaryArgs& a = plan.a;
  const bool has_grad = mode != kLoss && a.grad != nullptr;
  const bool go_elementwise = mode == kBwd && a.reduction == kReduceNone;
  // Every operand row-major (s0 == L * s1, 0 strides included; out, when written, is
  // contiguous): treat the whole problem as one long row, so short rows do not waste lanes.
  auto flat = [&](int64_t s0, int64_t s1, bool present) { return !present || s0 == a.L * s1; };
  if (a.M > 1 && flat(a.input_s0, a.input_s1, true) && flat(a.target_s0, a.target_s1, true) &&
      flat(a.weight_s0, a.weight_s1, a.weight) && flat(a.pos_weight_s0, a.pos_weight_s1, a.pos_weight) &&
      flat(a.grad_s0, a.grad_s1, has_grad) && flat(a.grad_out_s0, a.grad_out_s1, go_elementwise)) {
    a.L *= a.M;
    a.M = 1;
  }
  const int vec = int(16 / dtype_size(a.dtype));
  // A VEC-wide pack of elements of `size` bytes: unit column stride, every row start a
  // multiple of VEC elements from an aligned base (16 bytes for x and grad, VEC for a 1-byte
  // target).
  auto vec_ok = [&](const void* p, int64_t s0, int64_t s1, int64_t size) {
    return p == nullptr || (s1 == 1 && (a.M == 1 || s0 % vec == 0) && aligned(p, vec * size));
  };
  const int64_t dsize = dtype_size(a.dtype);
  const int64_t tsize = a.target_u8 ? 1 : dsize;
  bool use_vec = a.L % vec == 0 && vec_ok(a.input, a.input_s0, a.input_s1, dsize) &&
                 vec_ok(a.target, a.target_s0, a.target_s1, tsize) &&
                 (!has_grad || vec_ok(a.grad, a.grad_s0, a.grad_s1, dsize));
  if (mode == kLoss && a.out_dtype == a.dtype) use_vec = use_vec && aligned(a.out, 16);
  if (use_vec) plan.vec = vec;
  // Group size: enough lanes for one pass over a short row, at most a warp.
  const int64_t steps = (a.L + plan.vec - 1) / plan.vec;
  int g = 1;
  while (g < 32 && g < steps) g *= 2;
  plan.group = g;
  plan.cols = int64_t(g) * plan.vec * kStepsPerSegment;
  plan.chunks = a.L == 0 ? 1 : (a.L + plan.cols - 1) / plan.cols;
  return plan;
}

// Blocks for a plan: enough for every segment, at most 16 per SM (grid-stride beyond).
int64_t grid_of(const Plan& plan) {
  if (plan.a.M * plan.a.L == 0) return 0;
  const int64_t nseg = plan.a.M * plan.chunks;
  const int64_t groups_per_block = kThreads / plan.group;
  return std::min<int64_t>((nseg + groups_per_block - 1) / groups_per_block, int64_t(num_sms()) * 16);
}

template <typename scalar_t, typename target_t>
Problem<scalar_t, target_t> make_problem(const Plan& plan, Mode mode) {
  using acc_t = typename AccOf<scalar_t>::type;
  const BinaryArgs& a = plan.a;
  Problem<scalar_t, target_t> P;
  P.x = static_cast<const scalar_t*>(a.input);
  P.y = static_cast<const target_t*>(a.target);
  P.w = static_cast<const acc_t*>(a.weight);
  P.pw = static_cast<const acc_t*>(a.pos_weight);
  P.g = mode == kLoss ? nullptr : static_cast<scalar_t*>(a.grad);
  P.out = a.out;
  P.partial = static_cast<double2*>(a.workspace);
  P.go = a.grad_out;
  P.xs0 = a.input_s0, P.xs1 = a.input_s1, P.ys0 = a.target_s0, P.ys1 = a.target_s1;
  P.ws0 = a.weight_s0, P.ws1 = a.weight_s1, P.pws0 = a.pos_weight_s0, P.pws1 = a.pos_weight_s1;
  P.gs0 = a.grad_s0, P.gs1 = a.grad_s1, P.gos0 = a.grad_out_s0, P.gos1 = a.grad_out_s1;
  P.M = a.M, P.L = a.L, P.cols = plan.cols, P.chunks = plan.chunks;
  P.group = plan.group;
  P.out_dtype = a.out_dtype, P.go_dtype = a.grad_out_dtype;
  P.out_packed = a.out_dtype == a.dtype;
  P.go_elementwise = mode == kBwd && a.reduction == kReduceNone;
  // "mean" is sum / numel (PyTorch and torchvision); flattening keeps M * L
  const double numel = double(a.M) * double(a.L);
  P.grad_factor = a.reduction == kReduceMean ? acc_t(1.0 / numel) : acc_t(1);
  P.p.gamma = acc_t(a.gamma);
  binary::binary_alpha_coefficients(a.alpha, P.p.alpha0, P.p.alpha_slope);
  return P;
}

template <typename scalar_t, typename target_t, int kGamma, int kMode>
void launch_vec(const Problem<scalar_t, target_t>& P, int vec, int64_t blocks, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (vec > 1) {
    binary_kernel<scalar_t, target_t, kGamma, kMode, kVec><<<unsigned(blocks), kThreads, 0, stream>>>(P);
  } else {
    binary_kernel<scalar_t, target_t, kGamma, kMode, 1><<<unsigned(blocks), kThreads, 0, stream>>>(P);
  }
}

template <typename scalar_t, typename target_t, int kMode>
void launch_gamma(const Plan& plan, int64_t blocks, cudaStream_t stream) {
  const Problem<scalar_t, target_t> P = make_problem<scalar_t, target_t>(plan, Mode(kMode));
  switch (binary::gamma_kind(plan.a.gamma)) {
    case binary::kGamma0: return launch_vec<scalar_t, target_t, binary::kGamma0, kMode>(P, plan.vec, blocks, stream);
    case binary::kGamma2: return launch_vec<scalar_t, target_t, binary::kGamma2, kMode>(P, plan.vec, blocks, stream);
    default: return launch_vec<scalar_t, target_t, binary::kGammaPow, kMode>(P, plan.vec, blocks, stream);
  }
}

// The target is the input's dtype, or (target_u8) bool / uint8.
template <typename scalar_t, int kMode>
void launch_target(const Plan& plan, int64_t blocks, cudaStream_t stream) {
  if (plan.a.target_u8) return launch_gamma<scalar_t, uint8_t, kMode>(plan, blocks, stream);
  return launch_gamma<scalar_t, scalar_t, kMode>(plan, blocks, stream);
}

template <int kMode>
void launch_mode(const Plan& plan, int64_t blocks, cudaStream_t stream) {
  switch (plan.a.dtype) {
    case DType::kFloat16: return launch_target<__half, kMode>(plan, blocks, stream);
    case DType::kBFloat16: return launch_target<__nv_bfloat16, kMode>(plan, blocks, stream);
    case DType::kFloat32: return launch_target<float, kMode>(plan, blocks, stream);
    default: return launch_target<double, kMode>(plan, blocks, stream);
  }
}

template <typename scalar_t>
void launch_scale(const ScaleGradArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool use_vec = a.M == 1 && a.s1 == 1 && aligned(a.grad, 16);
  const int64_t work = use_vec ? (a.L + kVec - 1) / kVec : a.M * a.L;
  const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(num_sms()) * 8);
  if (use_vec) {
    scale_grad_kernel<scalar_t, kVec><<<unsigned(blocks), kThreads, 0, stream>>>(a);
  } else {
    scale_grad_kernel<scalar_t, 1><<<unsigned(blocks), kThreads, 0, stream>>>(a);
  }
}

}  // namespace

int64_t plan_binary_fwd(BinaryArgs& args) {
  if (args.reduction == kReduceNone) {
    args.blocks = 0;
    return 0;
  }
  args.blocks = grid_of(make_plan(args, kSum));
  return args.blocks * int64_t(sizeof(double2));
}

cudaError_t binary_fwd_launch(const BinaryArgs& args, cudaStream_t stream) {
  if (args.reduction == kReduceNone) {
    const Plan plan = make_plan(args, kLoss);
    const int64_t blocks = grid_of(plan);
    if (blocks > 0) launch_mode<kLoss>(plan, blocks, stream);
    return cudaGetLastError();
  }
  // args.blocks partials, as plan_binary_fwd sized the workspace
  if (args.blocks > 0) {
    launch_mode<kSum>(make_plan(args, kSum), args.blocks, stream);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  FinishArgs f{};
  f.partial = static_cast<const double2*>(args.workspace);
  f.n = args.blocks;
  f.out = args.out;
  f.denom = nullptr;
  f.out_dtype = args.out_dtype;
  f.denom_dtype = DType::kFloat64;  // unused (no denominator)
  f.reduction = args.reduction;
  f.numel = double(args.M) * double(args.L);  // "mean" of an empty input: 0 / 0 = NaN, as PyTorch
  return launch_finish_sum(f, stream);
}

cudaError_t binary_bwd_launch(const BinaryArgs& args, cudaStream_t stream) {
  const Plan plan = make_plan(args, kBwd);
  const int64_t blocks = grid_of(plan);
  if (blocks > 0) launch_mode<kBwd>(plan, blocks, stream);
  return cudaGetLastError();
}

cudaError_t scale_grad_launch(const ScaleGradArgs& args, cudaStream_t stream) {
  if (args.M * args.L == 0) return cudaSuccess;
  switch (args.dtype) {
    case DType::kFloat16: launch_scale<__half>(args, stream); break;
    case DType::kBFloat16: launch_scale<__nv_bfloat16>(args, stream); break;
    case DType::kFloat32: launch_scale<float>(args, stream); break;
    default: launch_scale<double>(args, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fusedloss
