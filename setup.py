"""Builds napo_kernels._C: the C++ CPU kernels always, the CUDA kernels where torch has CUDA.

Environment switches (as flash-attention does):
  NAPO_KERNELS_BUILD_CUDA=1   force the CUDA kernels (fails without nvcc / a CUDA torch)
  NAPO_KERNELS_BUILD_CUDA=0   skip them
  NAPO_KERNELS_SKIP_EXT=1     build no extension at all (pure-torch backend only)
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""

import glob
import os
import sys

from setuptools import setup


def extensions():
    if os.environ.get("NAPO_KERNELS_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    flag = os.environ.get("NAPO_KERNELS_BUILD_CUDA")
    with_cuda = flag == "1" or (flag is None and torch.version.cuda is not None and CUDA_HOME is not None)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # C++20: the standard the torch headers are written for; no errno/trapping math (as torch builds
    # itself) lets the compiler vectorise the selects of the CPU row loops (csrc/cpu/row_passes.h)
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", *openmp]
    kwargs = dict(
        name="napo_kernels._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx + (["-DNAPO_WITH_CUDA"] if with_cuda else [])},
        extra_link_args=openmp,
        py_limited_api=False,
    )
    if with_cuda:
        # .cu: kernels with no torch headers; csrc/cuda/*.cpp: their tensor-side wrappers (CUDA build only)
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17", "-DNAPO_WITH_CUDA"]
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
