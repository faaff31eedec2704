"""The ``cpp`` (CPU) and ``cuda`` backends: thin calls into the ``napo_C`` ops of ``csrc/``.

The C++ ops are declared once in ``csrc/ops.cpp`` with ``TORCH_LIBRARY`` schemas and implemented
per device (``csrc/cpu``, ``csrc/cuda``); the dispatcher picks the implementation from the tensors'
device. Contract: as in ``napo_kernels.kernels.torch_chunked``.
"""

from __future__ import annotations

import torch
from torch import Tensor

import napo_kernels._C  # noqa: F401  (loads the library that registers torch.ops.napo_C)

_ops = torch.ops.napo_C


def linear_logprobs_fwd(hidden, weight, bias, targets, chunk_size, compute_expected):
    return _ops.linear_logprobs_fwd(hidden, weight, bias, targets, chunk_size, compute_expected)


def linear_logprobs_bwd(
    grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias
):
    return _ops.linear_logprobs_bwd(
        grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias
    )


def logits_logprobs_fwd(logits: Tensor, targets: Tensor, chunk_size: int):
    return _ops.logits_logprobs_fwd(logits, targets)


def logits_logprobs_bwd(grad: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, chunk_size: int):
    return _ops.logits_logprobs_bwd(grad, logits, targets, lse)


def preference_fwd(chosen, rejected, select, coef, margin, agg):
    return _ops.preference_fwd(chosen, rejected, select, coef, margin, agg)
