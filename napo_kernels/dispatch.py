"""Which kernel backends exist on this machine, and which one a call uses.

A backend is a module with the five kernel functions documented in
``napo_kernels.kernels.torch_chunked``. ``auto`` picks, for the tensors' device:
CUDA tensors -> ``triton``, then ``cuda``, then ``torch``; CPU tensors -> ``cpp``, then ``torch``.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")


@dataclass(frozen=True)
class BackendInfo:
    """Availability of one backend: ``available`` and, when not, ``reason``."""

    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str = ""


def _extension_error() -> str:
    try:
        importlib.import_module("napo_kernels._C")
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        return (
            f"C++ extension napo_kernels._C not importable ({exc}); build it against the installed "
            f"torch {torch.__version__}: `pip install --no-build-isolation .` in the napo-kernels clone "
            "(add -e for an editable install), or `make setup` there for its .venv"
        )
    return ""


@functools.cache
def _probe(name: str) -> BackendInfo:
    if name == "torch":
        return BackendInfo("torch", True, ("cpu", "cuda"))
    if name == "cpp":
        err = _extension_error()
        return BackendInfo("cpp", not err, ("cpu",), err)
    if name == "cuda":
        err = _extension_error()
        if not err and not hasattr(torch.ops.napo_C, "linear_logprobs_fwd"):
            err = "extension has no kernels"
        if not err and not torch.cuda.is_available():
            err = "torch sees no CUDA device"
        if not err and not getattr(torch.ops.napo_C, "has_cuda", lambda: False)():
            err = "extension was built without CUDA (set NAPO_KERNELS_BUILD_CUDA=1 on a CUDA machine)"
        return BackendInfo("cuda", not err, ("cuda",), err)
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            return BackendInfo("triton", False, ("cuda",), f"triton not installed ({exc})")
        if os.environ.get("TRITON_INTERPRET") == "1":
            return BackendInfo("triton", True, ("cpu", "cuda"))
        if not torch.cuda.is_available():
            return BackendInfo(
                "triton", False, ("cuda",), "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
            )
        return BackendInfo("triton", True, ("cuda",))
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")


def backends() -> dict[str, BackendInfo]:
    """Every backend with its availability and, where unavailable, why."""
    return {name: _probe(name) for name in BACKENDS}


_warned_missing_extension = False


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend a call with tensors on ``device`` uses; raises if it cannot run there."""
    global _warned_missing_extension
    if backend == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
        for name in order:
            info = _probe(name)
            if info.available and device.type in info.devices:
                return name
        raise RuntimeError(f"no backend for device {device}")  # unreachable: torch runs anywhere
    info = _probe(backend)
    if not info.available:
        raise RuntimeError(f"backend {backend!r} is unavailable: {info.reason}")
    if device.type not in info.devices:
        raise ValueError(f"backend {backend!r} runs on {info.devices}, but the tensors are on {device}")
    return backend


def warn_if_extension_missing() -> None:
    """Say once that the C++ extension is missing and the pure-torch backend is used instead."""
    global _warned_missing_extension
    info = _probe("cpp")
    if not info.available and not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(f"napo_kernels: using the pure-torch backend: {info.reason}", stacklevel=3)


def kernels(name: str) -> ModuleType:
    """The kernel module of a concrete backend."""
    module = {
        "torch": "napo_kernels.kernels.torch_chunked",
        "cpp": "napo_kernels.kernels.extension",
        "cuda": "napo_kernels.kernels.extension",  # same ops, dispatched on the CUDA key
        "triton": "napo_kernels.kernels.triton",
    }[name]
    return importlib.import_module(module)
