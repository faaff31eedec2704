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


def _interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a loop bound (a scalar held as a one-element array) into an
    int with ``int(array)``, which numpy >= 2.4 refuses for arrays of one dimension; later Triton
    squeezes the array first. Re-apply its ``__index__`` that way (interpreter only; private names,
    so nothing happens where they are not found)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "napo_squeezed_index", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch.napo_squeezed_index = True
    interpreter._patch_lang_tensor = patch


if INTERPRET:
    _interpreter_loop_bounds()

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


@triton.jit
def tanh_sech2(x):
    """``(tanh(x), 1 - tanh(x)^2)`` in ``x``'s float dtype from ``tl.exp`` (the interpreter has no
    libdevice), as ``tanh_vectorizable`` of ``csrc/napo_math.h``. With ``e = exp(-2|x|)``: tanh is
    ``(1 - e) / (1 + e)`` where ``1 - e`` does not cancel, below that the Taylor series
    ``x (1 + x^2 P(x^2))`` to x^19 (float32: exact to 1e-8 below 0.625; float64 needs the smaller
    range, 1e-24 below 0.1); ``1 - tanh^2 = 4 e / (1 + e)^2`` keeps its relative precision where
    tanh saturates."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)  # 0 for |x| = inf: tanh = +-1, sech2 = 0
    large = (1.0 - e) / (1.0 + e)
    sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
    limit: tl.constexpr = 0.625 if x.dtype == tl.float32 else 0.1
    b = tl.minimum(a, limit)  # the series only where it is used (no overflow beyond)
    s = b * b
    p = s * (-443861162.0 / 1856156927625.0) + 6404582.0 / 10854718875.0
    p = p * s - 929569.0 / 638512875.0
    p = p * s + 21844.0 / 6081075.0
    p = p * s - 1382.0 / 155925.0
    p = p * s + 62.0 / 2835.0
    p = p * s - 17.0 / 315.0
    p = p * s + 2.0 / 15.0
    p = p * s - 1.0 / 3.0
    small = b + b * s * p
    t = tl.where(a < limit, small, large)  # NaN: large is NaN
    return tl.where(x < 0, -t, t), sech2


@triton.jit
def head_logits(raw, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """``(z, dz/draw)`` of the head's logits from raw ``h W^T + b`` (as the maps of
    ``csrc/napo_math.h``): ``z = SCALE * raw``, then with ``SOFTCAP > 0``
    ``z = SOFTCAP * tanh(z / SOFTCAP)``. Both are compile-time constants, so a plain head (1, 0)
    compiles to exactly the plain kernel; the slope is then the constant 1."""
    if SOFTCAP > 0:
        t, sech2 = tanh_sech2(raw * (SCALE / SOFTCAP))
        return t * SOFTCAP, SCALE * sech2
    elif SCALE != 1.0:
        return raw * SCALE, SCALE
    else:
        return raw, 1.0


def head_constants(softcap: float | None, logit_scale: float) -> dict:
    """The ``SCALE`` / ``SOFTCAP`` constexprs of :func:`head_logits` (``SOFTCAP = 0``: none)."""
    return dict(SCALE=float(logit_scale), SOFTCAP=float(softcap) if softcap is not None else 0.0)


def row_major(x: Tensor) -> Tensor:
    """``x`` with a unit stride in its last dimension (the kernels take one stride per row)."""
    return x if x.stride(-1) == 1 else x.contiguous()
