// CUDA kernels of ce_fwd, focal_fwd and softmax_bwd (schemas and the meaning of stats:
// csrc/ops.cpp). The per-row arithmetic (online max / sum-exp, row kinds, finalize, stats,
// element gradients) is csrc/common/softmax_row.h, shared with the CPU kernels; this file adds
// the memory traffic and the thread layout. Only CUDA headers and csrc/ headers are included
// (the binding, csrc/cuda/softmax_binding.cpp, holds the torch side).
//
// The training step: the forward reads the logits once and writes per row the loss (or its
// share of the reduced loss), the count and stats = [lse, coef_p, smooth, target_coef]; the
// backward reads the logits once more with the stats, grad_out and the "mean" denominator
// (all from device memory, no host sync) and writes the gradient once.
//
// Layout (both directions): a row (one (n, d) of the (N, C, D) logits) is handled by kTPR
// threads; a block holds kRows rows (blockDim = (kTPR, kRows)) and blocks grid-stride over the
// rows. Each thread walks its classes c = tid, tid + kTPR, ..., kUnroll loads in flight.
//   K-dim input with contiguous positions (NCHW: x_d == 1, classes D apart): kTPR = 1, a
//   block of 128 consecutive rows, i.e. 128 consecutive positions, one per thread, each
//   thread looping over its row's classes (kUnroll loads in flight) with the per-row online max /
//   sum-exp of softmax_row.h. A warp's load of class c reads 32 consecutive positions: one
//   coalesced access, where a warp per row would read 32 classes D elements apart. Chosen
//   for any C when the rows are many enough to fill the GPU with one thread each (pick_layout),
//   as the CPU lane path puts positions in the vector lanes.
//   Otherwise (contiguous classes: (N, C) rows, channels_last): 32 threads (one warp, 4 rows
//   per block) up to 1k classes, 256 or 512 beyond.
//   ce_fwd / focal_fwd  softmax_fwd_kernel: pass 1 per thread (online max / sum-exp and the
//                       side sums, relative to the running max), a fixed butterfly-shuffle and
//                       shared-memory merge of the row (deterministic, no atomics), finalize
//                       by the row's first thread: stats, the loss in out_dtype ("none"), and
//                       (loss, count) added to its row slot's double partial; each block adds
//                       its slots in a fixed order into one partial, and finish_sum_kernel
//                       (kernel_common.cuh, one block, fixed order) writes the reduced loss and
//                       the denominator (every reduction). Two launches.
//   softmax_bwd         softmax_bwd_kernel: per row the stats (scaled once by grad_out / denom),
//                       then per element row::index_elem_grad / prob_elem_grad. Each thread
//                       reads x_c and writes grad_c itself, so grad may alias the logits; a row
//                       whose lse is -inf (ignored, empty, out of range) gets zeros and reads
//                       no logits. One launch.
// Offsets are int64. bf16/fp16 are read through cuda_bf16.h / cuda_fp16.h and accumulated in
// float. An out-of-range class target is never used as an index: loss NaN, count 0,
// gradient 0 (the backward only compares c with t).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/softmax_row.h"
#include "cuda/kernel_common.cuh"
#include "cuda/softmax_launch.h"

