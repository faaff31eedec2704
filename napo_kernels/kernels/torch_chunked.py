"""The ``torch`` backend: chunked pure-PyTorch kernels, always available.

Every backend implements these five functions with the same contract (see ``napo_kernels.dispatch``):

- ``linear_logprobs_fwd(hidden [R,H], weight [V,H], bias [V]|None, targets [R], chunk_size,
  compute_expected, softcap=None, logit_scale=1.0) -> (logp [R], lse [R], expected [R,H] or [0])``
  in the accumulation dtype (float64 for float64 inputs, float32 otherwise; fp16 logits are kept in
  float32, beyond fp16's 65504, in every backend but ``cuda``). The head's logits are
  ``z = logit_scale * (h W^T + b)``, then with a ``softcap`` ``z = softcap * tanh(z / softcap)``;
  ``expected = sum_v softmax(z)_v (dz_v / draw_v) W_v`` (``softmax(z) @ W`` for a plain head) is what
  the frozen-``lm_head`` backward needs: ``d logp / d h = (dz_y / draw_y) W_y - expected``.
- ``linear_logprobs_bwd(grad [R], hidden, weight, bias, targets, lse, chunk_size, need_hidden,
  need_weight, need_bias, softcap=None, logit_scale=1.0) -> (d_hidden, d_weight, d_bias)`` (empty
  tensors where not needed).
- ``logits_logprobs_fwd(logits [R,V], targets, chunk_size) -> (logp, lse)`` and
  ``logits_logprobs_bwd(grad, logits, targets, lse, chunk_size) -> d_logits``.
- ``preference_fwd(chosen [B], rejected [M], select [B,M], coef [B,M], margin [B,M], agg)
  -> (loss_rows [B], weights [B,M])`` where ``weights = dL_i / dDelta_{i,n}``.

Who validates: the public API (``sequence_logprobs``, ``napo_loss``) checks labels once, with an
error naming the sequence; kernels trust their inputs and do not re-check target values. None reads
outside a row for a target outside ``[0, V)``: the cpp, cuda and triton kernels give that row
``logp = NaN``, this backend raises torch's own index error.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_LSE = 0
AGG_MEAN = 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _wide(x: Tensor) -> bool:
    """fp16 holds at most 65504: its logits (and the products that read them) are kept in fp32, as
    the Triton kernels do (bf16 has float32's range and stays in bf16)."""
    return x.dtype == torch.float16


# torch.mm(..., out_dtype=torch.float32) multiplies fp16 operands into an fp32 output on CUDA (torch
# >= 2.8); the CPU has no such product, so there the fp16 operands are converted to fp32 instead.
_CUDA_OUT_DTYPE = [True]


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in fp32 for fp16 (or fp32) operands."""
    if a.dtype == b.dtype == torch.float16 and a.is_cuda and _CUDA_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # an older torch: convert as on the CPU
            _CUDA_OUT_DTYPE[0] = False
    return a.float() @ b.float()


def _gemm_weight(weight: Tensor) -> Tensor:
    """The weight as the products read it: for fp16 on the CPU a float32 copy, made once per call
    (a [V, H] temporary; the CPU has no fp16 product with an fp32 output); else itself."""
    return weight.float() if _wide(weight) and not weight.is_cuda else weight


def _logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype, softcap: float | None, scale: float
) -> tuple[Tensor, Tensor | float]:
    """The head's logits ``z`` in ``acc`` and ``dz/draw`` (a float when it is constant; with a
    soft cap a second ``[chunk, V]`` block). ``weight`` is ``_gemm_weight``'s."""
    if _wide(h):  # fp32 output: an fp16 one overflows to inf beyond 65504
        out = _mm32(h, weight.T)
        z = out if bias is None else out.add_(bias)
    else:  # one GEMM in the input dtype (fast path for bf16 on GPU), accumulated by the BLAS
        out = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        z = out.to(acc)  # a fresh tensor (the GEMM's own for fp32/fp64): changed in place below
    if softcap is None:
        return (z.mul_(scale) if scale != 1.0 else z), scale
    u = z.mul_(scale / softcap)
    # dz/draw = scale (1 - tanh^2) = scale / cosh^2: keeps its precision where tanh saturates
    slope = torch.cosh(u).square_().reciprocal_().mul_(scale)
    return u.tanh_().mul_(softcap), slope


def _product(block: Tensor, other: Tensor, dtype: torch.dtype) -> Tensor:
    """``block @ other`` for a probabilities / gradient block in the accumulation dtype: fp16 in
    fp32 (the block is rounded to fp16 first on CUDA, where the product takes fp16 operands), else
    in the input ``dtype`` as the BLAS computes it."""
    if dtype == torch.float16:
        return _mm32(block.to(dtype) if other.is_cuda else block, other)
    return block.to(dtype) @ other


def _times(x: Tensor, slope: Tensor | float) -> Tensor:
    """``x * dz/draw`` in place (nothing to do for a plain head)."""
    return x if isinstance(slope, float) and slope == 1.0 else x.mul_(slope)


