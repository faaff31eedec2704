"""The one stage-2 pipeline: from per-sequence scores to a :class:`PreferenceOutput`.

Both entries use it: :func:`napo_kernels.preference_loss` in one process and the cross-rank pool of
:mod:`napo_kernels.distributed`. They differ only in where the pool's columns come from
(:class:`Columns`: this process's negatives, or every rank's) and in the loss scale.

    validate_scores -> rewards -> Columns -> pool -> plan (detached selection, margin) -> kernel rows
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import checks
from .config import LossConfig
from .kernels.torch_chunked import acc_dtype
from .margin import DynamicMargin
from .ops.preference import preference_rows
from .plan import Plan, dynamicpo_selection, negative_pool


@dataclass
class PreferenceOutput:
    """What a loss call returns: the scalar ``loss``, the policy scores, and detached metrics
    named as TRL logs them (``rewards/chosen``, ``rewards/accuracies``, ...)."""

    loss: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    rows: Tensor | None = None  # per-prompt losses [B]


@dataclass
class Scores:
    """One process's validated stage-2 inputs (``B`` prompts, ``K`` negatives each)."""

    chosen: Tensor  # [B] policy scores of the positives (with gradient)
    rejected: Tensor  # [B, K] policy scores of the negatives (with gradient)
    mask: Tensor  # [B, K] bool: the negative exists
    r_pos: Tensor  # [B] rewards of the positives, accumulation dtype
    r_neg: Tensor  # [B, K] rewards of the negatives (0 where masked), accumulation dtype
    has_ref: bool

    @property
    def acc(self) -> torch.dtype:
        return self.r_pos.dtype


@dataclass
class Columns:
    """The pool's columns: the negatives of ``G`` prompts (``G = B`` in one process)."""

    r_neg: Tensor  # [G * K] rewards, differentiable back to the owner of each negative
    scores: Tensor  # [G * K] detached policy scores s_theta (DynamicPO's selection, metrics)
    mask: Tensor  # [G, K] bool
    confidence: Tensor | None  # [G * K] NAPO's confidence, detached
    share: Tensor  # [B, G] bool: the local prompts' rows of the share matrix
    offset: int  # column prompt of local prompt 0 (its own negatives)


def _optional_tensor(name: str, x: object) -> Tensor | None:
    return None if x is None else checks.require_tensor(name, x)