namespace fusedloss {
namespace cuda {
namespace {

// Classes per thread loaded before any is used. 8 with a thread per row (kTPR = 1) was
// tried: 72-123 registers instead of 56-97, and the smoothing forward spilled 24 B at sm_80.
constexpr int kUnroll = 4;

// Which sums pass 1 carries besides max / sum-exp; a template parameter, so the plain kernel
// (no smoothing, class-index target: the usual cross-entropy, and focal) carries none of the
// others' registers or shuffles.
enum class Sums : int {
  kPlain = 0,   // m, s
  kSmooth = 1,  // + n_allowed, w_allowed, wz_allowed (class-index target, label smoothing)
  kProb = 2,    // + wy, wyz (probability target), + the smoothing sums when eps > 0
};

// z of an allowed class: softcap(x), or x. The target's z_t goes through this very function
// (same operations, same bits as row::softcap_z in backward), so m >= z_t holds exactly: the
// loss (m - z_t) + log s of a confident row cannot turn negative.
template <typename T>
__device__ __forceinline__ T capped(T x, bool softcap, T cap, T inv_cap) {
  return softcap ? cap * row::Math<T>::tanh(x * inv_cap) : x;
}

// ----------------------------------------------------------------------------- pass-1 partial rows
// A thread's partial row is a row::RowStats whose side sums (wz_allowed, wyz) are taken
// relative to its running max m (RowStats::zref = m at the end: the finalize then uses
// lse - zref = log s exactly instead of cancelling lse * W_A against a raw sum of w z). When
// the max moves from m_old to m_new, the sums are rebased:
//   sum w (z - m_new) = sum w (z - m_old) - (m_new - m_old) * sum w
// The shift term has the sign of every term (z <= m), so the rebase cancels nothing. Merging
// two partial rows rebases both to the merged max the same way. A part with m = -inf has
// nothing allowed yet (its sums are 0, or wyz = -inf): nothing to rebase. NaN in m makes
// every sum NaN, which the loss then is anyway (rule 8).
template <Sums kSums, typename T>
__device__ __forceinline__ void rebase(row::RowStats<T>& st, T shift, bool smoothing) {
  if (smoothing) st.wz_allowed -= shift * st.w_allowed;
  if (kSums == Sums::kProb) st.wyz -= shift * st.wy;
}

template <Sums kSums, typename T>
__device__ __forceinline__ void rebase_to(row::RowStats<T>& st, T m, bool smoothing) {
  if (st.m != row::neg_inf<T>() && !(st.m == m)) rebase<kSums>(st, m - st.m, smoothing);
}

// Adds class c: z = -inf when masked; w = weight[c] (1 without weight), wy = w * y_c.
template <Sums kSums, typename T>
__device__ __forceinline__ void add_class(row::RowStats<T>& st, T z, bool allowed, T w, T wy, bool smoothing) {
  const T m_old = st.m;
  row::add_max_sum(st.m, st.s, z);
  if constexpr (kSums != Sums::kPlain) {
    if (m_old != row::neg_inf<T>() && !(st.m == m_old)) rebase<kSums>(st, st.m - m_old, smoothing);
    if (smoothing && allowed) {
      st.n_allowed += T(1);
      st.w_allowed += w;
      st.wz_allowed += w * (z - st.m);
    }
    if constexpr (kSums == Sums::kProb) {
      st.wy += wy;
      // 0 * log 0 = 0 (rule 7); a masked class with y > 0 adds -inf: loss +inf (rule 4)
      if (wy != T(0)) st.wyz += wy * (allowed ? z - st.m : z);
    }
  }
}

// Merges partial row b into a (both halves of a butterfly compute the same, bit for bit:
// every step is symmetric in a and b).
template <Sums kSums, typename T>
__device__ __forceinline__ void merge_stats(row::RowStats<T>& a, row::RowStats<T> b, bool smoothing) {
  if constexpr (kSums != Sums::kPlain) {
    const T m = row::nan_max(a.m, b.m);
    rebase_to<kSums>(a, m, smoothing);
    rebase_to<kSums>(b, m, smoothing);
    if (smoothing) {
      a.n_allowed += b.n_allowed;
      a.w_allowed += b.w_allowed;
      a.wz_allowed += b.wz_allowed;
    }
    if constexpr (kSums == Sums::kProb) {
      a.wy += b.wy;
      a.wyz += b.wyz;
    }
  }
  row::merge_max_sum(a.m, a.s, b.m, b.s);
}

// The partial row of lane (lane ^ lane_mask): only the fields kSums carries.
template <Sums kSums, typename T>
__device__ __forceinline__ row::RowStats<T> shfl_xor_stats(const row::RowStats<T>& a, int lane_mask, bool smoothing) {
  row::RowStats<T> b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, lane_mask);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, lane_mask);
  if constexpr (kSums != Sums::kPlain) {
    if (smoothing) {  // uniform across the warp
      b.n_allowed = __shfl_xor_sync(0xffffffffu, a.n_allowed, lane_mask);
      b.w_allowed = __shfl_xor_sync(0xffffffffu, a.w_allowed, lane_mask);
      b.wz_allowed = __shfl_xor_sync(0xffffffffu, a.wz_allowed, lane_mask);
    }
    if constexpr (kSums == Sums::kProb) {
      b.wy = __shfl_xor_sync(0xffffffffu, a.wy, lane_mask);
      b.wyz = __shfl_xor_sync(0xffffffffu, a.wyz, lane_mask);
    }
  }
  return b;
}

// A grid-stride walk over rows r = first, first + step, ... with (n, d) = (r / D, r % D)
// kept up to date by additions: the 64-bit division is done once, not once per row (its
// slow-path call would keep the loop's live values on the stack).
struct RowCursor {
  int64_t r, n, d;
  int64_t step, step_n, step_d, D;
  __device__ __forceinline__ RowCursor(int64_t first, int64_t step_, int64_t D_)
      : r(first), n(first / D_), d(first % D_), step(step_), step_n(step_ / D_), step_d(step_ % D_), D(D_) {}
  __device__ __forceinline__ void next() {
    r += step;
    n += step_n;
    d += step_d;
    if (d >= D) {
      d -= D;
      ++n;
    }
  }
};

// ----------------------------------------------------------------------------- forward
template <typename scalar_t, int kTPR, int kRows, Sums kSums>
__global__ void __launch_bounds__(kTPR * kRows, MinBlocks<typename AccOf<scalar_t>::type>::value)
softmax_fwd_kernel(const SoftmaxFwdParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int kWarps = kTPR / 32;  // warps per row (0: a thread per row)
  constexpr bool kProb = kSums == Sums::kProb;
  __shared__ row::RowStats<acc_t> warp_stats[kRows][kWarps > 1 ? kWarps : 1];
  // (sum of losses, sum of counts) of the rows each row slot handled, kept in shared memory
  // rather than registers: nothing stays live across the finalize's math calls
  __shared__ double2 row_partial[kRows];
  __shared__ double2 block_partial[kTPR * kRows / 32];

  const bool smoothing = kSums == Sums::kSmooth || (kProb && p.label_smoothing > 0.0);
  const bool softcap = p.softcap > 0.0;
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  const acc_t zl = static_cast<acc_t>(p.z_loss);
  const acc_t cap = static_cast<acc_t>(p.softcap);
  const acc_t inv_cap = softcap ? acc_t(1) / cap : acc_t(0);
  const acc_t ninf = row::neg_inf<acc_t>();
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const scalar_t* probs = static_cast<const scalar_t*>(p.prob);
  acc_t* stats = static_cast<acc_t*>(p.stats);
  const int tid = threadIdx.x;
  const int64_t R = p.N * p.D, C = p.C;
  if (tid == 0) row_partial[threadIdx.y] = make_double2(0.0, 0.0);
  RowCursor cur(int64_t(blockIdx.x) * kRows + threadIdx.y, int64_t(gridDim.x) * kRows, p.D);

  // The loop is uniform per block (r0), so every thread reaches the barriers below together;
  // a row past R only takes part in them.
  for (int64_t r0 = int64_t(blockIdx.x) * kRows; r0 < R; r0 += int64_t(gridDim.x) * kRows, cur.next()) {
    const int64_t r = r0 + threadIdx.y;
    const bool active = r < R;
    const int64_t n = active ? cur.n : 0, d = active ? cur.d : 0;
    const scalar_t* x = logits + n * p.x_n + d * p.x_d;
    const scalar_t* y = kProb ? probs + n * p.y_n + d * p.y_d : nullptr;
    const bool* mask = p.mask ? p.mask + n * p.m_n + d * p.m_d : nullptr;

    // --- classification and the target's z (class-index targets)
    row::RowKind kind = row::kCounted;
    acc_t z_t = ninf, w_t = acc_t(1);
    if (!kProb && active) {
      const int64_t t = p.target[n * p.t_n + d * p.t_d];
      kind = row::classify_target(t, p.ignore_index, C);
      if (kind == row::kCounted) {  // t in [0, C): safe to index with
        const acc_t x_t = to_acc(x[t * p.x_c]);
        if (x_t != ninf && (!mask || mask[t * p.m_c])) z_t = capped(x_t, softcap, cap, inv_cap);
        if (weight) w_t = weight[t];
      }
    }

    // --- pass 1: this thread's classes (ignored and out-of-range rows read none)
    row::RowStats<acc_t> st;
    if (active && kind == row::kCounted) {
      for (int64_t c0 = tid; c0 < C; c0 += int64_t(kTPR) * kUnroll) {
        acc_t xv[kUnroll], yv[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t c = c0 + int64_t(u) * kTPR;
          const bool in = c < C;
          xv[u] = in ? to_acc(x[c * p.x_c]) : ninf;
          ok[u] = in && (!mask || mask[c * p.m_c]);
          yv[u] = kProb && in ? to_acc(y[c * p.y_c]) : acc_t(0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t c = c0 + int64_t(u) * kTPR;
          const bool allowed = ok[u] && xv[u] != ninf;  // a masked NaN logit is masked, not NaN
          const acc_t z = allowed ? capped(xv[u], softcap, cap, inv_cap) : ninf;
          const acc_t w = kSums != Sums::kPlain && weight && c < C ? weight[c] : acc_t(1);
          add_class<kSums>(st, z, allowed, w, w * yv[u], smoothing);
        }
      }
    }

    // --- row reduction: butterfly inside the warp, then the row's warps in order
    if constexpr (kTPR >= 32) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) merge_stats<kSums>(st, shfl_xor_stats<kSums>(st, off, smoothing), smoothing);
      if constexpr (kWarps > 1) {
        if ((tid & 31) == 0) warp_stats[threadIdx.y][tid >> 5] = st;
        __syncthreads();
        if (tid == 0) {
          st = warp_stats[threadIdx.y][0];
          for (int w = 1; w < kWarps; ++w) merge_stats<kSums>(st, warp_stats[threadIdx.y][w], smoothing);
        }
        __syncthreads();  // warp_stats is reused by the next row
      }
    }
    if (!active || tid != 0) continue;

    // --- finalize (the row's first thread): stats, the loss, the count
    row::RowCoefs<acc_t> k;
    if (kind == row::kIgnored) {
      k = row::zero_row<acc_t>();
    } else if (kind == row::kOutOfRange) {
      k = row::out_of_range_row<acc_t>();
    } else {
      st.zref = row::is_empty_row(st.m) ? acc_t(0) : st.m;  // the side sums' reference (above)
      if (kProb) {
        k = row::ce_finalize_prob(st, eps, zl, smoothing);
      } else if (p.kind == SoftmaxLoss::kFocal) {
        k = row::focal_finalize(st, z_t, w_t, static_cast<acc_t>(p.gamma));
      } else {
        k = row::ce_finalize_index(st, z_t, w_t, eps, zl, kSums == Sums::kSmooth);
      }
    }
    row::write_stats(k, stats + r * row::kNumStats, kProb, acc_t(1) - eps);
    if (p.reduction == kReduceNone) store_as(p.out, r, p.out_dtype, k.loss);
    row_partial[threadIdx.y].x += static_cast<double>(k.loss);
    row_partial[threadIdx.y].y += static_cast<double>(k.count);
  }

