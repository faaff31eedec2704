"""What every Triton kernel of the ``triton`` backend shares: dtypes, launch configurations, checks.

Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` (how the tests run without a GPU).
Two interpreter limits shape this module: a multi-config ``@triton.autotune`` fails there, so each
kernel gets one fixed configuration when interpreting (small blocks, so tests cover masking and
several tiles); and ``tl.dot`` on bfloat16 operands computes wrong numbers there, so bfloat16 tiles
are converted to float32 before the dot when interpreting (on a GPU they stay bfloat16).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Read once at import: triton itself decides at import time whether it interprets.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, everything else in float32 (as the torch backend)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype) -> tl.dtype:
    """The Triton accumulation dtype for inputs of ``dtype``."""
    return _TL_DTYPE[acc_dtype(dtype)]


def tl_dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of ``tl.dot``: the input dtype (tensor cores on GPU), except bfloat16 under
    the interpreter, whose bfloat16 ``tl.dot`` is wrong."""
    if dtype == torch.bfloat16 and INTERPRET:
        return tl.float32
    return _TL_DTYPE[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 follows ``torch.backends.cuda.matmul.allow_tf32`` (off by
    default, as in PyTorch), so the triton backend rounds like a float32 ``torch.matmul``."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune candidates: several on a GPU, exactly one under the interpreter."""
    return [interpreter] if INTERPRET else gpu


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 on CPU, i.e. under the interpreter)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def require_dtype(name: str, x: Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: the triton backend takes float16/bfloat16/float32/float64, got {x.dtype}")


def require_matching(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; cast one of them")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def require_targets(targets: Tensor, rows: int) -> None:
    """``targets`` must be ``[rows]`` integers. Their values are trusted, not scanned (that would
    cost a host sync per call): the public API validates labels once. A target outside
    ``[0, V)`` gives its row ``logp = NaN``."""
    if targets.dim() != 1 or targets.shape[0] != rows:
        raise ValueError(f"targets must be [{rows}] (one id per row), got {list(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")


def row_major(x: Tensor) -> Tensor:
    """``x`` with a unit stride in its last dimension (the kernels take one stride per row)."""
    return x if x.stride(-1) == 1 else x.contiguous()
