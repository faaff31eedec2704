"""Public stage-1 API: per-sequence log-probs from hidden states (fused) or from logits."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import checks, dispatch
from .constants import IGNORE_INDEX
from .ops.linear_logprobs import keeps_logits, linear_logprobs
from .ops.logits_logprobs import logits_logprobs

# At most this many bytes of fp32 logits exist at once on the fused path (one [chunk, V] block).
DEFAULT_MEMORY_BUDGET = {"cpu": 16 << 20, "cuda": 256 << 20}
# Without an explicit budget, chunks never go below this many rows: thinner GEMMs re-read the whole
# weight per chunk for little saving (at V = 128k, 32-row chunks ran 1.75x slower than 128-row ones).
DEFAULT_MIN_CHUNK_ROWS = 128
REDUCTIONS = ("sum", "mean")


def choose_chunk_size(rows: int, vocab: int, device: torch.device, memory_budget: int | None = None) -> int:
    """Rows per chunk so that one ``[chunk, V]`` fp32 block fits ``memory_budget`` bytes.

    Without a budget: the device default (16 MiB on CPU, 256 MiB on CUDA), but at least
    ``DEFAULT_MIN_CHUNK_ROWS`` rows; an explicit budget is a hard limit.
    """
    if memory_budget is None:
        budget = DEFAULT_MEMORY_BUDGET.get(device.type, 64 << 20)
        chunk = max(DEFAULT_MIN_CHUNK_ROWS, budget // (4 * vocab))
    else:
        chunk = max(1, memory_budget // (4 * vocab))
    if chunk >= 16:
        chunk -= chunk % 16  # whole GEMM tiles
    return max(1, min(chunk, rows))


def _flat_layout(
    labels: Tensor, sequence_ids: Tensor | None, num_sequences: int | None, hidden_rows: int
) -> tuple[Tensor, Tensor, int, tuple[int, ...]]:
    """``(flat labels [N], sequence id per position [N], S, output shape)`` for both layouts."""
    if sequence_ids is None:  # structured: labels [..., T]
        if labels.dim() < 1:
            raise ValueError("labels must have at least one dimension [..., T]")
        out_shape = tuple(labels.shape[:-1])
        s = labels[..., 0].numel() if labels.shape[-1] else 0
        seq = torch.arange(s, device=labels.device).repeat_interleave(labels.shape[-1])
        return labels.reshape(-1), seq, s, out_shape
    checks.require_tensor("sequence_ids", sequence_ids)
    checks.require_int("sequence_ids", sequence_ids)
    checks.require_same("sequence_ids", sequence_ids, "labels", labels, dtype=False)
    if labels.dim() != 1 or sequence_ids.shape != labels.shape:
        raise ValueError(
            f"packed layout: labels and sequence_ids must both be [N]; got {list(labels.shape)} "
            f"and {list(sequence_ids.shape)}"
        )
    if num_sequences is None:
        num_sequences = int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0
    if sequence_ids.numel() and (int(sequence_ids.min()) < 0 or int(sequence_ids.max()) >= num_sequences):
        raise ValueError(f"sequence_ids must lie in [0, {num_sequences}) (num_sequences)")
    return labels, sequence_ids.to(labels.device), num_sequences, (num_sequences,)


def _scored_rows(
    labels: Tensor, seq: Tensor, vocab: int, ignore_index: int, out_shape: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mask [N], targets [R], sequence of each row [R])``; rejects labels outside ``[0, V)``.

    The one check of label values (a host sync): the custom ops and kernels below trust their
    targets, so both public stage-1 functions (and ``napo_loss`` through them) call this first.
    """
    mask = labels != ignore_index
    targets = labels[mask]
    if targets.numel():
        bad = (targets < 0) | (targets >= vocab)
        if bool(bad.any()):
            first = int(torch.nonzero(mask)[int(torch.nonzero(bad)[0])])
            where = _describe_sequence(int(seq[first]), out_shape)
            raise ValueError(
                f"labels: token {int(labels[first])} of {where} is outside [0, {vocab}) "
                f"(the vocabulary of weight) and is not ignore_index={ignore_index}"
            )
    return mask, targets.long(), seq[mask]