  // --- this block's partial (finish_sum_kernel adds them): the row slots in a fixed order
  __syncthreads();
  const int lin = threadIdx.x + threadIdx.y * kTPR;
  const double2 mine = lin < kRows ? row_partial[lin] : make_double2(0.0, 0.0);
  const double2 total = block_sum2<kTPR * kRows>(mine, block_partial);
  if (threadIdx.x == 0 && threadIdx.y == 0) static_cast<double2*>(p.workspace)[blockIdx.x] = total;
}

// ----------------------------------------------------------------------------- backward
// grad_c = dloss/dx_c * scale, with the scale folded into the row's coefficients once
// (row::read_stats). No barriers: rows are independent, so the loop need not be uniform.
template <typename scalar_t, int kTPR, int kRows, bool kProb>
__global__ void __launch_bounds__(kTPR * kRows, MinBlocks<typename AccOf<scalar_t>::type>::value)
softmax_bwd_kernel(const SoftmaxBwdParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  const bool softcap = p.softcap > 0.0;
  const acc_t cap = static_cast<acc_t>(p.softcap);
  const acc_t inv_cap = softcap ? acc_t(1) / cap : acc_t(0);
  const acc_t one(1), ninf = row::neg_inf<acc_t>();
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const scalar_t* probs = static_cast<const scalar_t*>(p.prob);
  const acc_t* stats = static_cast<const acc_t*>(p.stats);
  scalar_t* grad = static_cast<scalar_t*>(p.grad);
  const int tid = threadIdx.x;
  const int64_t R = p.N * p.D, C = p.C;

  // "mean" / "sum": one scale for every row, read from device memory (no host sync)
  acc_t scale_all = acc_t(0);
  if (p.reduction != kReduceNone) {
    const acc_t go = load_as<acc_t>(p.grad_out, 0, p.grad_out_dtype);
    scale_all = p.reduction == kReduceMean ? row::mean_scale(go, *static_cast<const acc_t*>(p.denom)) : go;
  }

  RowCursor cur(int64_t(blockIdx.x) * kRows + threadIdx.y, int64_t(gridDim.x) * kRows, p.D);
  for (int64_t r = cur.r; r < R; cur.next(), r = cur.r) {
    const int64_t n = cur.n, d = cur.d;
    const acc_t* srow = stats + r * row::kNumStats;
    scalar_t* g = grad + n * p.g_n + d * p.g_d;
    if (!row::row_has_grad(srow[row::kStatLse])) {  // ignored / empty / out of range: exact zeros
      for (int64_t c = tid; c < C; c += kTPR) g[c * p.g_c] = from_acc<scalar_t>(acc_t(0));
      continue;
    }
    const acc_t scale =
        p.reduction == kReduceNone ? load_as<acc_t>(p.grad_out, n * p.go_n + d * p.go_d, p.grad_out_dtype) : scale_all;
    const row::BwdRow<acc_t> b = row::read_stats(srow, scale);
    const scalar_t* x = logits + n * p.x_n + d * p.x_d;
    const scalar_t* y = kProb ? probs + n * p.y_n + d * p.y_d : nullptr;
    const bool* mask = p.mask ? p.mask + n * p.m_n + d * p.m_d : nullptr;
    // The target is only compared with c, never used as an index.
    const int64_t t = kProb ? -1 : p.target[n * p.t_n + d * p.t_d];
    // Class weights enter through coef_y: smoothing (class-index targets) or w_c y_c.
    const bool need_w = weight && (kProb || srow[row::kStatSmooth] != acc_t(0));

    for (int64_t c0 = tid; c0 < C; c0 += int64_t(kTPR) * kUnroll) {
      acc_t xv[kUnroll], yv[kUnroll], wv[kUnroll];
      bool ok[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + int64_t(u) * kTPR;
        const bool in = c < C;
        xv[u] = in ? to_acc(x[c * p.x_c]) : acc_t(0);
        ok[u] = in && (!mask || mask[c * p.m_c]);
        wv[u] = need_w && in ? weight[c] : one;
        yv[u] = kProb && in ? to_acc(y[c * p.y_c]) : acc_t(0);
      }
      // every load of this group is issued above, so a write below never precedes the read
      // of the same element (grad may alias the logits)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + int64_t(u) * kTPR;
        if (c >= C) continue;
        const bool allowed = ok[u] && xv[u] != ninf;
        acc_t dzdx = one, z = xv[u];
        if (allowed && softcap) z = row::softcap_z(xv[u], cap, inv_cap, one, dzdx);
        const acc_t gc = kProb ? row::prob_elem_grad(b, z, dzdx, wv[u], yv[u], allowed)
                               : row::index_elem_grad(b, z, dzdx, wv[u], allowed, c == t);
        g[c * p.g_c] = from_acc<scalar_t>(gc);
      }
    }
  }
}

