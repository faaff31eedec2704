"""Stage 1 as ``torch.library`` custom ops: per-row log-probs of a linear projection, chunked.

``napo_kernels::linear_logprobs`` returns ``(logp [R], lse [R], expected [R, H] or [0])`` of the
head's logits ``z = logit_scale * (h W^T + b)``, soft-capped to ``softcap * tanh(z / softcap)`` when
``softcap`` is given. When the hidden states need a gradient (``compute_expected=True``) the forward
also returns ``E = sum_v softmax(z)_v (dz_v / draw_v) W_v`` (``softmax(z) W`` for a plain head), so
that ``d hidden_r = g_r (c_r W[y_r] - E_r)`` needs no vocabulary work in the backward (see
docs/design.md). The target's slope ``c_r = dz_y / draw_y`` is ``logit_scale`` without a cap, and
with one ``logit_scale / cosh^2(logit_scale raw_y / softcap)`` from the target's raw logit
``raw_y = h_r . W[y_r] + b[y_r]`` (one dot product per row). A frozen ``lm_head`` needs nothing
else; a trainable one gets its weight and bias gradients from
``napo_kernels::linear_logprobs_backward``, which recomputes the logits from the saved ``lse``.
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
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(logp, lse, expected)`` of the head's logits on ``backend`` (module docstring).

    Inputs are trusted: ``targets`` must lie in ``[0, V)``, ``softcap`` be None or > 0 and
    ``logit_scale`` > 0 (not re-checked here; the public API validates them, see
    ``napo_kernels.kernels.torch_chunked``)."""
    return dispatch.kernels(backend).linear_logprobs_fwd(
        hidden, weight, bias, targets, chunk_size, compute_expected, softcap, logit_scale
    )


@linear_logprobs.register_fake
def _(hidden, weight, bias, targets, chunk_size, compute_expected, backend, softcap=None, logit_scale=1.0):
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
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_hidden, d_weight, d_bias)`` of ``sum(grad * logp)``; inputs trusted as in the forward."""
    return dispatch.kernels(backend).linear_logprobs_bwd(
        grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias,
        softcap, logit_scale,
    )  # fmt: skip


@linear_logprobs_backward.register_fake
def _(
    grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias, backend,
    softcap=None, logit_scale=1.0,
):  # fmt: skip
    return fakes.linear_logprobs_bwd(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, chunk_size, compute_expected, backend, softcap, logit_scale = inputs
    _, lse, expected = output
    ctx.chunk_size, ctx.compute_expected, ctx.backend = chunk_size, compute_expected, backend
    ctx.softcap, ctx.logit_scale = softcap, logit_scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, targets, lse, expected)


def _target_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, acc, ctx) -> Tensor:
    """``c_r W[y_r]`` in the accumulation dtype: the target's term of ``d logp_r / d h_r``."""
    w_y = weight[targets].to(acc)
    if ctx.softcap is not None:
        raw = (hidden.to(acc) * w_y).sum(-1)
        if bias is not None:
            raw = raw + bias[targets].to(acc)
        # 1 - tanh^2 = 1 / cosh^2: keeps its precision where tanh saturates
        slope = torch.cosh(raw * (ctx.logit_scale / ctx.softcap)).square_().reciprocal_()
        return w_y * (ctx.logit_scale * slope)[:, None]
    return w_y * ctx.logit_scale if ctx.logit_scale != 1.0 else w_y


def _backward(ctx, grad_logp, grad_lse, grad_expected):
    hidden, weight, bias, targets, lse, expected = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    nothing = (None,) * 6  # targets, chunk_size, compute_expected, backend, softcap, logit_scale
    if grad_logp is None:
        return None, None, None, *nothing
    grad = grad_logp.to(lse.dtype)
    d_hidden = d_weight = d_bias = None
    need_bias = need_bias and ctx.has_bias
    from_expected = need_hidden and ctx.compute_expected
    if from_expected:  # d s_r / d h_r = c_r W[y_r] - E_r: no vocabulary work
        target_rows = _target_rows(hidden, weight, bias, targets, lse.dtype, ctx)
        d_hidden = (grad[:, None] * (target_rows - expected)).to(hidden.dtype)
    if need_weight or need_bias or (need_hidden and not from_expected):
        rest = need_hidden and not from_expected
        d_h, d_w, d_b = linear_logprobs_backward(
            grad, hidden, weight, bias, targets, lse, ctx.chunk_size,
            rest, need_weight, need_bias, ctx.backend, ctx.softcap, ctx.logit_scale,
        )  # fmt: skip
        d_hidden = d_hidden if from_expected else (d_h if need_hidden else None)
        d_weight, d_bias = (d_w if need_weight else None), (d_b if need_bias else None)
    return d_hidden, d_weight, d_bias, *nothing


linear_logprobs.register_autograd(_backward, setup_context=_setup_context)
