"""Public stage-2 API: the loss family from per-sequence scores, and the fused end-to-end entry."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import checks
from .constants import IGNORE_INDEX
from .kernels.torch_chunked import AGG_LSE, AGG_MEAN, acc_dtype
from .logprobs import _resolve_backend, sequence_logprobs
from .margin import DynamicMargin
from .ops.preference import preference_rows
from .plan import METHODS, Plan, dynamicpo_selection, negative_pool, share_matrix

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

SHARING_MODES = ("own", "all", "similarity")


@dataclass
class PreferenceOutput:
    """What a loss call returns: the scalar ``loss``, the policy scores, and detached metrics
    named as TRL logs them (``rewards/chosen``, ``rewards/accuracies``, ...)."""

    loss: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    rows: Tensor | None = None  # per-prompt losses [B]


_warned_stateless = False


def _default_sharing(method: str, user_embeddings: Tensor | None) -> str:
    if method == "napo":
        return "similarity" if user_embeddings is not None else "all"
    return "own"


def _validate(
    chosen: Tensor,
    rejected: Tensor,
    negative_mask: Tensor | None,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    method: str,
    beta: float,
    sharing: str | Tensor,
    user_embeddings: Tensor | None,
    rho: float,
    confidence: Tensor | None,
) -> Tensor:
    checks.require_tensor("chosen_logps", chosen)
    checks.require_tensor("rejected_logps", rejected)
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
    if rejected.shape[1] == 0:
        raise ValueError("rejected_logps has K = 0 negatives per prompt; every prompt needs at least one")
    k = rejected.shape[1]
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    checks.require_positive("beta", beta)
    checks.require_rho(rho)
    if negative_mask is not None:
        checks.require_tensor("negative_mask", negative_mask)
        checks.require_shape("negative_mask", negative_mask, (b, k), "one entry per negative")
        checks.require_same("negative_mask", negative_mask, "chosen_logps", chosen, dtype=False)
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    if ref_chosen is not None:
        checks.require_shape("ref_chosen_logps", ref_chosen, (b,))
        if ref_rejected.numel() != b * k:  # [B, K] or flat [B * K]
            raise ValueError(f"ref_rejected_logps must be [B={b}, K={k}], got {list(ref_rejected.shape)}")
        checks.require_same("ref_chosen_logps", ref_chosen, "chosen_logps", chosen, dtype=False)
        checks.require_same("ref_rejected_logps", ref_rejected, "chosen_logps", chosen, dtype=False)
    if isinstance(sharing, Tensor):
        checks.require_shape("sharing", sharing, (b, b), "a [B, B] bool share matrix")
        checks.require_same("sharing", sharing, "chosen_logps", chosen, dtype=False)
    elif sharing not in SHARING_MODES:
        raise ValueError(f"sharing must be one of {SHARING_MODES} or a [B, B] bool tensor, got {sharing!r}")
    if sharing == "similarity":
        if user_embeddings is None:
            raise ValueError("sharing='similarity' needs user_embeddings [B, D]")
        if user_embeddings.dim() != 2 or user_embeddings.shape[0] != b:
            raise ValueError(f"user_embeddings must be [B={b}, D], got {list(user_embeddings.shape)}")
        checks.require_same("user_embeddings", user_embeddings, "chosen_logps", chosen, dtype=False)
    if confidence is not None:
        if confidence.numel() != b * k:  # [B, K] or flat [B * K]
            raise ValueError(
                f"confidence must be [B={b}, K={k}] (one per negative), got {list(confidence.shape)}"
            )
        checks.require_same("confidence", confidence, "chosen_logps", chosen, dtype=False)
    if method == "dpo" and (
        k != 1 or (isinstance(sharing, str) and sharing != "own") or isinstance(sharing, Tensor)
    ):
        raise ValueError(
            "method='dpo' compares each positive with exactly one own negative (K = 1, sharing='own'); "
            "use 's_dpo' or 'napo' for several or shared negatives"
        )
    return rejected


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    negative_mask: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    method: str = "napo",
    beta: float = 1.0,
    gamma: float | None = None,
    sharing: str | Tensor | None = None,
    user_embeddings: Tensor | None = None,
    rho: float = 0.7,
    confidence: Tensor | None = None,
    margin_state: DynamicMargin | None = None,
    margin_mode: str = "batch",
    alpha: float = 0.3,
    mu: float = 0.9,
    tau: float = 2.0,
    detach_shared: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
    process_group: ProcessGroup | None = None,
) -> PreferenceOutput:
    """The multi-negative preference loss (mean over prompts) from per-sequence scores.

    Args:
        chosen_logps: ``[B]`` policy score ``s_theta`` of each prompt's positive.
        rejected_logps: ``[B, K]`` policy scores of each prompt's own negatives.
        negative_mask: ``[B, K]`` bool, False where a prompt has fewer than K negatives.
        ref_chosen_logps, ref_rejected_logps: reference scores (no gradient); omit both for
            reference-free rewards ``r = s_theta``.
        method: ``"dpo"``, ``"s_dpo"``, ``"dmpo"``, ``"napo"`` or ``"dynamicpo"``.
        beta: temperature. gamma: additive margin (NAPO: the base margin ``gamma_0``, default 1;
            others default 0).
        sharing: the negative pool: ``"own"``, ``"all"``, ``"similarity"`` (top-``rho`` users by
            ``user_embeddings [B, D]``) or a ``[B, B]`` bool matrix. Default: NAPO shares
            (``"similarity"`` when ``user_embeddings`` is given, else ``"all"``), others ``"own"``.
        confidence: NAPO: ``[B, K]`` confidence of each negative (default
            ``sigmoid(beta * r_n)``, detached).
        margin_state: NAPO: a :class:`DynamicMargin` carrying the EMA across steps (it also
            fixes ``gamma_0``, ``alpha``, ``mu`` and the margin mode). Without one, a fresh EMA
            (``Mbar_0 = 0``) is used on every call; use :class:`PreferenceLoss` to keep it.
        margin_mode, alpha, mu: NAPO's margin without ``margin_state``.
        tau: DynamicPO's offset in ``beta_n``.
        detach_shared: reproduce NAPO's released code: shared (not own) negatives get no gradient.
        check_finite: reject NaN/inf scores with an error naming the argument.
        process_group: share negatives across the ranks of this ``torch.distributed`` group (e.g.
            ``torch.distributed.group.WORLD``): each rank passes its own prompts and the pool spans
            the global batch (see :mod:`napo_kernels.distributed` for the loss scale under DDP).

    Returns:
        :class:`PreferenceOutput` with ``loss`` (a scalar with gradients to the scores) and metrics.
    """
    global _warned_stateless
    if process_group is not None:
        from .distributed import preference_loss_across_ranks  # imports losses: import it late

        return preference_loss_across_ranks(
            chosen_logps, rejected_logps, negative_mask, ref_chosen_logps, ref_rejected_logps,
            process_group=process_group, method=method, beta=beta, gamma=gamma, sharing=sharing,
            user_embeddings=user_embeddings, rho=rho, confidence=confidence, margin_state=margin_state,
            margin_mode=margin_mode, alpha=alpha, mu=mu, tau=tau, detach_shared=detach_shared,
            backend=backend, check_finite=check_finite,
        )  # fmt: skip
    if sharing is None:
        sharing = _default_sharing(method, user_embeddings)
    rejected_logps = _validate(
        chosen_logps, rejected_logps, negative_mask, ref_chosen_logps, ref_rejected_logps,
        method, beta, sharing, user_embeddings, rho, confidence,
    )  # fmt: skip
    b, k = rejected_logps.shape
    device = chosen_logps.device
    if check_finite:
        for name, x in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps),
                        ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps),
                        ("confidence", confidence), ("user_embeddings", user_embeddings)):  # fmt: skip
            checks.require_finite(name, x)
    mask = (
        torch.ones(b, k, dtype=torch.bool, device=device)
        if negative_mask is None
        else negative_mask.to(device=device, dtype=torch.bool)
    )
    acc = acc_dtype(chosen_logps.dtype)
    r_pos, r_neg = chosen_logps.to(acc), rejected_logps.to(acc)
    if ref_chosen_logps is not None:
        r_pos = r_pos - ref_chosen_logps.detach().to(acc)
        r_neg = r_neg - ref_rejected_logps.detach().reshape(b, k).to(acc)
    r_neg = r_neg.masked_fill(~mask, 0.0).reshape(-1)

    share = share_matrix(b, sharing, user_embeddings, rho, device)
    pool = negative_pool(share, mask)
    empty = ~pool.any(1)
    if bool(empty.any()):
        raise ValueError(
            f"prompt {int(torch.nonzero(empty)[0])} has an empty negative pool (all its negatives are masked "
            "and it shares none)"
        )
    plan = _make_plan(
        method, beta, gamma, pool, r_neg, chosen_logps, rejected_logps, mask, confidence,
        margin_state, margin_mode, alpha, mu, tau, acc,
    )  # fmt: skip
    if detach_shared:
        plan.grad_mask = negative_pool(share_matrix(b, "own", None, rho, device), mask)
    name = _resolve_backend(backend, device)
    rows, _ = preference_rows(
        r_pos, r_neg, plan.select, plan.coef.to(acc), plan.margin.to(acc), plan.grad_mask, plan.agg, name
    )
    loss = rows.mean()
    if method == "napo" and margin_state is None and not _warned_stateless:
        _warned_stateless = True
        warnings.warn(
            "napo: no margin_state given, so the margin EMA restarts from 0 on every call; pass a "
            "DynamicMargin (or use PreferenceLoss) to carry it across steps",
            stacklevel=2,
        )
    metrics = _metrics(r_pos, r_neg, chosen_logps, rejected_logps, mask, plan, rows)
    return PreferenceOutput(loss, chosen_logps, rejected_logps, metrics, rows)


def _make_plan(
    method, beta, gamma, pool, r_neg, chosen_logps, rejected_logps, mask, confidence,
    margin_state, margin_mode, alpha, mu, tau, acc,
) -> Plan:  # fmt: skip
    b, m = pool.shape
    ones = torch.ones(b, m, dtype=torch.float64, device=pool.device)
    if method == "napo":
        state = margin_state or DynamicMargin(1.0 if gamma is None else gamma, alpha, mu, margin_mode)
        c = torch.sigmoid(beta * r_neg.detach()) if confidence is None else confidence.detach().reshape(-1)
        margin, m_t = state(c.to(pool.device), pool)
        return Plan(pool, pool, beta * ones, margin, AGG_LSE, batch_confidence=m_t)
    margin = (0.0 if gamma is None else gamma) * ones
    if method in ("dpo", "s_dpo"):
        return Plan(pool, pool, beta * ones, margin, AGG_LSE)
    if method == "dmpo":
        return Plan(pool, pool, beta * ones, margin, AGG_MEAN)
    s_neg = rejected_logps.detach().to(acc).masked_fill(~mask, 0.0).reshape(-1)
    boundary, beta_n = dynamicpo_selection(chosen_logps, s_neg, pool, beta, tau)
    return Plan(pool, boundary, beta_n, margin, AGG_MEAN)


@torch.no_grad()
def _metrics(r_pos, r_neg, chosen_logps, rejected_logps, mask, plan: Plan, rows) -> dict[str, Tensor]:
    pool = plan.pool
    pairs = pool.sum()
    wins = ((r_pos[:, None] > r_neg[None, :]) & pool).sum()
    gap = ((r_pos[:, None] - r_neg[None, :]) * pool).sum()
    out = {
        "loss": rows.detach().mean(),
        "rewards/chosen": r_pos.detach().mean(),
        "rewards/rejected": r_neg.detach().reshape(mask.shape)[mask].mean(),
        "rewards/accuracies": wins.to(r_pos.dtype) / pairs,
        "rewards/margins": gap.detach().to(r_pos.dtype) / pairs,
        "logps/chosen": chosen_logps.detach().float().mean(),
        "logps/rejected": rejected_logps.detach().float()[mask].mean(),
        "pool/size": pairs.to(r_pos.dtype) / pool.shape[0],
    }
    if plan.batch_confidence is not None:
        out["margin/gamma"] = (plan.margin * pool).sum() / pairs
        out["margin/batch_confidence"] = plan.batch_confidence
    if plan.select is not plan.pool:
        out["dynamicpo/boundary_size"] = plan.select.sum().to(r_pos.dtype) / pool.shape[0]
        out["dynamicpo/beta"] = (plan.coef * plan.select).sum() / plan.select.sum()
    return out


def napo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    sequence_ids: Tensor | None = None,
    num_prompts: int | None = None,
    num_candidates: int | None = None,
    candidate_mask: Tensor | None = None,
    ref_logps: Tensor | None = None,
    method: str = "napo",
    beta: float = 1.0,
    gamma: float | None = None,
    sharing: str | Tensor | None = None,
    user_embeddings: Tensor | None = None,
    rho: float = 0.7,
    confidence: Tensor | None = None,
    margin_state: DynamicMargin | None = None,
    margin_mode: str = "batch",
    alpha: float = 0.3,
    mu: float = 0.9,
    tau: float = 2.0,
    detach_shared: bool = False,
    reduction: str = "sum",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    check_finite: bool = False,
    return_outputs: bool = False,
    process_group: ProcessGroup | None = None,
) -> Tensor | PreferenceOutput:
    """Fused loss from the policy's last hidden states: sequence log-probs (stage 1) and the
    multi-negative preference loss (stage 2), each with a hand-written backward.

    Layouts: ``hidden [B, C, T, H]`` with ``labels [B, C, T]`` where candidate 0 of every prompt
    is the positive and candidates ``1..C-1`` its ``K = C - 1`` negatives; or packed rows
    ``hidden [N, H]``, ``labels [N]`` with ``sequence_ids [N]`` (``= b * C + c``), ``num_prompts``
    and ``num_candidates``. ``candidate_mask [B, C]`` marks existing candidates (column 0 must be
    True); ``ref_logps [B, C]`` are reference scores (omit for reference-free rewards).
    The loss options are those of :func:`preference_loss`; the kernel options those of
    :func:`sequence_logprobs`. Returns the scalar loss, or a :class:`PreferenceOutput` with
    ``return_outputs=True``.
    """
    if hidden.dim() == 4:
        b, c = hidden.shape[:2]
    elif hidden.dim() == 2:
        if sequence_ids is None or num_prompts is None or num_candidates is None:
            raise ValueError("packed hidden [N, H] needs sequence_ids, num_prompts and num_candidates")
        b, c = num_prompts, num_candidates
    else:
        raise ValueError(f"hidden must be [B, C, T, H] or packed [N, H], got {list(hidden.shape)}")
    if c < 2:
        raise ValueError(
            f"each prompt needs a positive and at least one negative: C = {c} candidates (K = 0)"
        )
    if candidate_mask is not None:
        checks.require_shape("candidate_mask", candidate_mask, (b, c), "[B, C], candidate 0 is the positive")
        candidate_mask = candidate_mask.to(hidden.device).bool()
        if not bool(candidate_mask[:, 0].all()):
            first = int(torch.nonzero(~candidate_mask[:, 0])[0])
            raise ValueError(f"candidate_mask: prompt {first} has no positive (column 0)")
    if ref_logps is not None:
        checks.require_shape("ref_logps", ref_logps, (b, c), "reference score of every candidate")
        checks.require_same("ref_logps", ref_logps, "hidden", hidden, dtype=False)
    logps = sequence_logprobs(
        hidden, weight, labels, bias,
        sequence_ids=sequence_ids, num_sequences=b * c if sequence_ids is not None else None,
        sequence_mask=candidate_mask, reduction=reduction, ignore_index=ignore_index,
        chunk_size=chunk_size, memory_budget=memory_budget, backend=backend, check_finite=check_finite,
    ).reshape(b, c)  # fmt: skip
    out = preference_loss(
        logps[:, 0], logps[:, 1:],
        None if candidate_mask is None else candidate_mask[:, 1:],
        None if ref_logps is None else ref_logps[:, 0],
        None if ref_logps is None else ref_logps[:, 1:],
        method=method, beta=beta, gamma=gamma, sharing=sharing, user_embeddings=user_embeddings, rho=rho,
        confidence=confidence, margin_state=margin_state, margin_mode=margin_mode, alpha=alpha, mu=mu,
        tau=tau, detach_shared=detach_shared, backend=backend, check_finite=check_finite,
        process_group=process_group,
    )  # fmt: skip
    return out if return_outputs else out.loss


class PreferenceLoss(nn.Module):
    """``napo_loss`` as a module that keeps NAPO's margin EMA in its ``state_dict``.

    >>> criterion = PreferenceLoss(method="napo", beta=1.0)
    >>> out = criterion(hidden, model.lm_head.weight, labels)   # PreferenceOutput
    >>> out.loss.backward()
    """

    def __init__(
        self,
        method: str = "napo",
        *,
        beta: float = 1.0,
        gamma: float | None = None,
        sharing: str | Tensor | None = None,
        rho: float = 0.7,
        margin_mode: str = "batch",
        alpha: float = 0.3,
        mu: float = 0.9,
        tau: float = 2.0,
        detach_shared: bool = False,
        reduction: str = "sum",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        backend: str = "auto",
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.beta, self.gamma, self.sharing, self.rho = method, beta, gamma, sharing, rho
        self.tau, self.detach_shared, self.reduction = tau, detach_shared, reduction
        self.chunk_size, self.memory_budget, self.backend = chunk_size, memory_budget, backend
        self.process_group = process_group
        self.margin = (
            DynamicMargin(1.0 if gamma is None else gamma, alpha, mu, margin_mode)
            if method == "napo"
            else None
        )

    def extra_repr(self) -> str:
        return f"method={self.method!r}, beta={self.beta}, backend={self.backend!r}"

    def _options(self) -> dict:
        return dict(
            method=self.method, beta=self.beta, gamma=self.gamma, sharing=self.sharing, rho=self.rho,
            margin_state=self.margin, tau=self.tau, detach_shared=self.detach_shared, backend=self.backend,
            process_group=self.process_group,
        )  # fmt: skip

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, **kwargs) -> PreferenceOutput:
        """Same inputs as :func:`napo_loss` (``bias``, ``sequence_ids``, ``candidate_mask``,
        ``ref_logps``, ``user_embeddings``, ``confidence``, ...)."""
        opts = self._options() | dict(
            reduction=self.reduction, chunk_size=self.chunk_size, memory_budget=self.memory_budget
        )
        return napo_loss(hidden, weight, labels, **(opts | kwargs), return_outputs=True)

    def from_logps(self, chosen_logps: Tensor, rejected_logps: Tensor, *args, **kwargs) -> PreferenceOutput:
        """The loss from precomputed scores (see :func:`preference_loss`)."""
        return preference_loss(chosen_logps, rejected_logps, *args, **(self._options() | kwargs))
