"""Shared negatives across data-parallel ranks: NAPO's in-batch pool over ``torch.distributed``.

Each rank scores only its own prompts (one forward pass, as without sharing). The loss then
all-gathers the negatives' rewards (with gradient) and the small detached inputs of the selection
(negative masks, confidences, policy scores, user embeddings), builds the pool of every LOCAL
positive over the GLOBAL batch of ``G = sum_r B_r`` prompts (ranks concatenated in rank order, so
batches may be uneven) and evaluates only its local rows. The gather's backward all-reduces the
gradient of the gathered rewards: the rank that owns a negative receives the sum, over the rows of
every rank, of the gradient they send it. Selection (top-m users, DynamicPO's boundary set, NAPO's
margin) sees exactly what one process holding the global batch would see.

Loss scale: rank ``r`` returns ``loss_r = (W / G) * sum_{i on rank r} L_i`` (``W`` ranks; the local
mean when batches are equal). So the mean over ranks of ``loss_r`` is the single-process loss
``L = (1/G) sum_i L_i``, each rank's score tensors receive ``W * dL/ds`` (W times the single-process
gradient of those scores), and the parameter gradient after DDP/FSDP averaging,
``(1/W) sum_r grad_r``, is exactly the gradient one process holding the global batch computes.
(A loop that sums gradients over ranks instead of averaging them should divide the loss by ``W``.)

Collectives per call, all on ``process_group`` (every rank must call with the same options):

1. all-gather of a small int64 fingerprint (batch size, K, dtype, method, sharing, options, margin
   EMA), so a disagreement, or invalid input on one rank, raises the same error on every rank
   instead of leaving the others waiting in a collective;
2. all-gather of the detached float64 payload and 3. of the rewards (backward: one all-reduce);
4. NAPO only: all-reduce of the margin's ``(sum, count)`` of confidences (through
   :class:`DynamicMargin`'s ``reduce_mean``), so every rank's EMA follows the global batch.

With ``sharing="own"`` steps 2 and 3 are skipped (an own pool needs no other rank's negatives: S-DPO,
DMPO, DynamicPO and DPO then exchange only the fingerprint); only the loss scale uses ``G``.
What the fingerprint cannot see: a rank that skips ``backward`` or calls the loss a different number
of times than the others still leaves them waiting (until the process group's timeout).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from . import pipeline
from .config import LossConfig
from .logprobs import resolve_backend
from .margin import MARGIN_MODES, DynamicMargin
from .plan import negative_pool, share_matrix

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["all_gather_rows", "data_parallel_group", "preference_loss_across_ranks"]


def data_parallel_group() -> ProcessGroup | None:
    """The default process group when ``torch.distributed`` runs with more than one rank, else
    ``None`` (no sharing across ranks): a convenient ``process_group=`` for training scripts."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


# ----------------------------------------------------------------------------------------------
# All-gather of uneven row blocks, with the gradient going back to the rank that owns each row.
# ----------------------------------------------------------------------------------------------


def _gather_padded(x: Tensor, sizes: list[int], group: ProcessGroup) -> Tensor:
    # Collectives need equal shapes on every rank: pad to the largest batch, strip after.
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group: ProcessGroup) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x.detach(), sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, rank = ctx.sizes, ctx.rank
        # Every rank holds gradients for every rank's rows; summing them (an all-reduce: gloo has
        # no reduce-scatter) gives each owner the total over all ranks' losses.
        padded = grad.new_zeros((len(sizes), max(sizes), *grad.shape[1:]))
        for r, (lo, n) in enumerate(zip(_offsets(sizes), sizes)):
            padded[r, :n] = grad[lo : lo + n]
        dist.all_reduce(padded, group=ctx.group)
        return padded[rank, : sizes[rank]], None, None, None


def _offsets(sizes: list[int]) -> list[int]:
    return [sum(sizes[:r]) for r in range(len(sizes))]