def _positive(name: str, value: object, allow_none: bool = False) -> float | None:
    """A head constant (``softcap``, ``logit_scale``): a finite number > 0 (or None if allowed)."""
    if value is None and allow_none:
        return None
    what = "None or a finite number > 0" if allow_none else "a finite number > 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be {what}, got {value}")
    return float(value)


def _describe_sequence(index: int, out_shape: tuple[int, ...]) -> str:
    if len(out_shape) <= 1:
        return f"sequence {index}"
    coords, rest = [], index
    for size in reversed(out_shape):
        coords.append(rest % size)
        rest //= size
    return f"sequence {tuple(reversed(coords))}"


def _reduce(
    row_logps: Tensor,
    rows_seq: Tensor,
    num_sequences: int,
    reduction: str,
    sequence_mask: Tensor | None,
    out_shape: tuple[int, ...],
) -> Tensor:
    counts = torch.bincount(rows_seq, minlength=num_sequences)
    required = counts == 0
    if sequence_mask is not None:
        checks.require_tensor("sequence_mask", sequence_mask)
        checks.require_mask("sequence_mask", sequence_mask)
        if sequence_mask.numel() != num_sequences:
            raise ValueError(
                f"sequence_mask must have {num_sequences} entries, got {list(sequence_mask.shape)}"
            )
        required &= sequence_mask.reshape(-1).to(counts.device).bool()
    if bool(required.any()):
        first = int(torch.nonzero(required)[0])
        raise ValueError(
            f"{_describe_sequence(first, out_shape)} has no scored tokens (every label is ignore_index); "
            "give it at least one label or mark it invalid in the mask"
        )
    scores = row_logps.new_zeros(num_sequences).index_add(0, rows_seq, row_logps)
    if reduction == "mean":
        scores = scores / counts.clamp(min=1).to(scores.dtype)
    return scores.reshape(out_shape)


def resolve_backend(backend: str, device: torch.device) -> str:
    name = dispatch.resolve(backend, device)
    if backend == "auto" and name == "torch" and device.type == "cpu":
        dispatch.warn_if_extension_missing()
    return name


def sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    sequence_mask: Tensor | None = None,
    reduction: str = "sum",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    check_finite: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """Per-sequence log-probability ``s = sum_t log softmax(z_t)[y_t]`` of the head's logits
    ``z_t = logit_scale * (h_t W^T + b)`` (soft-capped to ``softcap * tanh(z_t / softcap)`` when
    ``softcap`` is given), without materialising more than one ``[chunk, V]`` block of logits.

    Args:
        hidden: last hidden states, ``[..., T, H]`` (structured) or ``[N, H]`` rows (packed).
        weight: the output projection (``lm_head.weight``), ``[V, H]``, same dtype and device.
        labels: ``[..., T]`` or ``[N]`` target ids, already aligned with ``hidden`` (the label at
            position t is the token predicted from ``hidden[t]``); ``ignore_index`` marks
            positions that are not scored.
        bias: optional ``[V]`` output bias.
        sequence_ids: packed layout only: ``[N]`` sequence index of every row.
        num_sequences: packed layout only: number of sequences (default ``max(sequence_ids)+1``).
        sequence_mask: sequences allowed to have no scored token (others raise); same number of
            entries as the output.
        reduction: ``"sum"`` (the score every method uses) or ``"mean"`` (length-normalised).
        chunk_size: rows per chunk; default from ``memory_budget`` bytes of fp32 logits.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.
        check_finite: scan ``hidden``/``weight``/``bias`` for NaN/inf first (one extra read).
        softcap: the final logit soft cap of Gemma 2 style heads (``config.final_logit_softcapping``),
            ``None`` (no cap) or a finite number > 0.
        logit_scale: a finite multiplier > 0 of the logits, applied before the cap: Cohere's
            ``config.logit_scale``, Granite's ``1 / config.logits_scaling``, ``1 / T`` to score at a
            temperature ``T``.

    Returns:
        ``[...]`` (structured) or ``[num_sequences]`` (packed) scores in float32 (float64 for
        float64 inputs). Gradients flow to ``hidden``, ``weight`` and ``bias``; with a frozen
        ``weight`` the backward does no vocabulary work.
    """
    checks.require_tensor("hidden", hidden)
    checks.require_tensor("weight", weight)
    checks.require_tensor("labels", labels)
    checks.require_float("hidden", hidden)
    checks.require_int("labels", labels)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got {list(weight.shape)}")
    checks.require_same("weight", weight, "hidden", hidden)
    checks.require_same("labels", labels, "hidden", hidden, dtype=False)
    vocab, h = weight.shape
    if hidden.shape[-1] != h:
        raise ValueError(
            f"hidden has size {hidden.shape[-1]} in its last dimension but weight is [V={vocab}, H={h}]"
        )
    if bias is not None:
        checks.require_tensor("bias", bias)
        checks.require_same("bias", bias, "weight", weight)
        checks.require_shape("bias", bias, (vocab,), "one entry per vocabulary row of weight")
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"hidden {list(hidden.shape)} and labels {list(labels.shape)} disagree: hidden must be labels' "
            "shape plus a trailing H"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    checks.require_chunk_size(chunk_size)
    softcap = _positive("softcap", softcap, allow_none=True)
    logit_scale = _positive("logit_scale", logit_scale)
    if check_finite:
        for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            checks.require_finite(name, x)

    flat_labels, seq, num, out_shape = _flat_layout(labels, sequence_ids, num_sequences, hidden.shape[0])
    mask, targets, rows_seq = _scored_rows(flat_labels, seq, vocab, ignore_index, out_shape)
    flat = hidden.reshape(-1, h)
    # only scored positions cost vocabulary work; when every position is scored, a view: no gather
    # here and no scatter into a zero gradient in the backward
    rows = flat if targets.shape[0] == flat.shape[0] else flat[mask]
    name = resolve_backend(backend, hidden.device)
    chunk = chunk_size or choose_chunk_size(rows.shape[0], vocab, hidden.device, memory_budget)
    # E = softmax W from the forward: the hidden gradient then needs no vocabulary work (frozen or not)
    compute_expected = rows.requires_grad and torch.is_grad_enabled()
    if rows.shape[0] == 0:
        row_logps = rows.new_zeros(0, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    else:
        # a trainable head on the cpp backend keeps its logits for the backward where they fit
        keep = (
            weight.requires_grad
            and torch.is_grad_enabled()
            and keeps_logits(name, rows.shape[0], weight, chunk)
        )
        row_logps = linear_logprobs(
            rows, weight, bias, targets, chunk, compute_expected, name, softcap, logit_scale, keep
        )[0]
    return _reduce(row_logps, rows_seq, num, reduction, sequence_mask, out_shape)


def sequence_logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    sequence_mask: Tensor | None = None,
    reduction: str = "sum",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    backend: str = "auto",
    check_finite: bool = False,
) -> Tensor:
    """Per-sequence log-probability from ready-made logits ``[..., T, V]`` (or ``[N, V]`` packed).

    No ``log_softmax`` tensor is allocated: the forward keeps one log-sum-exp per row and the
    backward writes ``g (onehot - softmax)`` into the logits gradient directly. Arguments as in
    :func:`sequence_logprobs`.
    """
    checks.require_tensor("logits", logits)
    checks.require_tensor("labels", labels)
    checks.require_float("logits", logits)
    checks.require_int("labels", labels)
    checks.require_same("labels", labels, "logits", logits, dtype=False)
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"logits {list(logits.shape)} and labels {list(labels.shape)} disagree: logits must be labels' "
            "shape plus a trailing V"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    checks.require_chunk_size(chunk_size)
    if check_finite:
        checks.require_finite("logits", logits)
    vocab = logits.shape[-1]
    flat_labels, seq, num, out_shape = _flat_layout(labels, sequence_ids, num_sequences, logits.shape[0])
    mask, _, rows_seq = _scored_rows(flat_labels, seq, vocab, ignore_index, out_shape)
    name = resolve_backend(backend, logits.device)
    flat = logits.reshape(-1, vocab)
    # every row goes through the kernel (no [R, V] copy); ignored rows get zero gradient
    targets = flat_labels.masked_fill(~mask, 0).long()
    chunk = chunk_size or choose_chunk_size(flat.shape[0], vocab, logits.device)
    if flat.shape[0] == 0:
        row_logps = flat.new_zeros(0, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    else:
        row_logps = logits_logprobs(flat, targets, chunk, name)[0]
    return _reduce(row_logps[mask], rows_seq, num, reduction, sequence_mask, out_shape)
