"""Builds fusedloss._C: the C++ CPU kernels always, the CUDA kernels where torch has CUDA.

CPU kernels live in csrc/cpu/kernels/*.cpp. Each is compiled once per CPU capability
(DEFAULT, AVX2, AVX512 on x86-64) inside `namespace CPU_CAPABILITY`, the way ATen builds
its own kernels, and csrc/cpu/dispatch.h picks one at run time from
at::get_cpu_capability(). Nothing is built with -march=native.
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join("build", "fusedloss_gen")

OPENMP = torch.backends.openmp.is_available() and platform.system() == "Linux"
X86 = platform.machine().lower() in ("x86_64", "amd64")
CAPABILITY_FLAGS = {"DEFAULT": []}
if X86:
    CAPABILITY_FLAGS["AVX2"] = ["-mavx2", "-mfma", "-mf16c"]
    CAPABILITY_FLAGS["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]


def capability_sources():
    """One generated wrapper per (kernel file, capability); the wrapper's name carries the capability."""
    os.makedirs(GEN, exist_ok=True)
    out = []
    for src in sorted(glob.glob(os.path.join("csrc", "cpu", "kernels", "*.cpp"))):
        stem = os.path.splitext(os.path.basename(src))[0]
        for cap in CAPABILITY_FLAGS:
            path = os.path.join(GEN, f"{stem}.{cap}.cpp")
            text = f'#include "{os.path.join(ROOT, src)}"\n'
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            out.append(path)
    return out


def capability_of(src):
    parts = os.path.basename(src).split(".")
    return parts[-2] if len(parts) >= 3 and parts[-2] in CAPABILITY_FLAGS else None


class Build(BuildExtension):
    """Adds the per-capability flags to the generated wrappers (needs the non-ninja compile path)."""

    def build_extension(self, ext):
        compile_one = self.compiler._compile

        def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            cap = capability_of(src)
            if cap is not None:
                flags = [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"] + CAPABILITY_FLAGS[cap]
                if isinstance(extra_postargs, dict):
                    extra_postargs = dict(extra_postargs, cxx=list(extra_postargs.get("cxx", [])) + flags)
                else:
                    extra_postargs = list(extra_postargs) + flags
            return compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = compile_one


def with_cuda():
    if os.environ.get("FUSEDLOSS_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp")) + capability_sources()
    cxx = ["-O3", "-std=c++17", "-fvisibility=hidden"]
    # at::parallel_for is an inline template whose OpenMP pragma is compiled in *our* files:
    # without -fopenmp it silently runs on one thread (torch's own build uses OpenMP on Linux).
    link = []
    if OPENMP:
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        return CUDAExtension(
            "fusedloss._C", sources, include_dirs=include_dirs,
            define_macros=[("FUSEDLOSS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
        )
    return CppExtension("fusedloss._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=False)},
)
