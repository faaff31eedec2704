"""Output shapes and dtypes of the kernel contract (``torch_chunked``'s docstring), written once.

These are the fake (meta) implementations of both operator families: the ``napo_C`` ops of the C++
extension (registered in ``kernels/extension.py``) and the ``napo_kernels`` custom ops that every
backend runs behind (``napo_kernels/ops/``), so that ``torch.compile`` and ``torch.library.opcheck``
trace them. Every backend allocates its outputs contiguous, in these shapes and dtypes.
"""

from __future__ import annotations

from torch import Tensor

from .torch_chunked import acc_dtype


def linear_logprobs_fwd(hidden: Tensor, compute_expected: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``logp [R]``, ``lse [R]``, ``expected [R, H]`` (or ``[0]``), all in the accumulation dtype."""
    acc = acc_dtype(hidden.dtype)
    rows = hidden.shape[0]
    expected_shape = (rows, hidden.shape[1]) if compute_expected else (0,)
    return (
        hidden.new_empty(rows, dtype=acc),
        hidden.new_empty(rows, dtype=acc),
        hidden.new_empty(expected_shape, dtype=acc),
    )


def kept(hidden: Tensor, weight: Tensor, keep_logits: bool, layout: str = "weight_grad") -> Tensor:
    """The forward's kept logits with ``keep_logits``, else ``[0]``; by ``layout``:
    ``"weight_grad"`` (cpp) ``[V, H]`` raw logits in the weight gradient's memory, accumulation
    dtype; ``"logits"`` (triton) ``[R, V]`` raw logits, accumulation dtype; ``"probs"`` (cuda)
    ``[R, V]`` probabilities in the input dtype (the chunk loop's block)."""
    acc = acc_dtype(hidden.dtype)
    if not keep_logits:
        return hidden.new_empty((0,), dtype=acc)
    if layout == "weight_grad":
        return hidden.new_empty(tuple(weight.shape), dtype=acc)
    rows_by_vocab = (hidden.shape[0], weight.shape[0])
    return hidden.new_empty(rows_by_vocab, dtype=acc if layout == "logits" else hidden.dtype)


def linear_logprobs_bwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, need_hidden: bool, need_weight: bool, need_bias: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``d_hidden``, ``d_weight``, ``d_bias`` in the inputs' dtypes; ``[0]`` where not needed."""
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0], dtype=bias_dtype) if need_bias else weight.new_empty(0),
    )


def logits_logprobs_fwd(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``logp [R]``, ``lse [R]`` in the accumulation dtype."""
    acc = acc_dtype(logits.dtype)
    return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)


def logits_logprobs_bwd(logits: Tensor) -> Tensor:
    """``d_logits [R, V]`` in the logits' dtype."""
    return logits.new_empty(logits.shape)


def preference_fwd(chosen: Tensor, select: Tensor) -> tuple[Tensor, Tensor]:
    """``loss_rows [B]`` and ``weights [B, M]`` in the scores' dtype."""
    return chosen.new_empty(chosen.shape), chosen.new_empty(select.shape)
