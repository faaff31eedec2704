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
``napo_kernels::linear_logprobs_backward``, which recomputes the logits from the saved ``lse``, or,
with ``keep_logits=True`` (see ``keeps_logits``), reads what the forward kept: the fourth output
``kept``, a ``[V, H]`` buffer of raw logits that becomes the weight gradient on the ``cpp``
backend, the ``[R, V]`` raw logits on ``triton``, the ``[R, V]`` probabilities on ``cuda`` (both
within the memory budget).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import dispatch
from ..kernels import fakes

# fp32/fp64, and fp16 (whose products the CPU runs in fp32): bf16 logits are recomputed
_KEPT_DTYPES = (torch.float32, torch.float64, torch.float16)
# triton, 16-bit heads: reading the kept fp32 logits back (2 x 4 bytes per logit, written and read
# once) beats recomputing them (2 H flops per logit) only where the product is long: an H100/H200
# does ~300 bf16 tensor-core flops per byte of HBM, so H >~ 1200 at peak, less at a real GEMM's
# efficiency. An estimate, not a measurement (no GPU here): `make gpu-check` times both.
_TRITON_KEEP_MIN_HIDDEN = 1024
# what each backend keeps (fakes.kept); the backward of cpp and cuda overwrites it (cpp with the
# weight gradient, returned from it), triton's only reads it
_KEPT_LAYOUT = {"cpp": "weight_grad", "triton": "logits", "cuda": "probs"}
_GRAD_IN_KEPT = ("cpp",)
_CONSUMED = ("cpp", "cuda")


def keeps_logits(backend: str, rows: int, weight: Tensor, chunk_size: int) -> bool:
    """Whether a trainable head's forward on ``backend`` keeps what it computed for the backward,
    which saves the backward's product that recomputes the logits:

    - ``cpp``: when they fit the weight gradient's memory (``rows <= H``; the gradient is
      allocated by the forward instead of the backward, so the step's peak memory does not change)
      and the backward's scratch, all rows of one vocabulary tile, fits the ``[chunk_size, V]``
      budget;
    - ``triton``: when the ``[rows, V]`` logits in the accumulation dtype fit the same budget
      (``rows <= chunk_size``) and reading them back pays (fp32/fp64 heads, or ``H >= 1024`` for
      fp16/bf16; ``_TRITON_KEEP_MIN_HIDDEN``);
    - ``cuda``: when every row fits one chunk (``rows <= chunk_size``): the chunk loop's
      ``[rows, V]`` block, which holds the probabilities after the forward, is kept instead of
      freed; the backward turns it into the gradient without the product and the exp pass.

    ``NAPO_KERNELS_KEEP_LOGITS=0`` turns it off, ``=1`` keeps wherever the memory fits (whether it
    pays or not: for timing both ways). The buffer lives from the forward to the backward: many
    forwards before one backward hold one each."""
    flag = os.environ.get("NAPO_KERNELS_KEEP_LOGITS", "")
    if flag == "0" or rows <= 0:
        return False
    if backend == "triton":
        pays = flag == "1" or weight.dtype in (torch.float32, torch.float64)
        # a [chunk_size, V] block in the accumulation dtype, as every backend's (fp64: twice the bytes)
        return rows <= chunk_size and (pays or weight.shape[1] >= _TRITON_KEEP_MIN_HIDDEN)
    if backend == "cuda":
        return rows <= chunk_size
    if not (
        backend == "cpp"
        and weight.device.type == "cpu"
        and weight.dtype in _KEPT_DTYPES
        and rows <= weight.shape[1]
    ):
        return False
    from ..kernels.extension import cpu_block_shape  # the cpp backend is available: _C loads

    width = cpu_block_shape(rows, weight.shape[0], chunk_size)[1]
    return rows * width <= chunk_size * weight.shape[0]


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
    keep_logits: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row ``(logp, lse, expected, kept)`` of the head's logits on ``backend`` (module
    docstring); ``kept`` as ``fakes.kept`` lays it out for the backend with ``keep_logits`` (only
    where ``keeps_logits`` says so), else ``[0]``.

    Inputs are trusted: ``targets`` must lie in ``[0, V)``, ``softcap`` be None or > 0 and
    ``logit_scale`` > 0 (not re-checked here; the public API validates them, see
    ``napo_kernels.kernels.torch_chunked``)."""
    kernels = dispatch.kernels(backend)
    args = (hidden, weight, bias, targets, chunk_size, compute_expected, softcap, logit_scale)
    if keep_logits:
        if not keeps_logits(backend, hidden.shape[0], weight, chunk_size):
            raise ValueError(
                f"keep_logits=True: backend {backend!r} does not keep these logits (keeps_logits)"
            )
        return kernels.linear_logprobs_fwd(*args, keep_logits=True)
    return (*kernels.linear_logprobs_fwd(*args), fakes.kept(hidden, weight, False))


@linear_logprobs.register_fake
def _(
    hidden, weight, bias, targets, chunk_size, compute_expected, backend, softcap=None, logit_scale=1.0,
    keep_logits=False,
):  # fmt: skip
    kept = fakes.kept(hidden, weight, keep_logits, _KEPT_LAYOUT.get(backend, "logits"))
    return (*fakes.linear_logprobs_fwd(hidden, compute_expected), kept)


@torch.library.custom_op("napo_kernels::linear_logprobs_backward", mutates_args=("kept",))
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
    kept: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_hidden, d_weight, d_bias)`` of ``sum(grad * logp)``; inputs trusted as in the forward.
    With ``kept`` (the forward's) the logits are not recomputed; on ``cpp`` the weight gradient is
    written into it (in the accumulation dtype) and ``d_weight`` comes back empty; on ``cpp`` and
    ``cuda`` it is overwritten."""
    args = (grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias,
            softcap, logit_scale)  # fmt: skip
    kernels = dispatch.kernels(backend)
    if kept is None:
        return kernels.linear_logprobs_bwd(*args)
    return kernels.linear_logprobs_bwd(*args, kept=kept)


