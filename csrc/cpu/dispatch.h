// Run-time choice among the per-capability builds of a CPU kernel (see setup.py).
//
// A kernel file in csrc/cpu/kernels/ defines its entry points inside
//   namespace fusedloss { namespace CPU_CAPABILITY { ... } }
// and is compiled once per capability. Callers declare the entry point for every
// capability with FUSEDLOSS_DECLARE_CPU_KERNEL and call FUSEDLOSS_CPU_KERNEL(name)(args...).
#pragma once
#include <ATen/Context.h>
#include <ATen/Version.h>  // at::get_cpu_capability()
#include <string>

namespace fusedloss {

enum class CpuCapability { DEFAULT, AVX2, AVX512 };

inline CpuCapability cpu_capability() {
  // at::get_cpu_capability() honours ATEN_CPU_CAPABILITY, so tests can force DEFAULT.
  static const CpuCapability cap = [] {
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FUSEDLOSS_CPU_DEFAULT_ONLY)
    const std::string s = at::get_cpu_capability();
    if (s == "AVX512") return CpuCapability::AVX512;
    if (s == "AVX2") return CpuCapability::AVX2;
#endif
    return CpuCapability::DEFAULT;
  }();
  return cap;
}

}  // namespace fusedloss

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FUSEDLOSS_CPU_DEFAULT_ONLY)
#define FUSEDLOSS_DECLARE_CPU_KERNEL(ret, name, ...)   \
  namespace fusedloss {                                 \
  namespace DEFAULT { ret name(__VA_ARGS__); }          \
  namespace AVX2 { ret name(__VA_ARGS__); }             \
  namespace AVX512 { ret name(__VA_ARGS__); }           \
  }
#define FUSEDLOSS_CPU_KERNEL(name)                                                  \
  (::fusedloss::cpu_capability() == ::fusedloss::CpuCapability::AVX512 ? &::fusedloss::AVX512::name \
   : ::fusedloss::cpu_capability() == ::fusedloss::CpuCapability::AVX2 ? &::fusedloss::AVX2::name   \
                                                                        : &::fusedloss::DEFAULT::name)
#else
#define FUSEDLOSS_DECLARE_CPU_KERNEL(ret, name, ...) \
  namespace fusedloss {                               \
  namespace DEFAULT { ret name(__VA_ARGS__); }        \
  }
#define FUSEDLOSS_CPU_KERNEL(name) (&::fusedloss::DEFAULT::name)
#endif
