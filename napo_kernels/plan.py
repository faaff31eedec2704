"""The detached, piecewise-constant part of stage 2: which negatives each prompt is compared with,
with which temperature and margin.

Everything here carries no gradient (top-m sharing, DynamicPO's boundary set and ``beta_n``, the
dynamic margin), costs ``O(B * M)`` and runs in vectorised PyTorch on the scores' device for every
backend. The kernels then evaluate the differentiable aggregation
``L_i = softplus(agg_{n in select_i}(coef_in * Delta_in + margin_in))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .constants import THREE_MEANS_RTOL


@dataclass
class Plan:
    """What the stage-2 kernel needs, all ``[B, M]`` and detached."""

    pool: Tensor  # bool: n in P_i
    select: Tensor  # bool: the terms aggregated (the pool, or DynamicPO's boundary set)
    coef: Tensor  # beta, or DynamicPO's beta_n
    margin: Tensor  # additive margin inside the aggregation
    agg: int  # AGG_LSE or AGG_MEAN
    grad_mask: Tensor | None = None  # bool: pairs whose negative receives gradient (None: all)
    batch_confidence: Tensor | None = None  # NAPO's M_t


def share_matrix(
    num_prompts: int,
    sharing: str | Tensor,
    user_embeddings: Tensor | None,
    rho: float,
    device: torch.device,
) -> Tensor:
    """``[B, B]`` bool with the diagonal set: ``S[i, j]`` when prompt i uses prompt j's negatives.
    A matrix given by the caller is used as it is (validated bool, with a True diagonal)."""
    b = num_prompts
    eye = torch.eye(b, dtype=torch.bool, device=device)
    if isinstance(sharing, Tensor):
        return sharing.to(device=device)
    if sharing == "own":
        return eye
    if sharing == "all":
        return torch.ones(b, b, dtype=torch.bool, device=device)
    if sharing == "similarity":
        assert user_embeddings is not None
        m = math.floor(rho * (b - 1) + 1e-9)
        u = user_embeddings.detach().to(torch.float64)
        sim = (u @ u.T).masked_fill(eye, float("-inf"))  # self excluded before the top-m
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :m]
        share = torch.zeros(b, b, dtype=torch.bool, device=device)
        share.scatter_(1, order, True)
        return share | eye
    raise ValueError(f"unknown sharing {sharing!r}")


def negative_pool(share: Tensor, negative_mask: Tensor) -> Tensor:
    """``[b, G*K]`` bool pool from ``b`` rows of the share matrix ``[b, G]`` and the ``[G, K]``
    negative mask of the prompts whose negatives form the columns (``b = G`` in one process)."""
    return (share[:, :, None] & negative_mask[None, :, :]).reshape(share.shape[0], -1)


def top_cluster_3means(values: Tensor) -> Tensor:
    """Bool mask over ``values [n]``: the highest-mean cluster of an exact 1-D 3-means.

    Vectorised twin of ``reference.top_cluster_3means`` (same tie rules): contiguous clusters
    of the stably sorted values, cuts only between distinct values, and the first ``(a, b)``
    pair within ``THREE_MEANS_RTOL`` of the least within-cluster sum of squares.
    """
    n = values.numel()
    v, order = torch.sort(values.to(torch.float64), stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=values.device)
    if n < 3:
        mask[order[v == v[-1]]] = True
        return mask
    cuts = torch.nonzero(v[1:] > v[:-1]).flatten() + 1
    if cuts.numel() == 0:
        mask[:] = True
        return mask
    if cuts.numel() == 1:
        mask[order[cuts[0] :]] = True
        return mask
    zero = v.new_zeros(1)
    p1 = torch.cat([zero, torch.cumsum(v, 0)])
    p2 = torch.cat([zero, torch.cumsum(v * v, 0)])

    def sse(lo: Tensor, hi: Tensor) -> Tensor:
        s = p1[hi] - p1[lo]
        return (p2[hi] - p2[lo]) - s * s / (hi - lo).to(torch.float64)

    a = cuts[:, None].expand(-1, cuts.numel())
    b = cuts[None, :].expand(cuts.numel(), -1)
    valid = a < b
    start, end = torch.zeros_like(a), torch.full_like(a, n)
    cost = sse(start, a) + sse(a, b) + sse(b, end)
    cost = cost.masked_fill(~valid, float("inf"))
    least = cost.min()
    ok = (cost <= least + THREE_MEANS_RTOL * (1.0 + least.abs())).flatten()
    first = int(torch.nonzero(ok)[0])  # row-major order is (a, b) lexicographic order
    mask[order[int(b.flatten()[first]) :]] = True
    return mask


def dynamicpo_selection(
    chosen_scores: Tensor, rejected_scores: Tensor, pool: Tensor, beta: float, tau: float
) -> tuple[Tensor, Tensor]:
    """``(boundary [B, M] bool, beta_n [B, M] float64)`` from policy scores ``[B]``, ``[M]``."""
    pos = chosen_scores.detach().to(torch.float64)
    neg = rejected_scores.detach().to(torch.float64).reshape(-1)
    boundary = pool & (neg[None, :] >= pos[:, None])
    for i in torch.nonzero(~boundary.any(1)).flatten().tolist():  # fallback: top 3-means cluster
        members = torch.nonzero(pool[i]).flatten()
        boundary[i, members[top_cluster_3means(neg[members])]] = True
    rest = pool & ~boundary
    rest = torch.where(rest.any(1, keepdim=True), rest, boundary)
    mean_rest = (neg[None, :] * rest).sum(1) / rest.sum(1)
    d1 = pos[:, None] - neg[None, :]
    d2 = neg[None, :] - mean_rest[:, None]
    ratio = (d1 - d2 - tau) / (d1.abs() + d2.abs()).clamp(min=1e-12)  # guards 0/0
    beta_n = torch.where(boundary, beta * (1.0 + 0.5 * torch.tanh(ratio)), 0.0)
    return boundary, beta_n
