"""Builds napo_kernels._C: the C++ CPU kernels always, the CUDA kernels where the build can.

The extension is compiled against the C++ ABI of the torch it will run with, so install torch
first and build without pip's build isolation (which would hide that torch):

    pip install torch                      # any CPU or CUDA build, if not installed yet
    pip install --no-build-isolation .     # or `make setup`: a .venv with everything

A plain `pip install .` stops at once with these instructions instead of downloading a second
torch into an isolated build environment.

The CUDA kernels are built when the build's torch is a CUDA build and a CUDA toolkit whose major
version matches it is found (otherwise the CPU extension is built and the reason printed).
Environment switches:
  NAPO_KERNELS_BUILD_CUDA=1   force the CUDA kernels (fails without a usable toolkit)
  NAPO_KERNELS_BUILD_CUDA=0   skip them
  NAPO_KERNELS_SKIP_EXT=1     build no extension at all (pure-torch backend only; needs no torch)
  CUDA_HOME                   the toolkit (default: the one of `nvcc` on the PATH, else /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST        GPU architectures (default: the visible GPUs', else DEFAULT_CUDA_ARCHS)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# Without a visible GPU torch has no architecture to target (and fails); these are the ones
# `make check-cuda` compiles, with PTX so that newer GPUs can run them.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
DEFAULT_CUDA_HOME = "/usr/local/cuda"
# what pip's build isolation would have installed (ninja: parallel compilation)
BUILD_TOOLS = 'pip install "setuptools>=77" ninja'


def log(message: str) -> None:
    print(f"napo-kernels setup: {message}", file=sys.stderr)


def installed_torch_version() -> str | None:
    """The torch installed for this interpreter as pip's build isolation cannot hide it (``-I``
    ignores the PYTHONPATH through which the isolated build environment is put first)."""
    code = "import importlib.metadata as m\ntry: print(m.version('torch'))\nexcept Exception: pass"
    try:
        out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def setuptools_problem(version: str) -> str:
    """Without build isolation the environment's setuptools reads pyproject.toml; before 77 it
    rejects the SPDX license string with a schema dump instead of saying what to do."""
    if int(version.split(".")[0]) >= 77:
        return ""
    return (
        f"setuptools {version} is too old to read pyproject.toml. Run:\n    {BUILD_TOOLS}\nthen this again."
    )


def torch_problem(build_version: str | None, installed_version: str | None) -> str:
    """What is wrong with the torch this build would compile against ("" if nothing is)."""
    if build_version is None:
        if installed_version is None:
            first = "torch is not installed, and napo-kernels' C++ extension is compiled against it. Run:"
            steps = ["pip install torch", BUILD_TOOLS, "pip install --no-build-isolation ."]
        else:
            first = f"torch {installed_version} is installed, but pip's build isolation hides it. Run:"
            steps = [BUILD_TOOLS, "pip install --no-build-isolation ."]
    elif installed_version is not None and installed_version != build_version:
        first = (
            f"this build environment has torch {build_version}, but torch {installed_version} is "
            "installed: the extension would not load into it. Build against the installed one:"
        )
        steps = ["pip install --no-build-isolation ."]
    else:
        return ""
    others = "Or `make setup` (a .venv with everything); or, for no extension (the pure-torch backend):"
    steps = [f"    {step}" for step in steps]
    return "\n".join([first, *steps, others, "    NAPO_KERNELS_SKIP_EXT=1 pip install ."])


def toolkit_problem(home: str) -> str:
    """Why ``home`` is not a usable CUDA toolkit ("" if it is): torch compiles with its
    ``bin/nvcc``, includes its ``include/`` and links ``libcudart`` from ``lib64/`` (or ``lib/``)."""
    if not os.path.isdir(home):
        return f"no {home}"
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return f"{home} has no bin/nvcc"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return f"{home} has no include/cuda_runtime.h"
    if not any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib")):
        return f"{home} has no lib64/libcudart.so (the CUDA runtime)"
    return ""


def find_cuda_toolkit() -> tuple[str | None, str]:
    """The CUDA toolkit to build with and, when there is none, why. CUDA_HOME / CUDA_PATH when set;
    else the directory above `nvcc` on the PATH, else /usr/local/cuda. torch's own guess stops at
    the first: an `nvcc` wrapper script in /usr/local/bin made it compile against /usr/local."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        problem = toolkit_problem(explicit)
        return (None, f"CUDA_HOME={explicit} is not usable: {problem}") if problem else (explicit, "")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append(DEFAULT_CUDA_HOME)
    problems = []
    for home in dict.fromkeys(candidates):
        problem = toolkit_problem(home)
        if not problem:
            return home, ""
        problems.append(problem)
    where = "; ".join(problems if nvcc else ["no nvcc on the PATH", *problems])
    return None, f"no usable CUDA toolkit ({where}); set CUDA_HOME to one"


def nvcc_version(home: str) -> str | None:
    """``X.Y`` from ``nvcc --version``, None when it does not run."""
    try:
        out = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out.stdout)
    return found.group(1) if out.returncode == 0 and found else None


def cuda_skip_reason(
    torch_version: str, torch_cuda: str | None, home: str | None, home_problem: str, nvcc: str | None
) -> str:
    """Why the CUDA kernels are not built ("" to build them). torch's extension builder refuses a
    toolkit of another major CUDA version than torch's own; a minor difference only warns."""
    if torch_cuda is None:
        return f"torch {torch_version} is a CPU build"
    if home is None:
        return home_problem
    if nvcc is None:
        return f"{home}/bin/nvcc --version does not run or names no release"
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return (
            f"the toolkit in {home} is CUDA {nvcc}, torch {torch_version} was built with CUDA {torch_cuda}; "
            f"set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit"
        )
    return ""


def extensions() -> tuple[list, dict]:
    """The extension to build and its build command; exits with instructions when it cannot."""
    if os.environ.get("NAPO_KERNELS_SKIP_EXT") == "1":
        log("NAPO_KERNELS_SKIP_EXT=1: no C++ extension (the pure-torch backend only)")
        return [], {}
    try:
        import torch
    except ImportError:
        torch = None
    problem = torch_problem(torch and torch.__version__, installed_torch_version())
    if problem:
        raise SystemExit(f"napo-kernels setup: {problem}")

    flag = os.environ.get("NAPO_KERNELS_BUILD_CUDA")
    home = nvcc = None
    if flag == "0":
        reason = "NAPO_KERNELS_BUILD_CUDA=0"
    else:
        home, home_problem = find_cuda_toolkit()
        nvcc = nvcc_version(home) if home else None
        reason = cuda_skip_reason(torch.__version__, torch.version.cuda, home, home_problem, nvcc)
    with_cuda = flag == "1" or not reason
    if reason and with_cuda:
        log(f"CUDA kernels forced by NAPO_KERNELS_BUILD_CUDA=1 although {reason}")
    elif reason:
        log(f"CUDA kernels skipped: {reason}. Building the CPU extension only.")
    else:
        log(f"CUDA kernels with the CUDA {nvcc} toolkit in {home} (torch {torch.__version__})")
    if with_cuda and home:
        os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        log(f"no visible GPU: TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")

    from torch.utils import cpp_extension

    if with_cuda and home:
        cpp_extension.CUDA_HOME = home  # in case the module was imported before (its guess)
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
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


# setuptools runs this file as __main__; tests import it for the functions above
if __name__ == "__main__":
    import setuptools

    if problem := setuptools_problem(setuptools.__version__):
        raise SystemExit(f"napo-kernels setup: {problem}")
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
