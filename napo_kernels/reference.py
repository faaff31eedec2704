"""Plain differentiable PyTorch of `docs/loss-family.md`: the ground truth of every test.

Written to be read, not to be fast: every tensor a formula names is materialised, and autograd
provides the gradients. Shapes: ``B`` prompts, ``K`` own negatives per prompt (``[B, K]`` with a
validity mask), ``M = B * K`` negatives in the batch (flattened row-major: negative ``(j, k)`` is
column ``j * K + k``), ``T`` tokens, ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import IGNORE_INDEX, THREE_MEANS_RTOL

# ----------------------------------------------------------------------------------------------
# Sequence scores: s(y | x) = sum_t log pi(y_t | x, y_<t) over the candidate's tokens.
# ----------------------------------------------------------------------------------------------


def sequence_scores_from_logits(
    logits: Tensor, labels: Tensor, reduction: str = "sum", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """``logits [..., T, V]`` and ``labels [..., T]`` (already aligned: ``labels[t]`` is the token
    predicted by ``logits[t]``) to one score per sequence ``[...]``, in float64/float32."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    mask = labels != ignore_index
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    total = token.sum(-1)
    if reduction == "mean":
        return total / mask.sum(-1)
    return total


def sequence_scores(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    reduction: str = "sum",
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """Scores from the last hidden states ``[..., T, H]`` and the output projection ``[V, H]``.

    The head's logits are ``logit_scale * (h W^T + b)``, then with a ``softcap``
    ``softcap * tanh(logits / softcap)`` (Gemma 2's final soft cap)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return sequence_scores_from_logits(logits, labels, reduction, ignore_index)


# ----------------------------------------------------------------------------------------------
# The negative pool P_i and the reward matrix Delta_{i,n} = r_n - r_i^+.
# ----------------------------------------------------------------------------------------------


def similar_prompts(user_embeddings: Tensor, rho: float) -> Tensor:
    """``[B, B]`` bool: for each prompt the ``floor(rho * (B - 1))`` other prompts with the largest
    dot product of user embeddings (self excluded before the top-m; ties go to the lower index)."""
    b = user_embeddings.shape[0]
    m = math.floor(rho * (b - 1) + 1e-9)
    sim = user_embeddings.double() @ user_embeddings.double().T
    share = torch.zeros(b, b, dtype=torch.bool, device=user_embeddings.device)
    for i in range(b):
        others = [j for j in range(b) if j != i]
        # stable sort: ties keep index order, so the lower index wins
        order = sorted(others, key=lambda j: -sim[i, j].item())
        for j in order[:m]:
            share[i, j] = True
    return share


def pool_mask(
    negative_mask: Tensor,
    sharing: str | Tensor = "own",
    user_embeddings: Tensor | None = None,
    rho: float = 0.7,
) -> Tensor:
    """``[B, M]`` bool: ``pool[i, j*K + k]`` is True when negative ``(j, k)`` is in ``P_i``.

    ``sharing``: ``"own"`` (P_i = own negatives), ``"all"`` (plus every other prompt's),
    ``"similarity"`` (plus those of the top-``rho`` most similar users), or a ``[B, B]`` bool
    matrix ``S`` (plus those of prompts ``j`` with ``S[i, j]``; the diagonal is ignored).
    """
    b, k = negative_mask.shape
    eye = torch.eye(b, dtype=torch.bool, device=negative_mask.device)
    if isinstance(sharing, Tensor):
        share = sharing.bool() | eye
    elif sharing == "own":
        share = eye
    elif sharing == "all":
        share = torch.ones(b, b, dtype=torch.bool, device=negative_mask.device)
    elif sharing == "similarity":
        assert user_embeddings is not None
        share = similar_prompts(user_embeddings, rho) | eye
    else:
        raise ValueError(f"unknown sharing {sharing!r}")
    # pool[i, j, k] = share[i, j] and negative (j, k) exists
    return (share[:, :, None] & negative_mask.bool()[None, :, :]).reshape(b, b * k)


def reward_matrix(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``Delta[i, n] = r_n - r_i^+`` for every negative ``n`` of the batch: ``[B, M]``."""
    return rejected_rewards.reshape(1, -1) - chosen_rewards.reshape(-1, 1)


# ----------------------------------------------------------------------------------------------
# Losses, one value per prompt. ``pool`` is the [B, M] bool pool, ``delta`` the reward matrix.
# ----------------------------------------------------------------------------------------------


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + e^x)`` exactly (``F.softplus`` returns ``x`` itself above its threshold of 20, an
    error of ``e^-20`` ~ 2e-9 in the value and the gradient)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _masked_lse(x: Tensor, mask: Tensor) -> Tensor:
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=-1)