@linear_logprobs_backward.register_fake
def _(
    grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden, need_weight, need_bias, backend,
    softcap=None, logit_scale=1.0, kept=None,
):  # fmt: skip
    into_kept = kept is not None and backend in _GRAD_IN_KEPT
    return fakes.linear_logprobs_bwd(
        hidden, weight, bias, need_hidden, need_weight and not into_kept, need_bias
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, chunk_size, compute_expected, backend, softcap, logit_scale, keep = inputs
    _, lse, expected, kept = output
    ctx.chunk_size, ctx.compute_expected, ctx.backend = chunk_size, compute_expected, backend
    ctx.softcap, ctx.logit_scale, ctx.keep_logits = softcap, logit_scale, keep
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(lse, expected, kept)
    ctx.set_materialize_grads(False)  # else autograd builds zero gradients for them: [V, H] for kept
    # cpp, cuda: the first backward overwrites what was kept (cpp: with the weight gradient)
    ctx.grad_in_kept = keep and backend in _GRAD_IN_KEPT
    ctx.consumes_kept = keep and backend in _CONSUMED
    ctx.kept_consumed = False
    ctx.save_for_backward(hidden, weight, bias, targets, lse, expected, kept)


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


def _backward(ctx, grad_logp, grad_lse, grad_expected, grad_kept):
    hidden, weight, bias, targets, lse, expected, kept = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    # targets, chunk_size, compute_expected, backend, softcap, logit_scale, keep_logits
    nothing = (None,) * 7
    if grad_logp is None:
        return None, None, None, *nothing
    grad = grad_logp.to(lse.dtype)
    d_hidden = d_weight = d_bias = None
    need_bias = need_bias and ctx.has_bias
    from_expected = need_hidden and ctx.compute_expected
    # the weight and bias gradients first: their scratch is freed before the hidden gradient exists
    if need_weight or need_bias or (need_hidden and not from_expected):
        rest = need_hidden and not from_expected
        if ctx.consumes_kept and ctx.kept_consumed:
            # another backward through the same graph (retain_graph, gradcheck): the logits kept
            # again by the same products, so the same bits
            head = (ctx.softcap, ctx.logit_scale)
            kept = linear_logprobs(
                hidden, weight, bias, targets, ctx.chunk_size, False, ctx.backend, *head, True
            )[3]
        # .data: the saved tensor keeps its version, so another backward can still unpack the others
        kept = kept.data if ctx.keep_logits else None
        ctx.kept_consumed = ctx.consumes_kept
        d_h, d_w, d_b = linear_logprobs_backward(
            grad, hidden, weight, bias, targets, lse, ctx.chunk_size, rest, need_weight, need_bias,
            ctx.backend, ctx.softcap, ctx.logit_scale, kept,
        )  # fmt: skip
        if ctx.grad_in_kept and need_weight:  # written into the kept buffer (accumulation dtype)
            d_w = kept if kept.dtype == weight.dtype else kept.to(weight.dtype)
        d_hidden = d_h if rest else None
        d_weight, d_bias = (d_w if need_weight else None), (d_b if need_bias else None)
    if from_expected:  # d s_r / d h_r = c_r W[y_r] - E_r: no vocabulary work
        target_rows = _target_rows(hidden, weight, bias, targets, lse.dtype, ctx)
        d_hidden = (grad[:, None] * (target_rows - expected)).to(hidden.dtype)
    return d_hidden, d_weight, d_bias, *nothing


linear_logprobs.register_autograd(_backward, setup_context=_setup_context)
