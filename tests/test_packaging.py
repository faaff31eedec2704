"""Packaging: the project metadata and the build script's choices (no compiler runs here)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    meta = _pyproject()
    assert meta["project"]["license"] == "Apache-2.0"  # a table is deprecated: warnings at every build
    setuptools = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert len(setuptools) == 1
    minimum = re.fullmatch(r"setuptools>=(\d+).*", setuptools[0])
    assert minimum and int(minimum.group(1)) >= 77  # the first release with PEP 639 license strings
    # a torch here would be downloaded (a CUDA build, GBs) into pip's isolated build environment and
    # compiled against instead of the installed one: setup.py asks for --no-build-isolation instead
    assert not [r for r in meta["build-system"]["requires"] if r.startswith("torch")]


def _load_setup():
    """setup.py as a module: it calls setup() only when run as __main__ (as setuptools runs it)."""
    spec = importlib.util.spec_from_file_location("napo_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def build() -> ModuleType:
    return _load_setup()


def test_build_without_torch_says_what_to_run(build):
    # pip's build isolation: no torch in the build environment, one installed beside it
    hidden = build.torch_problem(None, "2.13.0+cpu")
    assert "torch 2.13.0+cpu is installed, but pip's build isolation hides it" in hidden
    assert "    pip install --no-build-isolation ." in hidden.splitlines()
    assert "NAPO_KERNELS_SKIP_EXT=1 pip install ." in hidden
    # no torch anywhere: install it first
    missing = build.torch_problem(None, None).splitlines()
    assert missing.index("    pip install torch") < missing.index("    pip install --no-build-isolation .")
    assert '    pip install "setuptools>=77" ninja' in missing


def test_old_setuptools_without_build_isolation_says_what_to_run(build):
    # a Python 3.11 venv comes with setuptools 65, which rejects the SPDX license string
    assert build.setuptools_problem("65.5.0") == (
        'setuptools 65.5.0 is too old to read pyproject.toml. Run:\n    pip install "setuptools>=77" ninja\n'
        "then this again."
    )
    assert build.setuptools_problem("77.0.3") == build.setuptools_problem("84.2.1") == ""


def test_build_against_another_torch_than_the_installed_one_is_refused(build):
    other = build.torch_problem("2.14.1+cu128", "2.13.0+cpu")
    assert "torch 2.14.1+cu128" in other and "torch 2.13.0+cpu is installed" in other
    assert "pip install --no-build-isolation ." in other
    assert build.torch_problem("2.13.0+cpu", "2.13.0+cpu") == ""
    assert build.torch_problem("2.13.0", None) == ""  # torch from PYTHONPATH: nothing to compare


def _toolkit(root: Path, release: str = "12.8", headers: bool = True, runtime: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.93'\n")
    nvcc.chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").touch()
    if runtime:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so.12").touch()
    return root


@pytest.fixture
def no_cuda_env(monkeypatch, tmp_path, build):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(build, "DEFAULT_CUDA_HOME", str(tmp_path / "no-cuda"))
    return monkeypatch


def test_a_wrapper_nvcc_on_the_path_does_not_make_its_directory_the_toolkit(build, no_cuda_env, tmp_path):
    # /usr/local/bin/nvcc as a script that execs the real one: torch took /usr/local for CUDA_HOME
    real = _toolkit(tmp_path / "cuda-12.8")
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    no_cuda_env.setenv("PATH", str(wrapper.parent))
    no_cuda_env.setattr(build, "DEFAULT_CUDA_HOME", str(real))
    assert build.find_cuda_toolkit() == (str(real), "")
    assert build.nvcc_version(str(real)) == "12.8"


def test_unusable_toolkits_are_named(build, no_cuda_env, tmp_path):
    home, problem = build.find_cuda_toolkit()
    assert home is None and problem.startswith("no usable CUDA toolkit (no nvcc on the PATH")
    partial = _toolkit(tmp_path / "partial", runtime=False)
    no_cuda_env.setenv("CUDA_HOME", str(partial))
    assert build.find_cuda_toolkit() == (
        None,
        f"CUDA_HOME={partial} is not usable: {partial} has no lib64/libcudart.so (the CUDA runtime)",
    )
    no_cuda_env.setenv("CUDA_HOME", str(_toolkit(tmp_path / "full")))
    assert build.find_cuda_toolkit() == (str(tmp_path / "full"), "")


def test_nvcc_that_does_not_run_has_no_version(build, tmp_path):
    home = _toolkit(tmp_path / "broken")
    (home / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    assert build.nvcc_version(str(home)) is None
    assert build.nvcc_version(str(tmp_path / "absent")) is None


def test_cuda_kernels_only_with_a_cuda_torch_and_a_toolkit_of_its_major_version(build):
    reason = build.cuda_skip_reason
    assert reason("2.13.0+cpu", None, "/usr/local/cuda", "", "13.0") == "torch 2.13.0+cpu is a CPU build"
    assert (
        reason("2.13.0", "12.8", None, "no usable CUDA toolkit (...)", None) == "no usable CUDA toolkit (...)"
    )
    assert "does not run" in reason("2.13.0", "12.8", "/opt/cuda", "", None)
    assert reason("2.13.0", "12.8", "/opt/cuda", "", "13.0") == (
        "the toolkit in /opt/cuda is CUDA 13.0, torch 2.13.0 was built with CUDA 12.8; "
        "set CUDA_HOME to a CUDA 12.x toolkit"
    )
    assert reason("2.13.0", "12.8", "/opt/cuda", "", "12.6") == ""  # torch only warns on a minor gap
    assert reason("2.13.0", "13.0", "/opt/cuda", "", "13.0") == ""


def test_missing_extension_warning_says_what_to_run(monkeypatch):
    from napo_kernels import dispatch

    real = importlib.import_module

    def fail(name, *args):
        if name == "napo_kernels._C":
            raise ImportError("undefined symbol: _ZN3c10")
        return real(name, *args)

    monkeypatch.setattr(dispatch.importlib, "import_module", fail)
    message = dispatch._extension_error()
    assert "undefined symbol" in message
    assert "`pip install --no-build-isolation .` in the napo-kernels clone" in message
    assert "`make setup`" in message and "make install" not in message


def test_extension_of_a_cpu_torch_is_the_cpu_one(build, monkeypatch, capsys):
    monkeypatch.delenv("NAPO_KERNELS_BUILD_CUDA", raising=False)
    monkeypatch.delenv("NAPO_KERNELS_SKIP_EXT", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    (ext,), cmdclass = build.extensions()
    assert ext.name == "napo_kernels._C" and "build_ext" in cmdclass
    assert not [s for s in ext.sources if "cuda" in s]
    assert "CUDA kernels skipped: torch " in capsys.readouterr().err
    monkeypatch.setenv("NAPO_KERNELS_SKIP_EXT", "1")
    assert build.extensions() == ([], {})


def test_cuda_torch_without_a_gpu_builds_for_default_architectures(build, no_cuda_env, tmp_path, capsys):
    from torch.utils import cpp_extension

    toolkit = _toolkit(tmp_path / "cuda-13.0", release="13.0")
    no_cuda_env.setattr(build, "DEFAULT_CUDA_HOME", str(toolkit))
    no_cuda_env.delenv("NAPO_KERNELS_BUILD_CUDA", raising=False)
    no_cuda_env.delenv("NAPO_KERNELS_SKIP_EXT", raising=False)
    no_cuda_env.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    no_cuda_env.setattr(torch.version, "cuda", "13.0")
    no_cuda_env.setattr(torch.cuda, "device_count", lambda: 0)
    no_cuda_env.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # restored afterwards
    (ext,), _ = build.extensions()
    assert any(s.endswith(".cu") for s in ext.sources)
    assert os.environ["CUDA_HOME"] == str(toolkit) == cpp_extension.CUDA_HOME
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == build.DEFAULT_CUDA_ARCHS
    assert f"CUDA kernels with the CUDA 13.0 toolkit in {toolkit}" in capsys.readouterr().err
    no_cuda_env.setattr(torch.version, "cuda", "12.8")  # a toolkit of another major version: CPU only
    (ext,), _ = build.extensions()
    assert not any(s.endswith(".cu") for s in ext.sources)
