// Torch-side helpers of the CUDA bindings (softmax_binding.cpp, binary_binding.cpp): the
// kernels' element types and the current stream. Compiled only where torch has CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cuda/launch_common.h"

namespace fusedloss {

inline cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "fusedloss: unsupported dtype ", t, " (the checks should have caught it)");
  }
}

// The stream every launch of an op goes on: the current one of the tensor's device.
inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

// Scratch of `bytes` bytes for an op's partial sums. The tensor only has to live until the
// launch is enqueued: the caching allocator orders any reuse of the block on the same stream.
inline at::Tensor workspace_bytes(const at::Tensor& like, int64_t bytes) {
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

}  // namespace fusedloss
