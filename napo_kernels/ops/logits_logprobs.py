"""Stage 1 from ready-made logits: per-row log-probs without a ``log_softmax`` tensor.

``napo_kernels::logits_logprobs`` returns ``(logp [R], lse [R])``; the backward writes
``d logits = g (onehot - softmax)`` in one pass per row chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from ..kernels import fakes


@torch.library.custom_op("napo_kernels::logits_logprobs", mutates_args=())
def logits_logprobs(logits: Tensor, targets: Tensor, chunk_size: int, backend: str) -> tuple[Tensor, Tensor]:
    """Per-row ``(logp, lse)`` on ``backend``. Inputs are trusted: ``targets`` must lie in
    ``[0, V)`` (not re-checked here; the public API validates labels)."""
    return dispatch.kernels(backend).logits_logprobs_fwd(logits, targets, chunk_size)


@logits_logprobs.register_fake
def _(logits, targets, chunk_size, backend):
    return fakes.logits_logprobs_fwd(logits)


@torch.library.custom_op("napo_kernels::logits_logprobs_backward", mutates_args=())
def logits_logprobs_backward(
    grad: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, chunk_size: int, backend: str
) -> Tensor:
    """``d logits = grad (onehot - softmax)``; inputs trusted as in the forward."""
    return dispatch.kernels(backend).logits_logprobs_bwd(grad, logits, targets, lse, chunk_size)


@logits_logprobs_backward.register_fake
def _(grad, logits, targets, lse, chunk_size, backend):
    return fakes.logits_logprobs_bwd(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, chunk_size, backend = inputs
    ctx.chunk_size, ctx.backend = chunk_size, backend
    ctx.save_for_backward(logits, targets, output[1])


def _backward(ctx, grad_logp, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    if grad_logp is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    d_logits = logits_logprobs_backward(
        grad_logp.to(lse.dtype), logits, targets, lse, ctx.chunk_size, ctx.backend
    )
    return d_logits, None, None, None


logits_logprobs.register_autograd(_backward, setup_context=_setup_context)