// ----------------------------------------------------------------------------- launch
struct Layout {
  int tpr;   // threads per row
  int rows;  // rows per block
};

// Rows for which a thread per row fills the GPU: 16 blocks of 128 threads on 132 SMs
// (H100) is 270k; a quarter of that keeps 4 resident blocks per SM busy.
constexpr int64_t kThreadRowsMin = 65536;

// A thread per row when a K-dim input's positions are contiguous (x_d == 1, D >= 4): each
// class is then one coalesced load for a warp's 32 consecutive positions (with D < 32 a warp
// spans 32 / D samples: still D-element runs instead of single elements), where a warp per
// row would read 32 classes D elements apart (with D of 2 or 3 those share their 32-byte
// sectors already: a warp per row reads as few sectors and keeps more threads busy). For
// short rows (C <= 256) always; for longer ones when the rows alone fill the GPU (a
// segmentation map: 16 x 128 x 128 = 262k rows), else a few long rows would run on a few
// threads. Otherwise one warp per row up to 1k classes (4 rows per block), 8 warps up to
// 16k, 16 beyond. (fusedloss/triton/_launch.py use_kdim makes the same choice of layout.)
Layout pick_layout(int64_t C, int64_t R, int64_t D, int64_t x_d) {
  if (D >= 4 && x_d == 1 && (C <= 256 || R >= kThreadRowsMin)) return {1, 128};
  if (C <= 1024) return {32, 4};
  if (C <= 16384) return {256, 1};
  return {512, 1};
}