def linear_logprobs_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int,
    compute_expected: bool,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(hidden.dtype)
    rows, h = hidden.shape
    logp = hidden.new_empty(rows, dtype=acc)
    lse = hidden.new_empty(rows, dtype=acc)
    expected = hidden.new_empty((rows, h) if compute_expected else (0,), dtype=acc)
    w = _gemm_weight(weight)
    for lo in range(0, rows, chunk_size):
        hi = min(lo + chunk_size, rows)
        logits, slope = _logits(hidden[lo:hi], w, bias, acc, softcap, logit_scale)
        chunk_lse = torch.logsumexp(logits, dim=-1)
        lse[lo:hi] = chunk_lse
        logp[lo:hi] = logits.gather(1, targets[lo:hi, None]).squeeze(1) - chunk_lse
        if compute_expected:
            probs = logits.sub_(chunk_lse[:, None]).exp_()  # in place: one [chunk, V] block alive
            expected[lo:hi] = _product(_times(probs, slope), w, weight.dtype)
    return logp, lse, expected


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
) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(hidden.dtype)
    rows = hidden.shape[0]
    # contiguous outputs, as every backend and the fakes (kernels/fakes.py)
    d_hidden = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    d_weight = weight.new_zeros(weight.shape, dtype=acc) if need_weight else weight.new_empty(0)
    d_bias = (
        torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else weight.new_empty(0)
    )
    w = _gemm_weight(weight)
    for lo in range(0, rows, chunk_size):
        hi = min(lo + chunk_size, rows)
        logits, slope = _logits(hidden[lo:hi], w, bias, acc, softcap, logit_scale)
        # d s / d raw logits = (onehot - softmax) dz/draw, scaled by the upstream gradient of each row
        g = logits.sub_(lse[lo:hi, None]).exp_().mul_(-grad[lo:hi, None])
        g = _times(g.scatter_add_(1, targets[lo:hi, None], grad[lo:hi, None].to(acc)), slope)
        if need_hidden:
            d_hidden[lo:hi] = _product(g, w, weight.dtype).to(hidden.dtype)
        if need_weight:
            if _wide(weight) and not weight.is_cuda:  # fp32 operands, summed in place in fp32
                d_weight.addmm_(g.T, hidden[lo:hi].float())
            elif _wide(weight):
                d_weight.add_(_product(g.T, hidden[lo:hi], weight.dtype))
            elif d_weight.dtype == weight.dtype:
                d_weight.addmm_(g.to(weight.dtype).T, hidden[lo:hi])  # in place, no [V, H] temporary
            else:
                d_weight.add_(g.to(weight.dtype).T @ hidden[lo:hi])
        if need_bias:
            d_bias.add_(g.sum(0))
    if need_weight:
        d_weight = d_weight.to(weight.dtype)
    if need_bias:
        d_bias = d_bias.to(bias.dtype if bias is not None else weight.dtype)
    return d_hidden, d_weight, d_bias


def logits_logprobs_fwd(logits: Tensor, targets: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(logits.dtype)
    rows = logits.shape[0]
    logp = logits.new_empty(rows, dtype=acc)
    lse = logits.new_empty(rows, dtype=acc)
    for lo in range(0, rows, chunk_size):
        hi = min(lo + chunk_size, rows)
        block = logits[lo:hi].to(acc)
        lse[lo:hi] = torch.logsumexp(block, dim=-1)
        logp[lo:hi] = block.gather(1, targets[lo:hi, None]).squeeze(1) - lse[lo:hi]
    return logp, lse


def logits_logprobs_bwd(
    grad: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, chunk_size: int
) -> Tensor:
    acc = acc_dtype(logits.dtype)
    out = logits.new_empty(logits.shape)
    for lo in range(0, logits.shape[0], chunk_size):
        hi = min(lo + chunk_size, logits.shape[0])
        # out-of-place first op: for fp32/fp64 ``.to(acc)`` is the caller's tensor itself
        g = (logits[lo:hi].to(acc) - lse[lo:hi, None]).exp_().mul_(-grad[lo:hi, None])
        g.scatter_add_(1, targets[lo:hi, None], grad[lo:hi, None].to(acc))
        out[lo:hi] = g
    return out


def preference_fwd(
    chosen: Tensor, rejected: Tensor, select: Tensor, coef: Tensor, margin: Tensor, agg: int
) -> tuple[Tensor, Tensor]:
    """``z_i = agg_{n in select_i}(coef_in * Delta_in + margin_in)``, ``L_i = softplus(z_i)``.

    ``agg`` is log-sum-exp (S-DPO, NAPO, DPO) or the mean (DMPO, DynamicPO); the returned weights
    are ``dL_i/dDelta_in = sigmoid(z_i) * a_in * coef_in`` with ``a`` the softmax (LSE) or
    ``1/|select_i|`` (mean).
    """
    delta = rejected[None, :] - chosen[:, None]
    x = coef * delta + margin
    if agg == AGG_LSE:
        x = x.masked_fill(~select, float("-inf"))
        z = torch.logsumexp(x, dim=-1)
        a = torch.exp(x - z[:, None])
    else:
        count = select.sum(-1).to(x.dtype)
        a = select.to(x.dtype) / count[:, None]
        z = (a * x).sum(-1)
    # log(1 + e^z) exactly (F.softplus returns z itself above its threshold of 20: off by e^-z)
    rows = torch.logaddexp(z, torch.zeros_like(z))
    weights = torch.sigmoid(z)[:, None] * a * coef
    return rows, weights