def dpo_rows(
    chosen_rewards: Tensor, rejected_rewards: Tensor, beta: float = 1.0, gamma: float = 0.0
) -> Tensor:
    """``-log sigma(beta (r^+ - r^-) - gamma)`` for ``[B]`` and ``[B]`` rewards."""
    return -F.logsigmoid(beta * (chosen_rewards - rejected_rewards) - gamma)


def sdpo_rows(delta: Tensor, pool: Tensor, beta: float = 1.0, gamma: float = 0.0) -> Tensor:
    """S-DPO: ``softplus(gamma + LSE_{n in P_i}(beta Delta_{i,n}))``."""
    return _softplus(gamma + _masked_lse(beta * delta, pool))


def sdpo_rows_sigmoid_form(delta: Tensor, pool: Tensor, beta: float = 1.0) -> Tensor:
    """S-DPO as the paper writes it: ``-log sigma(-log sum_n exp(beta Delta_{i,n}))``."""
    total = (torch.exp(beta * delta) * pool).sum(-1)
    return -torch.log(torch.sigmoid(-torch.log(total)))


def dmpo_rows(delta: Tensor, pool: Tensor, beta: float = 1.0, gamma: float = 0.0) -> Tensor:
    """DMPO (paper form): ``-log sigma(beta r^+ - mean_n beta r_n - gamma)``."""
    mean_delta = (delta * pool).sum(-1) / pool.sum(-1)
    return _softplus(gamma + beta * mean_delta)


def napo_rows(delta: Tensor, pool: Tensor, margin: Tensor, beta: float = 1.0) -> Tensor:
    """NAPO: ``softplus(LSE_{n in P_i}(beta Delta_{i,n} + gamma_{i,n}))``; with the batch margin
    ``gamma_{i,n} = gamma_t`` this is ``softplus(gamma_t + LSE(beta Delta))``."""
    return _softplus(_masked_lse(beta * delta + margin, pool))


def dynamicpo_rows(delta: Tensor, boundary: Tensor, beta_n: Tensor, gamma: float = 0.0) -> Tensor:
    """DynamicPO: ``-log sigma(mean_{n in B_i} beta_n (r^+ - r_n) - gamma)``."""
    mean = (beta_n * delta * boundary).sum(-1) / boundary.sum(-1)
    return _softplus(gamma + mean)


# ----------------------------------------------------------------------------------------------
# NAPO's dynamic margin (detached).
# ----------------------------------------------------------------------------------------------


