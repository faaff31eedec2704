"""Triton stage 1 from ready-made logits: per-row log-probs and their gradient, no softmax tensor.

- ``_forward_kernel``: one program per row block sweeps the vocabulary with an online
  log-sum-exp and picks the target's logit (``logp = logit[y] - lse``).
- ``_backward_kernel``: one program per (row block, vocabulary block) writes
  ``d logits = g (onehot - exp(logits - lse))`` straight into the gradient, in the logits' dtype.

Both are memory-bound (one read of the logits forward, one read and one write backward).
Accumulation is float32 (float64 for float64 logits); ``chunk_size`` is not used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import acc_dtype, configs, require_dtype, require_targets, row_major, tl_acc

# Candidates for Ampere/Hopper (unverified on hardware here): wide vocabulary tiles, few rows.
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_R": 1, "BLOCK_V": 4096}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 4, "BLOCK_V": 1024}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 8, "BLOCK_V": 512}, num_warps=4, num_stages=4),
]
_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_R": 4, "BLOCK_V": 1024}, num_warps=4),
    triton.Config({"BLOCK_R": 8, "BLOCK_V": 512}, num_warps=4),
    triton.Config({"BLOCK_R": 1, "BLOCK_V": 4096}, num_warps=8),
]
# Under the interpreter: small blocks, so odd test shapes span several tiles.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_R": 16, "BLOCK_V": 32}, num_warps=4, num_stages=1)


@triton.autotune(configs=configs(_FORWARD_CONFIGS, _INTERPRETER_CONFIG), key=["V"])
@triton.jit
def _forward_kernel(
    x_ptr, t_ptr, logp_ptr, lse_ptr, R, V, stride_x,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    target = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    run_max = tl.full((BLOCK_R,), float("-inf"), ACC)
    run_sum = tl.zeros((BLOCK_R,), ACC)
    picked = tl.zeros((BLOCK_R,), ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=ok, other=float("-inf")).to(ACC)
        new_max = tl.maximum(run_max, tl.max(x, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows of only -inf logits so far
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
        run_max = new_max
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), 1)
    lse = run_max + tl.log(tl.where(row_ok, run_sum, 1.0))  # padding rows: no log(0)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    # targets are trusted (not checked on the host): one outside [0, V) picked nothing, so NaN
    logp = tl.where((target >= 0) & (target < V), picked - lse, float("nan"))
    tl.store(logp_ptr + rows, logp, mask=row_ok)


@triton.autotune(configs=configs(_BACKWARD_CONFIGS, _INTERPRETER_CONFIG), key=["V"])
@triton.jit
def _backward_kernel(
    g_ptr, x_ptr, t_ptr, lse_ptr, out_ptr, R, V, stride_x,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < V)[None, :]
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    target = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    rows64 = rows.to(tl.int64)[:, None]
    # padding loads -inf: its softmax is exactly 0, so nothing overflows there
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=ok, other=float("-inf")).to(ACC)
    onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    grad = g[:, None] * (onehot - tl.exp(x - lse[:, None]))
    out = out_ptr + rows64 * V + cols[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=ok)


def _check(logits: Tensor, targets: Tensor) -> None:
    require_dtype("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got {list(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary (V = 0): no log-probability is defined")
    require_targets(targets, logits.shape[0])


def logits_logprobs_fwd(logits: Tensor, targets: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """``(logp [R], lse [R])`` in the accumulation dtype; ``chunk_size`` is ignored."""
    _check(logits, targets)
    logits, targets = row_major(logits), targets.contiguous()
    r, v = logits.shape
    acc = acc_dtype(logits.dtype)
    logp, lse = logits.new_empty(r, dtype=acc), logits.new_empty(r, dtype=acc)
    if r:
        _forward_kernel[lambda meta: (triton.cdiv(r, meta["BLOCK_R"]),)](
            logits, targets, logp, lse, r, v, logits.stride(0), ACC=tl_acc(logits.dtype)
        )
    return logp, lse


def logits_logprobs_bwd(
    grad: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, chunk_size: int
) -> Tensor:
    """``d logits = grad (onehot - softmax)``, ``[R, V]`` in the logits' dtype (contiguous)."""
    _check(logits, targets)
    logits, targets = row_major(logits), targets.contiguous()
    r, v = logits.shape
    acc = acc_dtype(logits.dtype)
    out = torch.empty((r, v), dtype=logits.dtype, device=logits.device)
    if r:
        grid = lambda meta: (triton.cdiv(r, meta["BLOCK_R"]), triton.cdiv(v, meta["BLOCK_V"]))
        _backward_kernel[grid](
            grad.to(acc).contiguous(), logits, targets, lse.to(acc).contiguous(), out,
            r, v, logits.stride(0), ACC=tl_acc(logits.dtype),
        )  # fmt: skip
    return out
