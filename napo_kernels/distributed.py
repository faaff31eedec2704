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

import math
import struct
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from . import checks
from .kernels.torch_chunked import acc_dtype
from .logprobs import _resolve_backend
from .losses import PreferenceOutput, _default_sharing, _make_plan, _metrics, _validate
from .margin import MARGIN_MODES, DynamicMargin
from .ops.preference import preference_rows
from .plan import METHODS, share_matrix

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
# (name in error messages, how to print it); "status" and "prompts" may differ across ranks.
_FIELDS: tuple[tuple[str, object], ...] = (
    ("status", None),
    ("prompts", None),
    ("K (negatives per prompt)", None),
    ("score dtype", _DTYPES),
    ("method", METHODS),
    ("sharing", _SHARING),
    ("sharing matrix rows", None),
    ("sharing matrix columns", None),
    ("reference scores given", _BOOL),
    ("confidence given", _BOOL),
    ("user embedding size", None),
    ("rejected_logps requires grad", _BOOL),  # decides whether backward runs a collective
    ("detach_shared", _BOOL),
    ("beta", _FLOAT),
    ("gamma", _FLOAT),
    ("rho", _FLOAT),
    ("tau", _FLOAT),
    ("margin gamma0", _FLOAT),
    ("margin alpha", _FLOAT),
    ("margin mu", _FLOAT),
    ("margin mode", MARGIN_MODES),
    # all-reduce results may differ across ranks in the last bit: compare with a tolerance
    ("margin EMA", _NEAR),
)
_OK, _INVALID = 0, 1


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


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
        return str(kind[code]) if 0 <= code < len(kind) else "?"
    return str(code)