def napo_margin(
    confidence: Tensor,
    pool: Tensor,
    ema: float,
    gamma0: float = 1.0,
    alpha: float = 0.3,
    mu: float = 0.9,
    mode: str = "batch",
) -> tuple[Tensor, float, float]:
    """Returns ``(margin [B, M], new_ema, M_t)``. ``confidence`` is ``[M]`` (one per negative).

    ``M_t`` is the mean confidence over every pair ``(i, n in P_i)``; the EMA is updated before use.
    ``mode="batch"``: ``gamma_t = gamma0 (1 - alpha (M_t - Mbar_t))`` for every pair;
    ``mode="per_negative"``: ``gamma_{i,n} = gamma0 (1 - alpha (c_n - Mbar_t))``;
    ``mode="none"``: the constant ``gamma0``.
    """
    c = confidence.detach().double().reshape(1, -1).expand_as(pool)
    m_t = (c * pool).sum().item() / pool.sum().item()
    new_ema = mu * ema + (1.0 - mu) * m_t
    if mode == "batch":
        margin = torch.full(pool.shape, gamma0 * (1.0 - alpha * (m_t - new_ema)), dtype=torch.float64)
    elif mode == "per_negative":
        margin = gamma0 * (1.0 - alpha * (c - new_ema))
    elif mode == "none":
        margin = torch.full(pool.shape, gamma0, dtype=torch.float64)
    else:
        raise ValueError(f"unknown margin mode {mode!r}")
    return margin.to(pool.device), new_ema, m_t


# ----------------------------------------------------------------------------------------------
# DynamicPO's boundary set and per-negative beta (detached; uses policy scores s_theta).
# ----------------------------------------------------------------------------------------------


def top_cluster_3means(values: list[float]) -> list[int]:
    """Indices of the highest-mean cluster of an exact 1-D 3-means of ``values``.

    An optimal 1-D k-means partition is contiguous in sorted order, so enumerate every pair of
    cut points over the sorted values and keep the one with least within-cluster sum of squares.
    Cuts never split equal values (ties stay together). With fewer than 3 values, the largest.
    """
    n = len(values)
    order = sorted(range(n), key=lambda i: (values[i], i))
    v = [values[i] for i in order]
    top = max(v)
    if n < 3:
        return [order[i] for i in range(n) if v[i] == top]
    cuts = [c for c in range(1, n) if v[c - 1] < v[c]]  # allowed boundaries between groups

    def sse(lo: int, hi: int) -> float:
        seg = v[lo:hi]
        mean = sum(seg) / len(seg)
        return sum((x - mean) ** 2 for x in seg)

    if not cuts:  # all equal: one cluster
        return list(range(n))
    if len(cuts) == 1:  # two distinct groups at most
        best_start = cuts[0]
    else:
        pairs = [(a, b) for ai, a in enumerate(cuts) for b in cuts[ai + 1 :]]
        costs = [sse(0, a) + sse(a, b) + sse(b, n) for a, b in pairs]
        least = min(costs)
        # the first partition (in (a, b) order) within a relative tolerance of the least cost
        first = next(i for i, c in enumerate(costs) if c <= least + THREE_MEANS_RTOL * (1.0 + abs(least)))
        best_start = pairs[first][1]
    return sorted(order[i] for i in range(best_start, n))


def dynamicpo_selection(
    chosen_scores: Tensor, rejected_scores: Tensor, pool: Tensor, beta: float = 1.0, tau: float = 2.0
) -> tuple[Tensor, Tensor]:
    """``(boundary [B, M] bool, beta_n [B, M])`` from policy scores ``[B]`` and ``[M]``."""
    b, m = pool.shape
    pos = chosen_scores.detach().double().tolist()
    neg = rejected_scores.detach().double().reshape(-1).tolist()
    boundary = torch.zeros(b, m, dtype=torch.bool)
    beta_n = torch.zeros(b, m, dtype=torch.float64)
    for i in range(b):
        members = [n for n in range(m) if pool[i, n]]
        chosen = [n for n in members if neg[n] >= pos[i]]
        if not chosen:
            top = top_cluster_3means([neg[n] for n in members])
            chosen = [members[t] for t in top]
        rest = [n for n in members if n not in chosen] or chosen
        mean_rest = sum(neg[n] for n in rest) / len(rest)
        for n in chosen:
            d1 = pos[i] - neg[n]
            d2 = neg[n] - mean_rest
            ratio = (d1 - d2 - tau) / max(abs(d1) + abs(d2), 1e-12)  # guards 0/0
            boundary[i, n] = True
            beta_n[i, n] = beta * (1.0 + 0.5 * math.tanh(ratio))
    return boundary.to(pool.device), beta_n.to(pool.device)


