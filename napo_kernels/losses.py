"""Public loss API: the family from per-sequence scores, the fused end-to-end entry, and the module.

Hyper-parameters are the fields of :class:`~napo_kernels.LossConfig` (passed as keywords, or as one
``config=``); the stage-2 work is :mod:`napo_kernels.pipeline`; with ``process_group`` the pool spans
every rank (:mod:`napo_kernels.distributed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import checks, distributed, pipeline
from .config import LossConfig
from .constants import IGNORE_INDEX
from .logprobs import resolve_backend, sequence_logprobs
from .margin import DynamicMargin
from .pipeline import PreferenceOutput
from .plan import negative_pool, share_matrix

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _split_sharing(hyper: dict[str, Any]) -> Tensor | None:
    """A ``[B, B]`` share matrix is data, not configuration: take it out of the keywords."""
    if isinstance(hyper.get("sharing"), Tensor):
        return hyper.pop("sharing")
    return None


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    negative_mask: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    user_embeddings: Tensor | None = None,
    confidence: Tensor | None = None,
    margin_state: DynamicMargin | None = None,
    backend: str = "auto",
    check_finite: bool = False,
    return_outputs: bool = False,
    process_group: ProcessGroup | None = None,
    config: LossConfig | None = None,
    **hyper: Any,
) -> Tensor | PreferenceOutput:
    """The multi-negative preference loss (mean over prompts) from per-sequence scores.

    Args:
        chosen_logps: ``[B]`` policy score ``s_theta`` of each prompt's positive.
        rejected_logps: ``[B, K]`` policy scores of each prompt's own negatives.
        negative_mask: ``[B, K]`` bool, False where a prompt has fewer than K negatives.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` and ``[B, K]`` reference scores (no
            gradient); omit both for reference-free rewards ``r = s_theta``.
        user_embeddings: ``[B, D]`` for ``sharing="similarity"``.
        confidence: NAPO: ``[B, K]`` confidence of each negative (default ``sigmoid(beta r_n)``,
            detached).
        margin_state: NAPO: a :class:`DynamicMargin` carrying the EMA across steps; it fixes
            ``gamma0``, ``alpha``, ``mu`` and ``margin_mode`` (giving them too is an error). Without
            one, a fresh EMA (``Mbar_0 = 0``) is used on every call; :class:`PreferenceLoss` keeps it.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.
        check_finite: reject NaN/inf inputs with an error naming the argument and index.
        return_outputs: return a :class:`PreferenceOutput` (loss, scores, TRL-named metrics, per-prompt
            rows) instead of the scalar loss.
        process_group: share negatives across the ranks of this ``torch.distributed`` group: each
            rank passes its own prompts and the pool spans the global batch (``docs/distributed.md``).
        config: a :class:`LossConfig`, instead of the keyword hyper-parameters.
        **hyper: the fields of :class:`LossConfig`: ``method`` (default ``"napo"``), ``beta``,
            ``gamma`` (additive margin of dpo/s_dpo/dmpo), ``gamma0`` (NAPO's base margin),
            ``sharing`` (``"own"``, ``"all"``, ``"similarity"``, or here also a ``[B, B]`` bool
            matrix with a True diagonal), ``rho``, ``margin_mode``, ``alpha``, ``mu``, ``tau``,
            ``detach_negatives``.

    Returns:
        The scalar loss (gradients flow to the scores), or a :class:`PreferenceOutput`.
    """
    matrix = _split_sharing(hyper)
    cfg = LossConfig.build(config, hyper)
    margin = pipeline.resolve_margin(cfg, margin_state)
    out = _preference(
        cfg, margin, chosen_logps, rejected_logps, negative_mask, ref_chosen_logps, ref_rejected_logps,
        matrix, user_embeddings, confidence, backend, check_finite, process_group,
    )  # fmt: skip
    pipeline.warn_stateless_margin(cfg, margin_state)
    return out if return_outputs else out.loss


def _preference(
    cfg: LossConfig,
    margin: DynamicMargin | None,
    chosen: Tensor,
    rejected: Tensor,
    negative_mask: Tensor | None,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    matrix: Tensor | None,
    user_embeddings: Tensor | None,
    confidence: Tensor | None,
    backend: str,
    check_finite: bool,
    process_group: ProcessGroup | None,
) -> PreferenceOutput:
    if matrix is not None and cfg.sharing is not None:
        raise ValueError("sharing is given twice: as a matrix and in config")
    if matrix is not None and cfg.spec.single_negative:
        raise ValueError("method='dpo' compares each positive with its own negative: no sharing matrix")
    if process_group is not None:
        return distributed.preference_loss_across_ranks(
            chosen, rejected, negative_mask, ref_chosen, ref_rejected, process_group=process_group,
            config=cfg, margin=margin, sharing_matrix=matrix, user_embeddings=user_embeddings,
            confidence=confidence, backend=backend, check_finite=check_finite,
        )  # fmt: skip
    sharing = "matrix" if matrix is not None else cfg.resolved_sharing(user_embeddings is not None)
    scores = pipeline.validate_scores(
        chosen, rejected, negative_mask, ref_chosen, ref_rejected, confidence, user_embeddings, cfg, sharing,
        check_finite,
    )  # fmt: skip
    b, device = scores.chosen.shape[0], scores.chosen.device
    if matrix is not None:
        pipeline.validate_share_matrix(matrix, b, device, "a [B, B] bool share matrix")
    share = share_matrix(b, matrix if matrix is not None else sharing, user_embeddings, cfg.rho, device)
    cols = pipeline.local_columns(scores, share, confidence)
    pool = negative_pool(share, cols.mask)
    pipeline.check_pools(pool, lambda i: f"prompt {i}")
    plan = pipeline.make_plan(cfg, pool, cols, scores.chosen, margin)
    rows = pipeline.evaluate(scores, cols, plan, resolve_backend(backend, device))
    return PreferenceOutput(
        rows.mean(), chosen, scores.rejected, pipeline.metrics(scores, cols, plan, rows), rows
    )


def napo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    sequence_ids: Tensor | None = None,
    num_prompts: int | None = None,
    num_candidates: int | None = None,
    candidate_mask: Tensor | None = None,
    ref_logps: Tensor | None = None,
    user_embeddings: Tensor | None = None,
    confidence: Tensor | None = None,
    margin_state: DynamicMargin | None = None,
    reduction: str = "sum",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    check_finite: bool = False,
    return_outputs: bool = False,
    process_group: ProcessGroup | None = None,
    config: LossConfig | None = None,
    **hyper: Any,
) -> Tensor | PreferenceOutput:
    """Fused loss from the policy's last hidden states: sequence log-probs (stage 1) and the
    multi-negative preference loss (stage 2), each with a hand-written backward.

    Layouts: ``hidden [B, C, T, H]`` with ``labels [B, C, T]`` where candidate 0 of every prompt
    is the positive and candidates ``1..C-1`` its ``K = C - 1`` negatives; or packed rows
    ``hidden [N, H]``, ``labels [N]`` with ``sequence_ids [N]`` (``= b * C + c``), ``num_prompts``
    and ``num_candidates``. ``candidate_mask [B, C]`` (bool) marks existing candidates (column 0
    must be True); ``ref_logps [B, C]`` are reference scores (omit for reference-free rewards).
    ``user_embeddings``, ``confidence``, ``margin_state``, ``process_group``, ``config`` and the
    keyword hyper-parameters are those of :func:`preference_loss`; the head (``bias``, ``softcap``,
    ``logit_scale``: :func:`napo_kernels.heads.lm_head_of` reads them from a Hugging Face model) and
    ``reduction``, ``ignore_index``, ``chunk_size``, ``memory_budget`` those of
    :func:`sequence_logprobs`. Returns the scalar loss, or
    a :class:`PreferenceOutput` with ``return_outputs=True``.
    """
    matrix = _split_sharing(hyper)
    cfg = LossConfig.build(config, hyper)
    margin = pipeline.resolve_margin(cfg, margin_state)
    out = _fused(
        cfg, margin, hidden, weight, labels, _head(bias, softcap, logit_scale), sequence_ids, num_prompts,
        num_candidates, candidate_mask, ref_logps, matrix, user_embeddings, confidence, reduction,
        ignore_index, chunk_size, memory_budget, backend, check_finite, process_group,
    )  # fmt: skip
    pipeline.warn_stateless_margin(cfg, margin_state)
    return out if return_outputs else out.loss


def _head(bias: Tensor | None, softcap: float | None, logit_scale: float) -> dict[str, Any]:
    """The head's stage-1 options; the defaults are left out (a plain ``h W^T + b`` head)."""
    head: dict[str, Any] = {"bias": bias}
    if softcap is not None:
        head["softcap"] = softcap
    if logit_scale != 1.0:
        head["logit_scale"] = logit_scale
    return head


def _fused(
    cfg: LossConfig,
    margin: DynamicMargin | None,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    head: dict[str, Any],
    sequence_ids: Tensor | None,
    num_prompts: int | None,
    num_candidates: int | None,
    candidate_mask: Tensor | None,
    ref_logps: Tensor | None,
    matrix: Tensor | None,
    user_embeddings: Tensor | None,
    confidence: Tensor | None,
    reduction: str,
    ignore_index: int,
    chunk_size: int | None,
    memory_budget: int | None,
    backend: str,
    check_finite: bool,
    process_group: ProcessGroup | None,
) -> PreferenceOutput:
    checks.require_tensor("hidden", hidden)
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
        checks.require_tensor("candidate_mask", candidate_mask)
        checks.require_shape("candidate_mask", candidate_mask, (b, c), "[B, C], candidate 0 is the positive")
        checks.require_same("candidate_mask", candidate_mask, "hidden", hidden, dtype=False)
        checks.require_mask("candidate_mask", candidate_mask)
        candidate_mask = candidate_mask.bool()
        if not bool(candidate_mask[:, 0].all()):
            first = int(torch.nonzero(~candidate_mask[:, 0])[0])
            raise ValueError(f"candidate_mask: prompt {first} has no positive (column 0)")
    if ref_logps is not None:
        checks.require_tensor("ref_logps", ref_logps)
        checks.require_shape("ref_logps", ref_logps, (b, c), "reference score of every candidate")
        checks.require_float("ref_logps", ref_logps)
        checks.require_same("ref_logps", ref_logps, "hidden", hidden, dtype=False)
    if check_finite:  # here, so that errors name napo_loss's own arguments and indices
        for name, x in (
            ("ref_logps", ref_logps),
            ("confidence", confidence),
            ("user_embeddings", user_embeddings),
        ):
            if x is not None:
                checks.require_finite(name, checks.require_tensor(name, x))
    logps = sequence_logprobs(
        hidden, weight, labels, **head,
        sequence_ids=sequence_ids, num_sequences=b * c if sequence_ids is not None else None,
        sequence_mask=candidate_mask, reduction=reduction, ignore_index=ignore_index,
        chunk_size=chunk_size, memory_budget=memory_budget, backend=backend, check_finite=check_finite,
    ).reshape(b, c)  # fmt: skip
    return _preference(
        cfg, margin, logps[:, 0], logps[:, 1:],
        None if candidate_mask is None else candidate_mask[:, 1:],
        None if ref_logps is None else ref_logps[:, 0],
        None if ref_logps is None else ref_logps[:, 1:],
        matrix, user_embeddings, confidence, backend, False, process_group,
    )  # fmt: skip


class PreferenceLoss(nn.Module):
    """``napo_loss`` as a module: the configuration is fixed (and validated) at construction, and
    NAPO's margin EMA lives in its ``state_dict``. Calls return a :class:`PreferenceOutput`.

    >>> criterion = PreferenceLoss(method="napo", beta=1.0)
    >>> out = criterion(hidden, model.lm_head.weight, labels)   # PreferenceOutput
    >>> out.loss.backward()
    """

    def __init__(
        self,
        method: str | None = None,
        *,
        config: LossConfig | None = None,
        reduction: str = "sum",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        backend: str = "auto",
        process_group: ProcessGroup | None = None,
        **hyper: Any,
    ) -> None:
        super().__init__()
        if method is not None:
            hyper["method"] = method
        if isinstance(hyper.get("sharing"), Tensor):
            raise TypeError("a [B, B] sharing matrix is per batch: pass it to the call, not to the module")
        self.config = LossConfig.build(config, hyper)
        checks.require_chunk_size(chunk_size)
        self.reduction, self.chunk_size, self.memory_budget = reduction, chunk_size, memory_budget
        self.backend, self.process_group = backend, process_group
        self.margin = self.config.new_margin()

    @property
    def method(self) -> str:
        return self.config.method

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}"

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None = None,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        sequence_ids: Tensor | None = None,
        num_prompts: int | None = None,
        num_candidates: int | None = None,
        candidate_mask: Tensor | None = None,
        ref_logps: Tensor | None = None,
        sharing: Tensor | None = None,
        user_embeddings: Tensor | None = None,
        confidence: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        check_finite: bool = False,
        **fixed: Any,
    ) -> PreferenceOutput:
        """The inputs of :func:`napo_loss`, and a per-batch ``[B, B]`` ``sharing`` matrix;
        hyper-parameters and kernel options are fixed at construction."""
        if fixed:
            got = sorted(fixed)
            raise TypeError(
                f"PreferenceLoss got {got}: hyper-parameters and kernel options are fixed at construction"
            )
        return _fused(
            self.config, self.margin, hidden, weight, labels, _head(bias, softcap, logit_scale), sequence_ids,
            num_prompts, num_candidates, candidate_mask, ref_logps, sharing, user_embeddings, confidence,
            self.reduction, ignore_index, self.chunk_size, self.memory_budget, self.backend, check_finite,
            self.process_group,
        )  # fmt: skip

    def from_logps(
        self,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        negative_mask: Tensor | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        *,
        sharing: Tensor | None = None,
        user_embeddings: Tensor | None = None,
        confidence: Tensor | None = None,
        check_finite: bool = False,
    ) -> PreferenceOutput:
        """The loss from precomputed scores (see :func:`preference_loss`)."""
        return _preference(
            self.config, self.margin, chosen_logps, rejected_logps, negative_mask, ref_chosen_logps,
            ref_rejected_logps, sharing, user_embeddings, confidence, self.backend, check_finite,
            self.process_group,
        )  # fmt: skip