def validate_scores(
    chosen: Tensor,
    rejected: Tensor,
    negative_mask: Tensor | None,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    confidence: Tensor | None,
    user_embeddings: Tensor | None,
    config: LossConfig,
    sharing: str,
    check_finite: bool,
) -> Scores:
    """Check one process's stage-2 inputs (errors name the public argument) and form the rewards."""
    checks.require_tensor("chosen_logps", chosen)
    checks.require_tensor("rejected_logps", rejected)
    for name, x in (
        ("negative_mask", negative_mask),
        ("ref_chosen_logps", ref_chosen),
        ("ref_rejected_logps", ref_rejected),
        ("confidence", confidence),
        ("user_embeddings", user_embeddings),
    ):
        _optional_tensor(name, x)
    checks.require_float("chosen_logps", chosen)
    checks.require_same("rejected_logps", rejected, "chosen_logps", chosen)
    if chosen.dim() != 1:
        raise ValueError(f"chosen_logps must be [B], got {list(chosen.shape)}")
    b = chosen.shape[0]
    if b == 0:
        raise ValueError("chosen_logps is empty: the batch has no prompts")
    if rejected.dim() == 1:
        rejected = rejected[:, None]
    if rejected.dim() != 2 or rejected.shape[0] != b:
        raise ValueError(f"rejected_logps must be [B={b}, K], got {list(rejected.shape)}")
    k = rejected.shape[1]
    if k == 0:
        raise ValueError("rejected_logps has K = 0 negatives per prompt; every prompt needs at least one")
    if config.spec.single_negative and k != 1:
        raise ValueError(
            f"method='dpo' compares each positive with exactly one own negative (K = 1), got K = {k}; "
            "use 's_dpo' or 'napo' for several or shared negatives"
        )
    if negative_mask is not None:
        checks.require_shape("negative_mask", negative_mask, (b, k), "one entry per negative")
        checks.require_same("negative_mask", negative_mask, "chosen_logps", chosen, dtype=False)
        checks.require_mask("negative_mask", negative_mask)
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    if ref_chosen is not None:
        checks.require_shape("ref_chosen_logps", ref_chosen, (b,))
        checks.require_shape("ref_rejected_logps", ref_rejected, (b, k), "one reference score per negative")
        checks.require_float("ref_chosen_logps", ref_chosen)
        checks.require_float("ref_rejected_logps", ref_rejected)
        checks.require_same("ref_chosen_logps", ref_chosen, "chosen_logps", chosen, dtype=False)
        checks.require_same("ref_rejected_logps", ref_rejected, "chosen_logps", chosen, dtype=False)
    if sharing == "similarity":
        if user_embeddings is None:
            raise ValueError("sharing='similarity' needs user_embeddings [B, D]")
        if user_embeddings.dim() != 2 or user_embeddings.shape[0] != b:
            raise ValueError(f"user_embeddings must be [B={b}, D], got {list(user_embeddings.shape)}")
        checks.require_float("user_embeddings", user_embeddings)
        checks.require_same("user_embeddings", user_embeddings, "chosen_logps", chosen, dtype=False)
    if confidence is not None:
        checks.require_shape("confidence", confidence, (b, k), "one confidence per negative")
        checks.require_float("confidence", confidence)
        checks.require_same("confidence", confidence, "chosen_logps", chosen, dtype=False)
    if check_finite:
        for name, x in (
            ("chosen_logps", chosen),
            ("rejected_logps", rejected),
            ("ref_chosen_logps", ref_chosen),
            ("ref_rejected_logps", ref_rejected),
            ("confidence", confidence),
            ("user_embeddings", user_embeddings),
        ):
            checks.require_finite(name, x)
    mask = (
        torch.ones(b, k, dtype=torch.bool, device=chosen.device)
        if negative_mask is None
        else negative_mask.to(dtype=torch.bool)
    )
    acc = acc_dtype(chosen.dtype)
    r_pos, r_neg = chosen.to(acc), rejected.to(acc)
    if ref_chosen is not None:
        r_pos = r_pos - ref_chosen.detach().to(acc)
        r_neg = r_neg - ref_rejected.detach().to(acc)
    r_neg = r_neg.masked_fill(~mask, 0.0)
    return Scores(chosen, rejected, mask, r_pos, r_neg, ref_chosen is not None)


def validate_share_matrix(sharing: Tensor, size: int, device: torch.device, what: str) -> None:
    """A caller's share matrix: bool, ``[size, size]``, True on the diagonal (own negatives are always
    in the pool; exclude a negative with ``negative_mask`` instead)."""
    checks.require_shape("sharing", sharing, (size, size), what)
    if sharing.device != device:
        raise ValueError(f"sharing is on {sharing.device} but chosen_logps is on {device}")
    if sharing.dtype != torch.bool:
        raise TypeError(f"sharing must be a bool tensor (S[i, j]: prompt i uses prompt j's negatives), "
                        f"got {sharing.dtype}")  # fmt: skip
    off = ~torch.diagonal(sharing)
    if bool(off.any()):
        i = int(torch.nonzero(off)[0])
        raise ValueError(
            f"sharing[{i}, {i}] is False: a prompt's own negatives are always in its pool (the diagonal "
            "must be True); to leave out a negative, mask it with negative_mask"
        )


def local_columns(scores: Scores, share: Tensor, confidence: Tensor | None) -> Columns:
    """One process: the columns are the batch's own negatives."""
    return Columns(
        r_neg=scores.r_neg.reshape(-1),
        scores=scores.rejected.detach().to(scores.acc).masked_fill(~scores.mask, 0.0).reshape(-1),
        mask=scores.mask,
        confidence=None if confidence is None else confidence.detach().reshape(-1),
        share=share,
        offset=0,
    )


def resolve_margin(config: LossConfig, margin_state: DynamicMargin | None) -> DynamicMargin | None:
    """The EMA margin a call uses: the caller's state (which fixes every margin option), or a fresh one."""
    if margin_state is None:
        return config.new_margin()
    if not isinstance(margin_state, DynamicMargin):
        raise TypeError(f"margin_state must be a DynamicMargin, got {type(margin_state).__name__}")
    if not config.spec.dynamic_margin:
        raise ValueError(f"margin_state is NAPO's dynamic margin; method={config.method!r} has none")
    given = config.explicit_margin_options()
    if given:
        raise ValueError(
            f"margin_state fixes gamma0, alpha, mu and the margin mode; {', '.join(given)} given as well: "
            "set them on the DynamicMargin (or pass no margin_state)"
        )
    return margin_state


