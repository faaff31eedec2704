"""Stage 1 as ``torch.library`` custom ops: per-row log-probs of a linear projection, chunked.

``napo_kernels::linear_logprobs`` returns ``(logp [R], lse [R], expected [R, H] or [0])``. Its
hand-written backward has two shapes (see docs/design.md):

- trainable ``lm_head``: ``napo_kernels::linear_logprobs_backward`` recomputes each logits chunk
  from the saved ``lse`` and produces the hidden, weight and bias gradients;
- frozen ``lm_head`` (``compute_expected=True``): the forward also returns ``E = softmax(logits) W``,
  so ``d hidden_r = g_r (W[y_r] - E_r)`` needs no vocabulary work in the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from ..kernels import fakes


@torch.library.custom_op("napo_kernels::linear_logprobs", mutates_args=())
def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int,
    compute_expected: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(logp, lse, expected)`` of ``hidden @ weight^T (+ bias)`` on ``backend``.

    Inputs are trusted: ``targets`` must lie in ``[0, V)`` (not re-checked here; the public API
    validates labels, see ``napo_kernels.kernels.torch_chunked``)."""
    return dispatch.kernels(backend).linear_logprobs_fwd(
        hidden, weight, bias, targets, chunk_size, compute_expected
    )


@linear_logprobs.register_fake
def _(hidden, weight, bias, targets, chunk_size, compute_expected, backend):
    return fakes.linear_logprobs_fwd(hidden, compute_expected)


@torch.library.custom_op("napo_kernels::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_hidden, d_weight, d_bias)`` of ``sum(grad * logp)``; inputs trusted as in the forward."""
    return dispatch.kernels(backend).linear_logprobs_bwd(
        grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias
    )


@linear_logprobs_backward.register_fake
def _(grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias, backend):
    return fakes.linear_logprobs_bwd(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, chunk_size, compute_expected, backend = inputs
    _, lse, expected = output
    ctx.chunk_size, ctx.compute_expected, ctx.backend = chunk_size, compute_expected, backend
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, targets, lse, expected)


def _backward(ctx, grad_logp, grad_lse, grad_expected):
    hidden, weight, bias, targets, lse, expected = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_logp is None:
        return None, None, None, None, None, None, None
    grad = grad_logp.to(lse.dtype)
    if ctx.compute_expected and not (need_weight or need_bias):
        # frozen lm_head: d s_r / d h_r = W[y_r] - E_r, no vocabulary work
        d_hidden = None
        if need_hidden:
            d_hidden = (grad[:, None] * (weight[targets].to(expected.dtype) - expected)).to(hidden.dtype)
        return d_hidden, None, None, None, None, None, None
    d_hidden, d_weight, d_bias = linear_logprobs_backward(
        grad, hidden, weight, bias, targets, lse, ctx.chunk_size,
        need_hidden, need_weight, need_bias and ctx.has_bias, ctx.backend,
    )  # fmt: skip
    return (
        d_hidden if need_hidden else None,
        d_weight if need_weight else None,
        d_bias if need_bias and ctx.has_bias else None,
        None,
        None,
        None,
        None,
    )


linear_logprobs.register_autograd(_backward, setup_context=_setup_context)
