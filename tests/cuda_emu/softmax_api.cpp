// C entry points of the emulated softmax kernels for tests/test_cuda_emu.py (ctypes): the
// launch interface of csrc/cuda/softmax_launch.h with flat arguments (emu_api.cpp: the
// emulator's own entry points, linked into the same library). The test writes
// softmax_losses_emu.cpp (csrc/cuda/softmax_losses.cu with its launches rewritten for
// emu_device.h) next to the rewritten cuda/kernel_common.cuh, and compiles this file with
// that directory first on the include path.
#include <vector>

#include "softmax_losses_emu.cpp"

using fusedloss::cuda::DType;
using fusedloss::cuda::SoftmaxBwdParams;
using fusedloss::cuda::SoftmaxFwdParams;
using fusedloss::cuda::SoftmaxLoss;

extern "C" {

// s: strides x_n, x_c, x_d, t_n, t_d, y_n, y_c, y_d, m_n, m_c, m_d; f: label_smoothing,
// z_loss, softcap, gamma. target: int64 class indices, or (kind 1) probabilities.
int emu_softmax_fwd(const void* logits, const void* target, const void* weight, const bool* mask, void* out,
                    void* denom, void* stats, const int64_t* s, int64_t N, int64_t C, int64_t D, int kind, int dtype,
                    int out_dtype, int reduction, int64_t ignore_index, const double* f) {
  SoftmaxFwdParams p{};
  p.kind = static_cast<SoftmaxLoss>(kind);
  p.logits = logits;
  if (p.kind == SoftmaxLoss::kCeProb) {
    p.prob = target;
  } else {
    p.target = static_cast<const int64_t*>(target);
  }
  p.weight = weight, p.mask = mask, p.out = out, p.denom = denom, p.stats = stats;
  p.x_n = s[0], p.x_c = s[1], p.x_d = s[2], p.t_n = s[3], p.t_d = s[4];
  p.y_n = s[5], p.y_c = s[6], p.y_d = s[7], p.m_n = s[8], p.m_c = s[9], p.m_d = s[10];
  p.N = N, p.C = C, p.D = D;
  p.dtype = static_cast<DType>(dtype), p.out_dtype = static_cast<DType>(out_dtype);
  p.reduction = reduction, p.ignore_index = ignore_index;
  p.label_smoothing = f[0], p.z_loss = f[1], p.softcap = f[2], p.gamma = f[3];
  std::vector<double2> workspace(fusedloss::cuda::plan_softmax_fwd(p) / sizeof(double2) + 1);
  p.workspace = workspace.data();
  return static_cast<int>(fusedloss::cuda::launch_softmax_fwd(p, nullptr));
}

// s: strides go_n, go_d, x_n, x_c, x_d, t_n, t_d, y_n, y_c, y_d, m_n, m_c, m_d, g_n, g_c, g_d.
int emu_softmax_bwd(const void* grad_out, const void* logits, const void* target, int prob, const void* weight,
                    const bool* mask, const void* stats, const void* denom, void* grad, const int64_t* s, int64_t N,
                    int64_t C, int64_t D, int dtype, int grad_out_dtype, int reduction, double softcap) {
  SoftmaxBwdParams p{};
  p.grad_out = grad_out, p.logits = logits;
  if (prob) {
    p.prob = target;
  } else {
    p.target = static_cast<const int64_t*>(target);
  }
  p.weight = weight, p.mask = mask, p.stats = stats, p.denom = denom, p.grad = grad;
  p.go_n = s[0], p.go_d = s[1], p.x_n = s[2], p.x_c = s[3], p.x_d = s[4], p.t_n = s[5], p.t_d = s[6];
  p.y_n = s[7], p.y_c = s[8], p.y_d = s[9], p.m_n = s[10], p.m_c = s[11], p.m_d = s[12];
  p.g_n = s[13], p.g_c = s[14], p.g_d = s[15];
  p.N = N, p.C = C, p.D = D;
  p.dtype = static_cast<DType>(dtype), p.grad_out_dtype = static_cast<DType>(grad_out_dtype);
  p.reduction = reduction, p.softcap = softcap;
  return static_cast<int>(fusedloss::cuda::launch_softmax_bwd(p, nullptr));
}

}  // extern "C"