// One resident wave at most (2048 threads per SM), grid-striding over the rows: the forward's
// partials stay few (one per block) and the grid does not depend on N beyond small sizes.
int64_t grid_for(const Layout& l, int64_t R) {
  const int64_t needed = (R + l.rows - 1) / l.rows;
  const int64_t wave = int64_t(num_sms()) * (2048 / (l.tpr * l.rows));
  return needed < wave ? needed : wave;
}

template <typename scalar_t, int kTPR, int kRows>
void fwd_for_layout(const SoftmaxFwdParams& p, cudaStream_t stream) {
  const dim3 block(kTPR, kRows);
  const unsigned grid = static_cast<unsigned>(p.blocks);
  if (p.kind == SoftmaxLoss::kCeProb) {
    softmax_fwd_kernel<scalar_t, kTPR, kRows, Sums::kProb><<<grid, block, 0, stream>>>(p);
  } else if (p.kind == SoftmaxLoss::kCeIndex && p.label_smoothing > 0.0) {
    softmax_fwd_kernel<scalar_t, kTPR, kRows, Sums::kSmooth><<<grid, block, 0, stream>>>(p);
  } else {
    softmax_fwd_kernel<scalar_t, kTPR, kRows, Sums::kPlain><<<grid, block, 0, stream>>>(p);
  }
}

