# napo-kernels: `make bench` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; on a GPU machine use e.g. TORCH_SPEC="torch" (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.napo-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90
# Formatters pinned: a new release may re-format code that passed `make lint` before.
RUFF_SPEC ?= ruff==0.17.6
CLANG_FORMAT_SPEC ?= clang-format==23.1.5
LINT_STAMP := $(VENV)/.napo-lint-$(subst ==,-,$(RUFF_SPEC))-$(subst ==,-,$(CLANG_FORMAT_SPEC))
PY_SOURCES := napo_kernels benchmarks tests examples scripts setup.py
CSRC := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | sort)

.PHONY: setup install test test-fast lint format bench bench-deps demo study check-cuda gpu-check clean

setup: $(STAMP) $(LINT_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

# Dependencies first (torch before the build, which compiles against it), then the package with its
# C++ extension, built against that torch (no build isolation: the venv's setuptools reads pyproject.toml).
$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy ninja "setuptools>=77"
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "triton>=3.1" "pytest>=8" "hypothesis>=6.100" tqdm matplotlib transformers peft tokenizers "trl>=1.16,<1.17" "deepspeed==0.19.8"
	$(PY) -m pip install --quiet --no-build-isolation -e .
	$(PY) -c "import napo_kernels as nk; print({k: v.available for k, v in nk.backends().items()})"
	touch $(STAMP)

$(LINT_STAMP): $(VENV)/bin/python
	$(PY) -m pip install --quiet "$(RUFF_SPEC)" "$(CLANG_FORMAT_SPEC)"
	touch $@

install: setup

# ruff's rules and formatting over the Python, clang-format (.clang-format) over csrc/
lint: setup
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

# Rewrites the sources the way `make lint` wants them.
format: setup
	$(VENV)/bin/ruff check --fix $(PY_SOURCES)
	$(VENV)/bin/ruff format $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(CSRC)

# Everything (about 6 minutes on 2 cores).
test: setup bench-deps lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The tests not marked slow (spawned process groups, whole training loops, the benchmark CLI,
# torch.compile, the longest kernel property searches): under 2 minutes on 2 cores.
test-fast: setup lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Optional benchmark contenders (Liger-Kernel, Cut Cross-Entropy), pure-Python wheels; without them
# the suite reports "not installed". TORCH_SPEC keeps pip from replacing the installed torch.
BENCH_STAMP := $(VENV)/.napo-bench-deps
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" liger-kernel cut-cross-entropy || echo "optional benchmark contenders not installed"
	touch $(BENCH_STAMP)

bench-deps: $(BENCH_STAMP)

bench: setup bench-deps
	$(PY) -m benchmarks

# End to end on the synthetic world (about 5 minutes on 2 CPU cores): SFT, then NAPO and the control
# (SFT continued for as many steps), 3 seeds each: the table gives mean +- standard error.
demo: setup
	$(PY) examples/study.py --arms control napo --seeds 3 --out runs/demo

# Does the preference stage help? Every method against the control, 3 seeds, on the synthetic world
# (docs/study.md). STUDY_ARGS adds options, e.g. STUDY_ARGS="--grid lr=1e-3,3e-3".
study: setup
	$(PY) examples/study.py --out runs/study $(STUDY_ARGS)

# Compile every .cu file for each architecture (compile only: nothing runs without a GPU), warnings as
# errors; then type-check the tensor-side CUDA wrappers (csrc/cuda/*.cpp) against the installed torch
# headers (the CPU wheel lacks one generated CUDA header: an empty stub, searched last, stands in).
check-cuda: setup
	@set -e; for arch in $(CUDA_ARCHS); do for f in csrc/cuda/*.cu; do \
	  echo "nvcc sm_$$arch $$f"; \
	  $(NVCC) -std=c++17 -O3 -arch=sm_$$arch -Icsrc -Xcompiler -Wall,-Wextra --Werror all-warnings -c $$f -o /dev/null; \
	done; done
	@set -e; stub=$$(mktemp -d); trap 'rm -rf "$$stub"' EXIT; \
	mkdir -p $$stub/c10/cuda/impl; touch $$stub/c10/cuda/impl/cuda_cmake_macros.h; \
	inc=$$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; \
	  print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))"); \
	for f in csrc/cuda/*.cpp; do \
	  echo "syntax $$f"; \
	  $(NVCC) -std=c++20 -DNAPO_WITH_CUDA -Icsrc $$inc -I$$stub -Xcompiler -fsyntax-only -c $$f -o /dev/null; \
	done

# One command for a GPU machine where nothing can be downloaded (a preinstalled CUDA torch, triton,
# pytest, hypothesis, nvcc, compute-sanitizer): builds the CUDA extension in place (MAX_JOBS = CPU count),
# runs tests/test_gpu.py, the GPU benchmark (rec, dense) and compute-sanitizer memcheck on a small run of
# the cuda backend, each step with a time budget (8 minutes in all on one H100/H200), every result and log
# in gpu-check-<time>/ (GPU_CHECK_ARGS="--out DIR" to choose). Without a GPU it says so, checks the CPU
# build, the .cu files with nvcc (sm_90) and that pytest collects every GPU test, and exits 0.
# It needs no venv: the venv's python when there is one, else python3.
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info napo_kernels/*.so $(VENV)