def all_gather_rows(x: Tensor, process_group: ProcessGroup, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's ``x [B_r, ...]`` in rank order (``B_r`` may differ across ranks;
    the trailing shape and dtype may not). Differentiable: the backward sums, over all ranks, the
    gradient of each rank's rows and returns it to that rank (``torch.distributed.nn.all_gather``
    does the same but needs equal sizes). ``sizes`` (every rank's ``B_r``) saves one collective
    when already known."""
    if sizes is None:
        mine = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(parts, mine, group=process_group)
        sizes = [int(p) for p in parts]
    return _AllGatherRows.apply(x, sizes, dist.get_rank(process_group), process_group)


# ----------------------------------------------------------------------------------------------
# The configuration fingerprint: one int64 row per rank, compared field by field.
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SHARING = ("own", "all", "similarity", "matrix")
_BOOL, _FLOAT, _NEAR = "bool", "float", "float within 1e-9"
_OK, _INVALID = 0, 1
# A fingerprint entry: (name in error messages, how to compare and print it, int64 code).
Entry = tuple[str, object, int]


def _bits(value: float | None) -> int:
    return struct.unpack("<q", struct.pack("<d", float("nan") if value is None else float(value)))[0]


def _float(code: int) -> float:
    return struct.unpack("<d", struct.pack("<q", code))[0]


def _agree(kind: object, values: list[int]) -> bool:
    if kind == _NEAR:
        x = [_float(v) for v in values]
        if any(math.isnan(v) for v in x):
            return all(math.isnan(v) for v in x)
        return max(x) - min(x) <= 1e-9 * max(1.0, *map(abs, x))
    return len(set(values)) == 1


def _show(kind: object, code: int) -> str:
    if kind in (_FLOAT, _NEAR):
        return repr(_float(code))
    if kind == _BOOL:
        return str(bool(code))
    if isinstance(kind, tuple):
        return str(kind[code]) if 0 <= code < len(kind) else "None"
    return str(code)


def _config_entries(config: LossConfig) -> list[Entry]:
    """Every LossConfig field, generically: a new field is compared across ranks with no edit here."""
    entries: list[Entry] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            entries.append((f.name, choices, -1 if value is None else choices.index(value)))
        else:
            entries.append((f.name, _FLOAT, _bits(value)))
    return entries


def _fingerprint(scores: pipeline.Scores, confidence: Tensor | None, user_embeddings: Tensor | None,
                 mode: str, matrix: Tensor | None, config: LossConfig,
                 margin: DynamicMargin | None) -> list[Entry]:  # fmt: skip
    rows, cols = (-1, -1) if matrix is None else tuple(matrix.shape)
    entries: list[Entry] = [
        ("status", None, _OK),
        ("prompts", None, scores.rejected.shape[0]),  # may differ across ranks
        ("K (negatives per prompt)", None, scores.rejected.shape[1]),
        ("score dtype", _DTYPES, _DTYPES.index(scores.chosen.dtype)),
        ("sharing", _SHARING, _SHARING.index(mode)),
        ("sharing matrix rows", None, rows),
        ("sharing matrix columns", None, cols),
        ("reference scores given", _BOOL, scores.has_ref),
        ("confidence given", _BOOL, confidence is not None),
        ("user embedding size", None, user_embeddings.shape[1] if mode == "similarity" else -1),
        # decides whether backward runs a collective
        ("rejected_logps requires grad", _BOOL, torch.is_grad_enabled() and scores.rejected.requires_grad),
        *_config_entries(config),
        ("margin gamma0", _FLOAT, _bits(None if margin is None else margin.gamma0)),
        ("margin alpha", _FLOAT, _bits(None if margin is None else margin.alpha)),
        ("margin mu", _FLOAT, _bits(None if margin is None else margin.mu)),
        ("margin mode", MARGIN_MODES, -1 if margin is None else MARGIN_MODES.index(margin.mode)),
        # all-reduce results may differ across ranks in the last bit: compare with a tolerance
        ("margin EMA", _NEAR, _bits(None if margin is None else float(margin.ema))),
    ]
    return [(name, kind, int(code)) for name, kind, code in entries]


def _device_of(x: object, group: ProcessGroup) -> torch.device:
    if isinstance(x, Tensor):
        return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange(codes: list[int], device: torch.device, group: ProcessGroup) -> list[list[int]]:
    mine = torch.tensor(codes, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [p.tolist() for p in parts]


def _check_agreement(
    table: list[list[int]], entries: list[Entry] | None, local_error: Exception | None
) -> None:
    """Raise the same error on every rank when any rank's inputs are invalid or ranks disagree."""
    bad = [r for r, row in enumerate(table) if row[0] != _OK]
    if local_error is not None:
        raise local_error
    if bad:
        raise ValueError(
            f"rank {bad[0]} rejected its own inputs (its error says why); every rank stops here so that "
            "none waits in a collective"
        )
    assert entries is not None
    for f, (name, kind, _) in enumerate(entries[2:], start=2):
        values = [row[f] for row in table]
        if not _agree(kind, values):
            shown = ", ".join(f"rank {r}: {_show(kind, v)}" for r, v in enumerate(values))
            raise ValueError(
                f"ranks disagree on {name} ({shown}); every rank must call the loss with the same "
                "configuration when sharing negatives across ranks"
            )


# ----------------------------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------------------------


def preference_loss_across_ranks(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    negative_mask: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    process_group: ProcessGroup,
    config: LossConfig,
    margin: DynamicMargin | None,
    sharing_matrix: Tensor | None = None,
    user_embeddings: Tensor | None = None,
    confidence: Tensor | None = None,
    backend: str = "auto",
    check_finite: bool = False,
) -> pipeline.PreferenceOutput:
    """The stage-2 pipeline with the negative pool spanning every rank of ``process_group`` (what
    ``preference_loss(..., process_group=group)`` calls, with its ``config`` and resolved ``margin``).

    Every argument is the rank's own part of the global batch (``[B_r]``, ``[B_r, K]``,
    ``[B_r, D]``), except ``sharing_matrix``: the ``[G, G]`` share matrix of the global batch (the
    same on every rank). ``B_r`` may differ across ranks; ``K``, dtypes and all options must agree
    (checked: a mismatch raises ``ValueError`` on every rank).

    Returns the rank's :class:`PreferenceOutput`: ``rows`` are its local prompts' losses, ``loss`` is
    ``(W / G) * rows.sum()`` (its mean over ranks is the global-batch loss, and DDP's gradient
    averaging then gives the single-process gradient; see the module docstring). Metrics describe
    the local rows against the global pool. Every rank must call ``backward`` (it runs a collective).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group given, but torch.distributed is not initialised")
    if not isinstance(process_group, dist.ProcessGroup):
        got = type(process_group).__name__
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {got}")
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    mode = "matrix" if sharing_matrix is not None else config.resolved_sharing(user_embeddings is not None)

    # 1. Validate locally, but raise only after the fingerprint exchange so no rank is left waiting.
    local_error: Exception | None = None
    entries: list[Entry] | None = None
    codes = [_INVALID] + [0] * (len(_fingerprint_names(config)) - 1)
    try:
        scores = pipeline.validate_scores(
            chosen_logps, rejected_logps, negative_mask, ref_chosen_logps, ref_rejected_logps, confidence,
            user_embeddings, config, mode, check_finite,
        )  # fmt: skip
        if sharing_matrix is not None and sharing_matrix.dim() != 2:
            raise ValueError(f"sharing must be the [G, G] bool share matrix of the global batch, got "
                             f"{list(sharing_matrix.shape)}")  # fmt: skip
        if mode == "own":
            pipeline.check_pools(scores.mask, lambda i: f"negative_mask: prompt {i} of rank {rank}")
        backend_name = resolve_backend(backend, chosen_logps.device)
        entries = _fingerprint(scores, confidence, user_embeddings, mode, sharing_matrix, config, margin)
        codes = [code for _, _, code in entries]
    except Exception as exc:  # any local failure: re-raised after the exchange, so no rank hangs
        local_error = exc
    table = _exchange(codes, _device_of(chosen_logps, process_group), process_group)
    _check_agreement(table, entries, local_error)

    sizes = [row[1] for row in table]
    total = sum(sizes)
    device = chosen_logps.device
    if sharing_matrix is not None:
        pipeline.validate_share_matrix(
            sharing_matrix,
            total,
            device,
            f"the [G, G] share matrix of the global batch; ranks hold {sizes} prompts",
        )
    cols = _global_columns(scores, confidence, user_embeddings, mode, sharing_matrix, config.rho, sizes,
                           rank, process_group)  # fmt: skip
    pool = negative_pool(cols.share, cols.mask)

    bind = margin is not None and margin.reduce_mean is None
    if bind:  # average NAPO's EMA across ranks for this call
        margin.reduce_mean = _all_reduce_sum(process_group)
    try:
        plan = pipeline.make_plan(config, pool, cols, scores.chosen, margin)
    finally:
        if bind:
            margin.reduce_mean = None
    rows = pipeline.evaluate(scores, cols, plan, backend_name)
    loss = rows.sum() * (world / total)
    metrics = pipeline.metrics(scores, cols, plan, rows)
    return pipeline.PreferenceOutput(loss, chosen_logps, scores.rejected, metrics, rows)


def _fingerprint_names(config: LossConfig) -> list[str]:
    """The fingerprint's length without valid inputs (a rank whose inputs failed still joins the exchange)."""
    return [name for name, _, _ in _fingerprint(_DUMMY, None, None, "own", None, config, None)]


def _global_columns(
    scores: pipeline.Scores,
    confidence: Tensor | None,
    user_embeddings: Tensor | None,
    mode: str,
    matrix: Tensor | None,
    rho: float,
    sizes: list[int],
    rank: int,
    group: ProcessGroup,
) -> pipeline.Columns:
    """The columns of every rank (own sharing: this rank's only, and nothing is exchanged)."""
    b, k = scores.mask.shape
    device = scores.chosen.device
    if mode == "own":
        return pipeline.local_columns(scores, torch.eye(b, dtype=torch.bool, device=device), confidence)
    total, offset = sum(sizes), sum(sizes[:rank])
    conf = None if confidence is None else confidence.detach()
    policy = scores.rejected.detach().to(scores.acc).masked_fill(~scores.mask, 0.0)
    # One gather for the small detached inputs of the selection, one (differentiable) for the rewards.
    parts = [scores.mask.to(torch.float64)]
    parts += [] if conf is None else [conf.to(torch.float64)]
    parts += [policy.to(torch.float64)] if scores.has_ref else []
    parts += [user_embeddings.detach().to(torch.float64)] if mode == "similarity" else []
    payload = _gather_padded(torch.cat(parts, 1), sizes, group)
    mask = payload[:, :k] > 0.5
    col = k
    if conf is not None:
        conf, col = payload[:, col : col + k], col + k
    r_neg = _AllGatherRows.apply(scores.r_neg, sizes, rank, group)
    if scores.has_ref:
        policy, col = payload[:, col : col + k].to(scores.acc), col + k
    else:
        policy = r_neg.detach()  # reference-free: rewards are the policy scores
    users = payload[:, col:] if mode == "similarity" else None
    full = share_matrix(total, matrix if matrix is not None else mode, users, rho, device)
    _check_global_pools(full, mask, sizes)  # on the global batch: every rank raises alike
    return pipeline.Columns(
        r_neg=r_neg.reshape(-1),
        scores=policy.reshape(-1),
        mask=mask,
        confidence=None if conf is None else conf.reshape(-1),
        share=full[offset : offset + b],
        offset=offset,
    )


def _check_global_pools(share: Tensor, mask: Tensor, sizes: list[int]) -> None:
    """Prompt i's pool is empty iff no prompt it shares with has a valid negative."""
    offsets = _offsets(sizes)

    def describe(g: int) -> str:
        r = max(r for r, lo in enumerate(offsets) if lo <= g)
        return f"prompt {g - offsets[r]} of rank {r} (global prompt {g})"

    pipeline.check_pools(share & mask.any(1)[None, :], describe)


def _all_reduce_sum(group: ProcessGroup) -> Callable[[Tensor], Tensor]:
    def reduce(total: Tensor) -> Tensor:
        total = total.clone()
        dist.all_reduce(total, group=group)  # the margin uses sum / count: summing is exact
        return total

    return reduce


_DUMMY = pipeline.Scores(
    chosen=torch.zeros(1),
    rejected=torch.zeros(1, 1),
    mask=torch.ones(1, 1, dtype=torch.bool),
    r_pos=torch.zeros(1),
    r_neg=torch.zeros(1, 1),
    has_ref=False,
)