def make_plan(
    config: LossConfig, pool: Tensor, cols: Columns, chosen: Tensor, margin: DynamicMargin | None
) -> Plan:
    """The detached part of stage 2: which pairs are aggregated, with which coefficient and margin."""
    b, m = pool.shape
    spec = config.spec
    ones = torch.ones(b, m, dtype=torch.float64, device=pool.device)
    if spec.dynamic_margin:
        assert margin is not None
        c = torch.sigmoid(config.beta * cols.r_neg.detach()) if cols.confidence is None else cols.confidence
        gamma, m_t = margin(c.to(pool.device), pool)
        plan = Plan(pool, pool, config.beta * ones, gamma, spec.aggregation, batch_confidence=m_t)
    elif spec.boundary_selection:
        boundary, beta_n = dynamicpo_selection(chosen, cols.scores, pool, config.beta, config.tau)
        plan = Plan(pool, boundary, beta_n, 0.0 * ones, spec.aggregation)
    else:
        plan = Plan(pool, pool, config.beta * ones, config.additive_margin() * ones, spec.aggregation)
    if config.detach_negatives == "shared":
        own = torch.zeros_like(cols.share)
        rows = torch.arange(b, device=pool.device)
        own[rows, cols.offset + rows] = True
        plan.grad_mask = negative_pool(own, cols.mask)
    elif config.detach_negatives == "all":
        plan.grad_mask = torch.zeros_like(pool)
    return plan


def check_pools(pool: Tensor, describe: Callable[[int], str]) -> None:
    """Every prompt needs at least one negative in its pool."""
    empty = ~pool.any(1)
    if bool(empty.any()):
        raise ValueError(
            f"{describe(int(torch.nonzero(empty)[0]))} has an empty negative pool (all its negatives are "
            "masked and it shares none)"
        )


def evaluate(scores: Scores, cols: Columns, plan: Plan, backend: str) -> Tensor:
    """Per-prompt losses ``[B]`` from the stage-2 kernel."""
    acc = scores.acc
    coef, margin = plan.coef.to(acc), plan.margin.to(acc)
    rows, _ = preference_rows(
        scores.r_pos, cols.r_neg, plan.select, coef, margin, plan.grad_mask, plan.agg, backend
    )
    return rows


@torch.no_grad()
def metrics(scores: Scores, cols: Columns, plan: Plan, rows: Tensor) -> dict[str, Tensor]:
    """TRL's metric names (over the local prompts against their pools) and this package's own."""
    r_pos, r_neg, pool = scores.r_pos, cols.r_neg.detach(), plan.pool
    pairs = pool.sum()
    wins = ((r_pos[:, None] > r_neg[None, :]) & pool).sum()
    gap = ((r_pos[:, None] - r_neg[None, :]) * pool).sum()
    out = {
        "loss": rows.detach().mean(),
        "rewards/chosen": r_pos.detach().mean(),
        "rewards/rejected": r_neg.reshape(cols.mask.shape)[cols.mask].mean(),
        "rewards/accuracies": wins.to(r_pos.dtype) / pairs,
        "rewards/margins": gap.to(r_pos.dtype) / pairs,
        "logps/chosen": scores.chosen.detach().float().mean(),
        "logps/rejected": cols.scores.float().reshape(cols.mask.shape)[cols.mask].mean(),
        "pool/size": pairs.to(r_pos.dtype) / pool.shape[0],
    }
    if plan.batch_confidence is not None:
        out["margin/gamma"] = (plan.margin * pool).sum() / pairs
        out["margin/batch_confidence"] = plan.batch_confidence
    if plan.select is not plan.pool:
        out["dynamicpo/boundary_size"] = plan.select.sum().to(r_pos.dtype) / pool.shape[0]
        out["dynamicpo/beta"] = (plan.coef * plan.select).sum() / plan.select.sum()
    return out


_warned_stateless = False


def warn_stateless_margin(config: LossConfig, margin_state: DynamicMargin | None) -> None:
    """Say once per process that a NAPO call without ``margin_state`` restarts the EMA every call."""
    global _warned_stateless
    if config.spec.dynamic_margin and margin_state is None and not _warned_stateless:
        _warned_stateless = True
        warnings.warn(
            "napo: no margin_state given, so the margin EMA restarts from 0 on every call; pass a "
            "DynamicMargin (or use PreferenceLoss) to carry it across steps",
            stacklevel=3,
        )
