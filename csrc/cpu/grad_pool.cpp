// CPU gradient buffers from a small cache of freed blocks.
//
// Why: the forward kernels write an N x C gradient into a fresh buffer every step. glibc
// serves allocations over 32 MB with mmap and unmaps them on free, so every training step
// page-faults (and the kernel zeroes) the whole buffer again: for 4096 x 32000 float32
// (512 MB) that is ~150 ms on 2 cores, three times the loss kernel itself. A training loop
// frees the previous step's gradient before the next forward, so keeping a couple of freed
// blocks of the exact size removes that cost. Blocks are also advised as transparent huge
// pages, so a cold allocation takes 2 MB faults instead of 4 KB ones.
//
// Allocations and frees are reported to the profiler like c10's CPU allocator does, so
// memory measurements (torch.profiler profile_memory) see these buffers as they come and go.
#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

namespace fusedloss {
namespace {

constexpr size_t kAlign = size_t(2) << 20;       // 2 MB: huge-page aligned
constexpr size_t kMinPooled = size_t(1) << 20;   // smaller buffers: plain torch allocations
constexpr size_t kMaxFreeBlocks = 2;             // freed blocks kept (one step's worth)

struct Block {
  void* ptr;
  size_t bytes;
};

std::mutex g_mutex;
std::vector<Block> g_free;  // most recently freed last

size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

void report(void* ptr, int64_t delta) {
  if (c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(ptr, delta, 0, 0, c10::Device(c10::DeviceType::CPU));
  }
}

void release(void* ctx) {
  auto* blk = static_cast<Block*>(ctx);
  report(blk->ptr, -static_cast<int64_t>(blk->bytes));
  Block evicted{nullptr, 0};
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_free.push_back(*blk);
    if (g_free.size() > kMaxFreeBlocks) {
      evicted = g_free.front();
      g_free.erase(g_free.begin());
    }
  }
  if (evicted.ptr != nullptr) std::free(evicted.ptr);
  delete blk;
}

void* acquire(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_free.rbegin(); it != g_free.rend(); ++it) {
      if (it->bytes == bytes) {
        void* p = it->ptr;
        g_free.erase(std::next(it).base());
        return p;
      }
    }
  }
  void* p = nullptr;
  if (posix_memalign(&p, kAlign, bytes) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: ignored where THP is off
#endif
  return p;
}

// A tensor with `like`'s sizes, dtype and device (CPU), in `like`'s layout: its strides when
// `like` is non-overlapping and dense (channels_last, a transposed matrix, ...), else
// contiguous. A gradient in its input's layout is what AccumulateGrad keeps as .grad without a
// copy (it clones one whose strides differ from the parameter's).
at::Tensor empty_grad_cpu(const at::Tensor& like) {
  const bool keep = like.is_non_overlapping_and_dense();
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (nbytes < kMinPooled) {
    return keep ? at::empty_strided(like.sizes(), like.strides(), like.options()) : at::empty(like.sizes(), like.options());
  }
  const size_t bytes = round_up(nbytes);
  auto* blk = new Block{acquire(bytes), bytes};
  report(blk->ptr, static_cast<int64_t>(bytes));
  c10::DataPtr data(blk->ptr, blk, &release, c10::Device(c10::DeviceType::CPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data), /*allocator=*/nullptr,
                       /*resizable=*/false);
  // dense: the strides span exactly numel elements from offset 0
  at::Tensor out = at::empty({0}, like.options());
  return keep ? out.set_(storage, 0, like.sizes(), like.strides()) : out.set_(storage, 0, like.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { m.impl("empty_grad", &empty_grad_cpu); }

}  // namespace fusedloss
