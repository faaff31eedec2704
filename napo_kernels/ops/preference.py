"""Stage 2 as a ``torch.library`` custom op: the reward matrix over the pool and the loss per prompt.

``napo_kernels::preference_rows(chosen [B], rejected [M], select, coef, margin, agg)`` returns
``(loss_rows [B], weights [B, M])`` with ``weights = dL_i / dDelta_{i,n}``. The backward is two
small reductions of those weights: the positive gets ``-sum_n``, each negative the sum over the rows
that use it (restricted to ``grad_mask`` when shared negatives are detached).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from ..kernels import fakes


@torch.library.custom_op("napo_kernels::preference_rows", mutates_args=())
def preference_rows(
    chosen: Tensor,
    rejected: Tensor,
    select: Tensor,
    coef: Tensor,
    margin: Tensor,
    grad_mask: Tensor | None,
    agg: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(loss_rows, weights)`` on ``backend``. Inputs are trusted (the public API validates them;
    every row must select at least one negative)."""
    return dispatch.kernels(backend).preference_fwd(chosen, rejected, select, coef, margin, agg)


@preference_rows.register_fake
def _(chosen, rejected, select, coef, margin, grad_mask, agg, backend):
    return fakes.preference_fwd(chosen, select)


def _setup_context(ctx, inputs, output) -> None:
    grad_mask = inputs[5]
    ctx.save_for_backward(output[1], grad_mask)


def _backward(ctx, grad_rows, grad_weights):
    weights, grad_mask = ctx.saved_tensors
    if grad_rows is None:
        return (None,) * 8
    w = grad_rows[:, None] * weights
    d_chosen = -w.sum(1)
    if grad_mask is not None:
        w = w * grad_mask
    d_rejected = w.sum(0)
    return d_chosen, d_rejected, None, None, None, None, None, None


preference_rows.register_autograd(_backward, setup_context=_setup_context)