# ----------------------------------------------------------------------------------------------
# The whole family from per-sequence scores.
# ----------------------------------------------------------------------------------------------


def family_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    negative_mask: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    method: str = "napo",
    beta: float = 1.0,
    gamma: float = 0.0,
    gamma0: float = 1.0,
    sharing: str | Tensor = "own",
    user_embeddings: Tensor | None = None,
    rho: float = 0.7,
    confidence: Tensor | None = None,
    margin_mode: str = "batch",
    ema: float = 0.0,
    alpha: float = 0.3,
    mu: float = 0.9,
    tau: float = 2.0,
    detach_negatives: str = "none",
) -> tuple[Tensor, dict]:
    """Batch loss (mean over prompts) from ``chosen_logps [B]`` and ``rejected_logps [B, K]``.

    ``gamma`` is the additive margin of dpo / s_dpo / dmpo, ``gamma0`` NAPO's base margin.
    ``detach_negatives``: ``"shared"`` stops the gradient of negatives borrowed from other prompts,
    ``"all"`` of every negative. Returns ``(loss, extras)`` with the per-prompt losses, pool and,
    for NAPO, the updated EMA.
    """
    b, k = rejected_logps.shape
    if negative_mask is None:
        negative_mask = torch.ones(b, k, dtype=torch.bool, device=rejected_logps.device)
    negative_mask = negative_mask.bool()
    acc = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    r_pos = chosen_logps.to(acc)
    r_neg = rejected_logps.to(acc)
    if ref_chosen_logps is not None:
        r_pos = r_pos - ref_chosen_logps.to(acc)
        r_neg = r_neg - ref_rejected_logps.to(acc)
    r_neg = r_neg.masked_fill(~negative_mask, 0.0).reshape(-1)
    pool = pool_mask(negative_mask, sharing, user_embeddings, rho)
    delta = reward_matrix(r_pos, r_neg)
    if detach_negatives == "shared":  # borrowed negatives get no gradient
        own = pool_mask(negative_mask, "own")
        delta = torch.where(own, delta, reward_matrix(r_pos, r_neg.detach()))
    elif detach_negatives == "all":  # NAPO's released code: no negative gets a gradient
        delta = reward_matrix(r_pos, r_neg.detach())
    extras: dict = {"pool": pool, "delta": delta}
    if method == "dpo":
        if k != 1 or not negative_mask.all():
            raise ValueError("dpo needs exactly one negative per prompt")
        rows = sdpo_rows(delta, pool, beta, gamma)
    elif method == "s_dpo":
        rows = sdpo_rows(delta, pool, beta, gamma)
    elif method == "dmpo":
        rows = dmpo_rows(delta, pool, beta, gamma)
    elif method == "napo":
        if confidence is None:
            confidence = torch.sigmoid(beta * r_neg.detach())
        margin, new_ema, m_t = napo_margin(confidence.reshape(-1), pool, ema, gamma0, alpha, mu, margin_mode)
        rows = napo_rows(delta, pool, margin.to(acc), beta)
        extras.update(margin=margin, ema=new_ema, batch_confidence=m_t)
    elif method == "dynamicpo":
        s_neg = rejected_logps.detach().to(acc).masked_fill(~negative_mask, 0.0).reshape(-1)
        boundary, beta_n = dynamicpo_selection(chosen_logps, s_neg, pool, beta, tau)
        rows = dynamicpo_rows(delta, boundary, beta_n.to(acc))
        extras.update(boundary=boundary, beta_n=beta_n)
    else:
        raise ValueError(f"unknown method {method!r}")
    extras["rows"] = rows
    return rows.mean(), extras
