"""Triton stage 2: the loss of each prompt over its selected pool, one program per prompt row.

For row ``i``: ``x_n = coef_in (rejected_n - chosen_i) + margin_in`` over the selected ``n``;
``z_i = LSE_n x_n`` (S-DPO, NAPO, DPO) or ``mean_n x_n`` (DMPO, DynamicPO); ``L_i = softplus(z_i)``
and ``weights_in = dL_i/dDelta_in = sigmoid(z_i) a_in coef_in`` with ``a`` the softmax weights (LSE)
or ``1/|selected|`` (mean), 0 where not selected. Two sweeps over ``M`` in ``BLOCK_M`` tiles (the
aggregate, then the weights), so ``M`` has no size limit. The tensors are ``[B, M]``: tiny next to
stage 1, so no autotuning; one block size fits the whole row when it can.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import INTERPRET, acc_dtype, require_dtype, tl_acc

AGG_LSE = 0
AGG_MEAN = 1
_MAX_BLOCK_M = 16 if INTERPRET else 1024  # small under the interpreter: tests cover several tiles


@triton.jit
def _pair_terms(chosen, rej_ptr, sel_ptr, coef_ptr, margin_ptr, row, cols, M, ACC: tl.constexpr):
    """``(x, selected, coef)`` for columns ``cols`` of one row, in ``ACC``."""
    ok = cols < M
    at = row.to(tl.int64) * M + cols
    selected = (tl.load(sel_ptr + at, mask=ok, other=0) != 0) & ok
    coef = tl.load(coef_ptr + at, mask=ok, other=0.0).to(ACC)
    margin = tl.load(margin_ptr + at, mask=ok, other=0.0).to(ACC)
    rejected = tl.load(rej_ptr + cols, mask=ok, other=0.0).to(ACC)
    return coef * (rejected - chosen) + margin, selected, coef


@triton.jit
def _preference_kernel(
    chosen_ptr, rej_ptr, sel_ptr, coef_ptr, margin_ptr, rows_ptr, weights_ptr, M,
    MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    chosen = tl.load(chosen_ptr + row).to(ACC)
    # sweep 1: per-lane running (max, sum of exp) for the LSE, or (sum, count) for the mean
    lane_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    lane_sum = tl.zeros((BLOCK_M,), ACC)
    lane_count = tl.zeros((BLOCK_M,), ACC)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        x, selected, _ = _pair_terms(chosen, rej_ptr, sel_ptr, coef_ptr, margin_ptr, row, cols, M, ACC)
        if MEAN:
            lane_sum += tl.where(selected, x, 0.0)
            lane_count += tl.where(selected, 1.0, 0.0)
        else:
            x = tl.where(selected, x, float("-inf"))
            new_max = tl.maximum(lane_max, x)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # lanes with nothing selected yet
            lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
            lane_max = new_max
    if MEAN:
        count = tl.sum(lane_count, 0)
        z = tl.sum(lane_sum, 0) / count
    else:
        top = tl.max(lane_max, 0)
        z = top + tl.log(tl.sum(lane_sum * tl.exp(lane_max - top), 0))
    # softplus(z) = max(z, 0) + log1p(exp(-|z|)); log1p(u) = u * log(1 + u) / ((1 + u) - 1) keeps the
    # digits of a tiny u (there is no portable log1p in triton.language)
    u = tl.exp(-tl.abs(z))
    one_plus = 1.0 + u
    tiny = one_plus == 1.0
    log1p = tl.where(tiny, u, tl.log(one_plus) * (u / tl.where(tiny, 1.0, one_plus - 1.0)))
    tl.store(rows_ptr + row, tl.maximum(z, 0.0) + log1p)
    sigmoid = tl.where(z >= 0, 1.0 / one_plus, u / one_plus)
    # sweep 2: the weights dL/dDelta
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        x, selected, coef = _pair_terms(chosen, rej_ptr, sel_ptr, coef_ptr, margin_ptr, row, cols, M, ACC)
        if MEAN:
            share = 1.0 / count
        else:
            share = tl.exp(tl.where(selected, x - z, float("-inf")))
        weight = tl.where(selected, sigmoid * share * coef, 0.0)
        tl.store(weights_ptr + row.to(tl.int64) * M + cols, weight, mask=cols < M)


def preference_fwd(
    chosen: Tensor, rejected: Tensor, select: Tensor, coef: Tensor, margin: Tensor, agg: int
) -> tuple[Tensor, Tensor]:
    """``(loss_rows [B], weights [B, M])`` in the accumulation dtype of ``chosen`` (contract of
    ``torch_chunked.preference_fwd``). A row with nothing selected is an error (its loss is undefined)."""
    require_dtype("chosen", chosen)
    if chosen.dim() != 1 or rejected.dim() != 1:
        raise ValueError(
            f"chosen must be [B] and rejected [M]; got {list(chosen.shape)} and {list(rejected.shape)}"
        )
    b, m = chosen.shape[0], rejected.shape[0]
    for name, x in (("select", select), ("coef", coef), ("margin", margin)):
        if tuple(x.shape) != (b, m):
            raise ValueError(f"{name} must be [B={b}, M={m}], got {list(x.shape)}")
        if x.device != chosen.device:
            raise ValueError(f"{name} is on {x.device} but chosen is on {chosen.device}")
    if select.dtype != torch.bool:
        raise TypeError(f"select must be a bool tensor, got {select.dtype}")
    if agg not in (AGG_LSE, AGG_MEAN):
        raise ValueError(f"agg must be {AGG_LSE} (log-sum-exp) or {AGG_MEAN} (mean), got {agg!r}")
    acc = acc_dtype(chosen.dtype)
    rows = chosen.new_empty(b, dtype=acc)
    weights = chosen.new_empty((b, m), dtype=acc)
    if b == 0:
        return rows, weights
    empty = ~select.any(1)
    if bool(empty.any()):
        row = int(torch.nonzero(empty)[0])
        raise ValueError(f"select: row {row} selects no negative; its loss is undefined")
    _preference_kernel[(b,)](
        chosen.contiguous(), rejected.to(acc).contiguous(), select.contiguous().view(torch.uint8),
        coef.to(acc).contiguous(), margin.to(acc).contiguous(), rows, weights, m,
        MEAN=agg == AGG_MEAN, ACC=tl_acc(chosen.dtype),
        BLOCK_M=max(16, min(_MAX_BLOCK_M, triton.next_power_of_2(m))), num_warps=4,
    )  # fmt: skip
    return rows, weights
