// Host emulation of the CUDA device code and runtime calls the fusedloss kernels use, for
// tests/test_cuda_emu.py: the kernels of csrc/cuda/*.cu compiled by the host compiler and run
// on the CPU. One std::thread per CUDA thread; the blocks of a grid run one after another;
// __syncthreads is a barrier of the block; a warp shuffle goes through an exchange buffer of
// the block between two barriers, so every thread of the block must call it together (the
// fusedloss kernels do: their loops are uniform per block). __shared__ variables are static:
// one copy, shared by the threads of the running block. Numerics: the host's expf / logf /
// tanhf instead of the GPU's (a few ulp apart), the same types and the same order of
// operations otherwise.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <barrier>
#include <thread>
#include <vector>

// ----------------------------------------------------------------------------- runtime
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline int emu_num_sms = 2;  // the "device"'s SM count: sizes the grids (emu_set_sms)
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu_num_sms;
  return cudaSuccess;
}

// ----------------------------------------------------------------------------- device
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct double2 {
  double x, y;
};
inline double2 make_double2(double a, double b) { return {a, b}; }

namespace emu {
struct Block {
  std::barrier<>* bar;
  std::vector<uint64_t> xchg;
};
inline thread_local Block* blk = nullptr;
}  // namespace emu
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline void __syncthreads() { emu::blk->bar->arrive_and_wait(); }

// CUDA's integer min / max of device code, and the read-only cache load (a plain load here).
inline int min(int a, int b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline long max(long a, long b) { return a < b ? b : a; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "one 64-bit word per thread");
  const unsigned tid = threadIdx.x + threadIdx.y * blockDim.x;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  emu::blk->xchg[tid] = bits;
  emu::blk->bar->arrive_and_wait();
  const uint64_t other = emu::blk->xchg[tid ^ unsigned(lane_mask)];
  emu::blk->bar->arrive_and_wait();
  T r;
  memcpy(&r, &other, sizeof(T));
  return r;
}

struct __half {
  uint16_t x;
};
inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  memcpy(&h.x, &f, 2);
  return h;
}
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.x) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}

// ----------------------------------------------------------------------------- launches
// tests/test_cuda_emu.py rewrites `kernel<<<grid, block, smem, stream>>>(args);` into
// `emu::launch(grid, block, smem, stream, [&] { kernel(args); });`.
namespace emu {
struct Launch {
  unsigned grid, block_x, block_y;
};
inline std::vector<Launch> launches;  // since the last emu_clear_launches()

template <class F>
inline void launch(dim3 grid, dim3 block, size_t, cudaStream_t, F&& body) {
  launches.push_back({grid.x * grid.y * grid.z, block.x, block.y});
  const unsigned nt = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(nt);
        Block b{&bar, std::vector<uint64_t>(nt)};
        std::vector<std::thread> threads;
        threads.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          threads.emplace_back([&, t] {
            blk = &b;
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = {bx, by, bz};
            blockDim = block;
            gridDim = grid;
            body();
            bar.arrive_and_drop();  // a finished thread no longer holds the others' barriers
          });
        for (auto& th : threads) th.join();
      }
}
}  // namespace emu
