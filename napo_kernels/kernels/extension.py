"""The ``cpp`` (CPU) and ``cuda`` backends: thin calls into the ``napo_C`` ops of ``csrc/``.

The C++ ops are declared once in ``csrc/ops.cpp`` with ``TORCH_LIBRARY`` schemas and implemented
per device (``csrc/cpu``, ``csrc/cuda``); the dispatcher picks the implementation from the tensors'
device. Contract: as in ``napo_kernels.kernels.torch_chunked``. This module also registers the
fake (meta) implementations, so ``torch.compile`` and ``torch.library.opcheck`` can trace the ops
(``csrc/ops.cpp`` names this module as the place they live). The ops check shapes and dtypes but
trust target values (the public API validates labels; an out-of-range target gives ``logp = NaN``).
"""

from __future__ import annotations

import torch
from torch import Tensor

import napo_kernels._C  # noqa: F401  (loads the library that registers torch.ops.napo_C)

from . import fakes

_ops = torch.ops.napo_C


def cpu_block_shape(rows: int, vocab: int, chunk_size: int) -> tuple[int, int]:
    """``(rows, columns)`` of the logits block the CPU kernel works in for a ``[chunk_size, V]``
    budget: the whole vocabulary when it fits one tile, else the budget reshaped into tiles of up
    to 1024 rows x 512 columns (never fewer rows than ``chunk_size``). Computed by the kernel's own
    plan (``csrc/cpu/tiled_linear.h``), ``NAPO_KERNELS_CPU_VOCAB_TILE`` included."""
    block_rows, width = _ops.cpu_block_shape(rows, vocab, chunk_size)
    return block_rows, width


def _kept_layout(hidden: Tensor) -> str:
    """What the ``napo_C`` ops keep on this device (``fakes.kept``)."""
    return "probs" if hidden.device.type == "cuda" else "weight_grad"


def linear_logprobs_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int,
    compute_expected: bool,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    keep_logits: bool = False,
) -> tuple[Tensor, ...]:
    """The contract's ``(logp, lse, expected)``; with ``keep_logits`` a fourth output for the
    backward: on the CPU the raw logits kept in a ``[V, H]`` buffer (``csrc/cpu/tiled_linear.h``),
    on CUDA the ``[R, V]`` block of probabilities (``csrc/chunked_linear.h``)."""
    out = _ops.linear_logprobs_fwd(
        hidden, weight, bias, targets, chunk_size, compute_expected, softcap, logit_scale, keep_logits
    )
    return tuple(out) if keep_logits else tuple(out[:3])


def linear_logprobs_bwd(
    grad: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    kept: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """With ``kept`` (the forward's fourth output, overwritten): on the CPU the weight gradient is
    written into it and ``d_weight`` comes back empty."""
    return _ops.linear_logprobs_bwd(
        grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias,
        softcap, logit_scale, kept,
    )  # fmt: skip


def logits_logprobs_fwd(logits: Tensor, targets: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    # The C++ pass streams each row once, so it needs no chunking: chunk_size is accepted for the contract.
    return _ops.logits_logprobs_fwd(logits, targets)


def logits_logprobs_bwd(
    grad: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, chunk_size: int
) -> Tensor:
    return _ops.logits_logprobs_bwd(grad, logits, targets, lse)


def preference_fwd(
    chosen: Tensor, rejected: Tensor, select: Tensor, coef: Tensor, margin: Tensor, agg: int
) -> tuple[Tensor, Tensor]:
    return _ops.preference_fwd(chosen, rejected, select, coef, margin, agg)


# Fake implementations: the shapes of kernels/fakes.py (one definition for every op family).


@torch.library.register_fake("napo_C::linear_logprobs_fwd")
def _(
    hidden,
    weight,
    bias,
    targets,
    chunk_size,
    compute_expected,
    softcap=None,
    logit_scale=1.0,
    keep_logits=False,
):
    layout = _kept_layout(hidden)
    return (
        *fakes.linear_logprobs_fwd(hidden, compute_expected),
        fakes.kept(hidden, weight, keep_logits, layout),
    )


@torch.library.register_fake("napo_C::linear_logprobs_bwd")
def _(
    grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias,
    softcap=None, logit_scale=1.0, kept=None,
):  # fmt: skip
    into_kept = kept is not None and _kept_layout(hidden) == "weight_grad"
    return fakes.linear_logprobs_bwd(
        hidden, weight, bias, need_hidden, need_weight and not into_kept, need_bias
    )


@torch.library.register_fake("napo_C::logits_logprobs_fwd")
def _(logits, targets):
    return fakes.logits_logprobs_fwd(logits)


@torch.library.register_fake("napo_C::logits_logprobs_bwd")
def _(grad, logits, targets, lse):
    return fakes.logits_logprobs_bwd(logits)


@torch.library.register_fake("napo_C::preference_fwd")
def _(chosen, rejected, select, coef, margin, agg):
    return fakes.preference_fwd(chosen, select)