template <typename scalar_t>
void fwd_for_dtype(const SoftmaxFwdParams& p, cudaStream_t stream) {
  switch (pick_layout(p.C, p.N * p.D, p.D, p.x_d).tpr) {
    case 1: return fwd_for_layout<scalar_t, 1, 128>(p, stream);
    case 32: return fwd_for_layout<scalar_t, 32, 4>(p, stream);
    case 256: return fwd_for_layout<scalar_t, 256, 1>(p, stream);
    default: return fwd_for_layout<scalar_t, 512, 1>(p, stream);
  }
}

template <typename scalar_t, int kTPR, int kRows>
void bwd_for_layout(const SoftmaxBwdParams& p, int64_t blocks, cudaStream_t stream) {
  const dim3 block(kTPR, kRows);
  const unsigned grid = static_cast<unsigned>(blocks);
  if (p.prob) {
    softmax_bwd_kernel<scalar_t, kTPR, kRows, true><<<grid, block, 0, stream>>>(p);
  } else {
    softmax_bwd_kernel<scalar_t, kTPR, kRows, false><<<grid, block, 0, stream>>>(p);
  }
}

template <typename scalar_t>
void bwd_for_dtype(const SoftmaxBwdParams& p, cudaStream_t stream) {
  const Layout l = pick_layout(p.C, p.N * p.D, p.D, p.x_d);
  const int64_t blocks = grid_for(l, p.N * p.D);
  switch (l.tpr) {
    case 1: return bwd_for_layout<scalar_t, 1, 128>(p, blocks, stream);
    case 32: return bwd_for_layout<scalar_t, 32, 4>(p, blocks, stream);
    case 256: return bwd_for_layout<scalar_t, 256, 1>(p, blocks, stream);
    default: return bwd_for_layout<scalar_t, 512, 1>(p, blocks, stream);
  }
}

}  // namespace

int64_t plan_softmax_fwd(SoftmaxFwdParams& p) {
  const int64_t R = p.N * p.D;
  p.blocks = R == 0 ? 0 : grid_for(pick_layout(p.C, R, p.D, p.x_d), R);
  return p.blocks * int64_t(sizeof(double2));
}

cudaError_t launch_softmax_fwd(const SoftmaxFwdParams& p, cudaStream_t stream) {
  if (p.blocks > 0) {
    switch (p.dtype) {
      case DType::kFloat32: fwd_for_dtype<float>(p, stream); break;
      case DType::kFloat64: fwd_for_dtype<double>(p, stream); break;
      case DType::kFloat16: fwd_for_dtype<__half>(p, stream); break;
      case DType::kBFloat16: fwd_for_dtype<__nv_bfloat16>(p, stream); break;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // Always runs: it writes denom (and the reduced loss), 0 for no rows.
  FinishArgs a{};
  a.partial = static_cast<const double2*>(p.workspace);
  a.n = p.blocks;
  a.out = p.reduction == kReduceNone ? nullptr : p.out;
  a.denom = p.denom;
  a.out_dtype = p.out_dtype;
  a.denom_dtype = p.dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  a.reduction = p.reduction;
  a.numel = -1.0;  // "mean" divides by the count sum
  return launch_finish_sum(a, stream);
}

cudaError_t launch_softmax_bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  if (p.N * p.D == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: bwd_for_dtype<float>(p, stream); break;
    case DType::kFloat64: bwd_for_dtype<double>(p, stream); break;
    case DType::kFloat16: bwd_for_dtype<__half>(p, stream); break;
    case DType::kBFloat16: bwd_for_dtype<__nv_bfloat16>(p, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fusedloss
