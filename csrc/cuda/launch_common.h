// Host-side types shared by the CUDA launch interfaces (softmax_launch.h, binary_launch.h).
// Plain C++: the .cu files and the torch bindings both include it.
#pragma once

namespace fusedloss {
namespace cuda {

// Element type of a tensor the kernels read or write. Accumulation is in double for kFloat64
// data and in float otherwise.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// at::Reduction, as the ops take it.
enum Reduction : int { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

}  // namespace cuda
}  // namespace fusedloss