def _device_of(x: object, group: ProcessGroup) -> torch.device:
    if isinstance(x, Tensor):
        return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange(fingerprint: list[int], device: torch.device, group: ProcessGroup) -> list[list[int]]:
    mine = torch.tensor(fingerprint, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [p.tolist() for p in parts]


def _check_agreement(table: list[list[int]], rank: int, local_error: Exception | None) -> None:
    """Raise the same error on every rank when any rank's inputs are invalid or ranks disagree."""
    bad = [r for r, row in enumerate(table) if row[0] != _OK]
    if local_error is not None:
        raise local_error
    if bad:
        raise ValueError(
            f"rank {bad[0]} rejected its own inputs (its error says why); every rank stops here so that "
            "none waits in a collective"
        )
    for f, (name, kind) in enumerate(_FIELDS[2:], start=2):
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

_warned_stateless = False


def preference_loss_across_ranks(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    negative_mask: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    process_group: ProcessGroup,
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
) -> PreferenceOutput:
    """:func:`napo_kernels.preference_loss` with the negative pool spanning every rank of
    ``process_group`` (what ``preference_loss(..., process_group=group)`` calls).

    Every argument is the rank's own part of the global batch (``[B_r]``, ``[B_r, K]``,
    ``[B_r, D]``), except ``sharing`` given as a bool matrix: then it is the ``[G, G]`` share matrix
    of the global batch (the same on every rank). ``B_r`` may differ across ranks; ``K``, dtypes and
    all options must agree (checked: a mismatch raises ``ValueError`` on every rank).

    Returns the rank's :class:`PreferenceOutput`: ``rows`` are its local prompts' losses, ``loss`` is
    ``(W / G) * rows.sum()`` (its mean over ranks is the global-batch loss, and DDP's gradient
    averaging then gives the single-process gradient; see the module docstring). Metrics describe
    the local rows against the global pool. Every rank must call ``backward`` (it runs a collective).
    """
    global _warned_stateless
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group given, but torch.distributed is not initialised")
    if not isinstance(process_group, dist.ProcessGroup):
        got = type(process_group).__name__
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {got}")
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    if sharing is None:
        sharing = _default_sharing(method, user_embeddings)
    mode = "matrix" if isinstance(sharing, Tensor) else sharing

    # 1. Validate locally, but raise only after the fingerprint exchange so no rank is left waiting.
    local_error: Exception | None = None
    fingerprint = [_INVALID] + [0] * (len(_FIELDS) - 1)
    state = margin_state
    try:
        # the [G, G] matrix's size is checked once G is known; validate the rest as a local call
        rejected_logps = _validate(
            chosen_logps, rejected_logps, negative_mask, ref_chosen_logps, ref_rejected_logps,
            method, beta, "all" if mode == "matrix" else sharing, user_embeddings, rho, confidence,
        )  # fmt: skip
        if mode == "matrix" and sharing.dim() != 2:
            raise ValueError(f"sharing must be the [G, G] bool share matrix of the global batch, got "
                             f"{list(sharing.shape)}")  # fmt: skip
        for name, x in (("confidence", confidence), ("user_embeddings", user_embeddings)):
            if x is not None:  # a device mismatch would only surface after the exchange
                checks.require_same(name, x, "chosen_logps", chosen_logps, dtype=False)
        if check_finite:
            named = dict(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                         ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                         confidence=confidence, user_embeddings=user_embeddings)  # fmt: skip
            for name, x in named.items():
                checks.require_finite(name, x)
        if negative_mask is not None and mode == "own":
            empty = ~negative_mask.bool().any(1)
            if bool(empty.any()):
                first = int(torch.nonzero(empty)[0])
                raise ValueError(f"negative_mask: prompt {first} of rank {rank} has an empty negative pool "
                                 "(all its negatives are masked and sharing='own')")  # fmt: skip
        if method == "napo" and state is None:
            state = DynamicMargin(1.0 if gamma is None else gamma, alpha, mu, margin_mode)
        backend_name = _resolve_backend(backend, chosen_logps.device)
        fingerprint = _fingerprint(
            chosen_logps, rejected_logps, ref_chosen_logps, confidence, user_embeddings, method, mode,
            sharing, beta, gamma, rho, tau, detach_shared, state,
        )  # fmt: skip
    except Exception as exc:  # any local failure: re-raised after the exchange, so no rank hangs
        local_error = exc
    table = _exchange(fingerprint, _device_of(chosen_logps, process_group), process_group)
    _check_agreement(table, rank, local_error)

    sizes = [row[1] for row in table]
    total, offset = sum(sizes), sum(sizes[:rank])
    b, k = rejected_logps.shape
    device = chosen_logps.device
    if mode == "matrix" and tuple(sharing.shape) != (total, total):
        raise ValueError(f"sharing must be the [G, G] = [{total}, {total}] share matrix of the global batch "
                         f"(ranks hold {sizes} prompts), got {list(sharing.shape)}")  # fmt: skip

    mask = (
        torch.ones(b, k, dtype=torch.bool, device=device)
        if negative_mask is None
        else negative_mask.to(device=device, dtype=torch.bool)
    )
    acc = acc_dtype(chosen_logps.dtype)
    r_pos, r_neg = chosen_logps.to(acc), rejected_logps.to(acc)
    has_ref = ref_chosen_logps is not None
    if has_ref:
        r_pos = r_pos - ref_chosen_logps.detach().to(acc)
        r_neg = r_neg - ref_rejected_logps.detach().reshape(b, k).to(acc)
    r_neg = r_neg.masked_fill(~mask, 0.0)
    scores = rejected_logps.detach().to(acc).masked_fill(~mask, 0.0)  # policy scores s_theta
    conf = None if confidence is None else confidence.detach().reshape(b, k)

    # 2-3. The global columns: every rank's negatives (own sharing: this rank's only).
    if mode == "own":
        cols, col_offset = b, 0
        share = torch.eye(b, dtype=torch.bool, device=device)
    else:
        parts = [mask.to(torch.float64)]
        parts += [] if conf is None else [conf.to(torch.float64)]
        parts += [scores.to(torch.float64)] if has_ref else []
        parts += [user_embeddings.detach().to(torch.float64)] if mode == "similarity" else []
        payload = _gather_padded(torch.cat(parts, 1), sizes, process_group)
        mask = payload[:, :k] > 0.5
        col = k
        if conf is not None:
            conf, col = payload[:, col : col + k], col + k
        r_neg = _AllGatherRows.apply(r_neg, sizes, rank, process_group)
        if has_ref:
            scores, col = payload[:, col : col + k].to(acc), col + k
        else:
            scores = r_neg.detach()
        users = payload[:, col:] if mode == "similarity" else None
        full = share_matrix(total, sharing, users, rho, device)
        _check_pools(full, mask, sizes)  # on the global batch: every rank raises alike
        cols, col_offset = total, offset
        share = full[offset : offset + b]
    pool = _pool(share, mask)
    r_neg = r_neg.reshape(-1)

    reducer = _all_reduce_sum(process_group)
    bind = state is not None and state.reduce_mean is None
    if bind:  # average NAPO's EMA across ranks for this call
        state.reduce_mean = reducer
    try:
        plan = _make_plan(
            method, beta, gamma, pool, r_neg, chosen_logps, scores, mask, conf,
            state, margin_mode, alpha, mu, tau, acc,
        )  # fmt: skip
    finally:
        if bind:
            state.reduce_mean = None
    if detach_shared:
        own = torch.zeros(b, cols, dtype=torch.bool, device=device)
        own[torch.arange(b, device=device), col_offset + torch.arange(b, device=device)] = True
        plan.grad_mask = _pool(own, mask)
    coef, margin = plan.coef.to(acc), plan.margin.to(acc)
    rows, _ = preference_rows(r_pos, r_neg, plan.select, coef, margin, plan.grad_mask, plan.agg, backend_name)
    loss = rows.sum() * (world / total)
    if method == "napo" and margin_state is None and not _warned_stateless:
        _warned_stateless = True
        warnings.warn(
            "napo: no margin_state given, so the margin EMA restarts from 0 on every call; pass a "
            "DynamicMargin (or use PreferenceLoss) to carry it across steps",
            stacklevel=3,
        )
    metrics = _metrics(r_pos, r_neg, chosen_logps, scores, mask, plan, rows)
    return PreferenceOutput(loss, chosen_logps, rejected_logps, metrics, rows)


def _fingerprint(
    chosen, rejected, ref_chosen, confidence, user_embeddings, method, mode, sharing, beta, gamma, rho, tau,
    detach_shared, state,
) -> list[int]:  # fmt: skip
    nan = float("nan")
    matrix = tuple(sharing.shape) if mode == "matrix" else (-1, -1)
    values = [
        _OK,
        rejected.shape[0],
        rejected.shape[1],
        _DTYPES.index(chosen.dtype),
        METHODS.index(method),
        _SHARING.index(mode),
        *matrix,
        ref_chosen is not None,
        confidence is not None,
        user_embeddings.shape[1] if mode == "similarity" else -1,
        torch.is_grad_enabled() and rejected.requires_grad,
        detach_shared,
        _bits(beta),
        _bits(nan if gamma is None else gamma),
        _bits(rho),
        _bits(tau),
        _bits(nan if state is None else state.gamma0),
        _bits(nan if state is None else state.alpha),
        _bits(nan if state is None else state.mu),
        -1 if state is None else MARGIN_MODES.index(state.mode),
        _bits(nan if state is None else float(state.ema)),
    ]
    return [int(v) for v in values]


def _pool(share: Tensor, mask: Tensor) -> Tensor:
    """``[b, G * K]`` bool from the local rows of the share matrix ``[b, G]`` and the global ``[G, K]``
    negative mask (``plan.negative_pool`` for a non-square share matrix)."""
    return (share[:, :, None] & mask[None, :, :]).reshape(share.shape[0], -1)


def _check_pools(share: Tensor, mask: Tensor, sizes: list[int]) -> None:
    """Prompt i's pool is empty iff no prompt it shares with has a valid negative."""
    empty = ~(share & mask.any(1)[None, :]).any(1)
    if bool(empty.any()):
        g = int(torch.nonzero(empty)[0])
        r = max(r for r, lo in enumerate(_offsets(sizes)) if lo <= g)
        raise ValueError(
            f"prompt {g - _offsets(sizes)[r]} of rank {r} (global prompt {g}) has an empty negative pool "
            "(all its negatives are masked and it shares none)"
        )


def _all_reduce_sum(group: ProcessGroup) -> Callable[[Tensor], Tensor]:
    def reduce(total: Tensor) -> Tensor:
        total = total.clone()
        dist.all_reduce(total, group=group)  # the margin uses sum / count: summing is exact
        return total

    return reduce
