"""One forward per prompt for all its candidates.

Scoring ``1 + K`` candidates of a prompt the usual way runs ``1 + K`` sequences that each repeat
the prompt. The *packed* layout puts the prompt once, followed by every candidate:

    [ prompt (P tokens) | cand 0 | cand 1 | ... | cand C-1 | pad ]

with a 4-D attention mask in which a candidate's tokens see the prompt and the earlier tokens of
their own candidate only, and position ids that restart at ``P`` for every candidate. Each
candidate's hidden states are then exactly those of a separate ``prompt + candidate`` forward, so
its score is the same (the tests check it on Llama and GPT-2, eager and SDPA attention).

The first token of every candidate is predicted from the *last prompt position*, which is shared:
the layout therefore emits a gather index (``score_index``) rather than per-position labels, and
that row is gathered once per candidate. What a batch holds (both layouts):

* ``input_ids``, ``position_ids`` ``[rows, L]`` and ``attention_mask`` (packed: ``[B, 1, L, L]``
  bool, True = may attend; separate: ``[B*, L]`` 0/1 padding mask);
* ``score_index [R]``: flat index into the ``[rows * L]`` last hidden states of each scored row;
  ``score_labels [R]``: the token it predicts; ``score_sequence [R]``: ``b * C + c``;
* ``candidate_mask [B, C]`` (candidate 0, the positive, always exists) and
  ``candidate_lengths [B, C]`` (tokens per candidate, 0 where absent).

:func:`candidate_rows` runs the model body on such a batch and returns the ``[R, H]`` hidden rows
that :func:`napo_kernels.napo_loss` / :func:`napo_kernels.sequence_logprobs` consume.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..heads import LMHead, lm_head_of
from ..integrations.sharded import run_as_forward, sharding_of, with_gathered_head
from ..logprobs import sequence_logprobs

LAYOUTS = ("packed", "separate")


def _check_ids(prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]]) -> int:
    if len(prompts) != len(candidates):
        raise ValueError(
            f"prompts ({len(prompts)}) and candidates ({len(candidates)}) must have one entry per prompt"
        )
    if not prompts:
        raise ValueError("prompts: the batch is empty")
    for b, (p, cands) in enumerate(zip(prompts, candidates)):
        if len(p) == 0:
            raise ValueError(f"prompts: prompt {b} has no tokens")
        if len(cands) == 0:
            raise ValueError(f"candidates: prompt {b} has no candidate (candidate 0 is the positive)")
        for c, ids in enumerate(cands):
            if len(ids) == 0:
                raise ValueError(f"candidates: candidate {c} of prompt {b} has no tokens")
    return max(len(c) for c in candidates)


def _candidate_info(
    candidates: Sequence[Sequence[Sequence[int]]], num_candidates: int
) -> tuple[Tensor, Tensor]:
    b = len(candidates)
    mask = torch.zeros(b, num_candidates, dtype=torch.bool)
    lengths = torch.zeros(b, num_candidates, dtype=torch.long)
    for i, cands in enumerate(candidates):
        if len(cands) > num_candidates:
            raise ValueError(
                f"candidates: prompt {i} has {len(cands)} candidates, above num_candidates={num_candidates}"
            )
        mask[i, : len(cands)] = True
        lengths[i, : len(cands)] = torch.tensor([len(c) for c in cands])
    return mask, lengths


def pack_candidates(
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    pad_token_id: int,
    num_candidates: int | None = None,
) -> dict[str, Tensor]:
    """The packed layout: one row per prompt (see the module docstring)."""
    c_max = _check_ids(prompts, candidates)
    num_c = num_candidates or c_max
    cand_mask, cand_len = _candidate_info(candidates, num_c)
    b = len(prompts)
    length = max(len(p) + sum(len(c) for c in cands) for p, cands in zip(prompts, candidates))
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(b, length, dtype=torch.long)
    segment = torch.full((b, length), -2, dtype=torch.long)  # -1 prompt, c >= 0 candidate c, -2 padding
    index, labels, seqs = [], [], []
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        n_p = len(p)
        input_ids[i, :n_p] = torch.as_tensor(p)
        position_ids[i, :n_p] = torch.arange(n_p)
        segment[i, :n_p] = -1
        off = n_p
        for c, ids in enumerate(cands):
            n = len(ids)
            input_ids[i, off : off + n] = torch.as_tensor(ids)
            position_ids[i, off : off + n] = torch.arange(n_p, n_p + n)
            segment[i, off : off + n] = c
            # token j is predicted from the previous position: the last prompt token for j = 0
            rows = [i * length + n_p - 1] + [i * length + off + j for j in range(n - 1)]
            index.extend(rows)
            labels.extend(ids)
            seqs.extend([i * num_c + c] * n)
            off += n
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & ((k == -1) | (k == q))
    # padding queries attend to themselves only, so no row of the mask is empty (NaN-free softmax)
    pad = (segment == -2)[:, :, None] & torch.eye(length, dtype=torch.bool)
    allowed = torch.where((segment == -2)[:, :, None], pad, allowed & (k != -2))
    return {
        "input_ids": input_ids,
        "attention_mask": allowed[:, None],
        "position_ids": position_ids,
        "score_index": torch.tensor(index, dtype=torch.long),
        "score_labels": torch.tensor(labels, dtype=torch.long),
        "score_sequence": torch.tensor(seqs, dtype=torch.long),
        "candidate_mask": cand_mask,
        "candidate_lengths": cand_len,
    }


def separate_candidates(
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    pad_token_id: int,
    num_candidates: int | None = None,
) -> dict[str, Tensor]:
    """The usual layout: one right-padded ``prompt + candidate`` row per existing candidate."""
    c_max = _check_ids(prompts, candidates)
    num_c = num_candidates or c_max
    cand_mask, cand_len = _candidate_info(candidates, num_c)
    seqs_ids = [(i, c, list(p) + list(ids)) for i, (p, cands) in enumerate(zip(prompts, candidates))
                for c, ids in enumerate(cands)]  # fmt: skip
    length = max(len(s) for _, _, s in seqs_ids)
    rows = len(seqs_ids)
    input_ids = torch.full((rows, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    index, labels, seqs = [], [], []
    for r, (i, c, s) in enumerate(seqs_ids):
        input_ids[r, : len(s)] = torch.as_tensor(s)
        attention_mask[r, : len(s)] = 1
        n_p, ids = len(prompts[i]), candidates[i][c]
        index.extend(r * length + n_p - 1 + j for j in range(len(ids)))
        labels.extend(ids)
        seqs.extend([i * num_c + c] * len(ids))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(length).expand(rows, length).clone(),
        "score_index": torch.tensor(index, dtype=torch.long),
        "score_labels": torch.tensor(labels, dtype=torch.long),
        "score_sequence": torch.tensor(seqs, dtype=torch.long),
        "candidate_mask": cand_mask,
        "candidate_lengths": cand_len,
    }


def layout_candidates(layout: str, *args, **kwargs) -> dict[str, Tensor]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return (pack_candidates if layout == "packed" else separate_candidates)(*args, **kwargs)


class CandidateCollator:
    """Tokenizes text features (``{"prompt", "candidates", "history"?, "index"?}``, candidate 0 the
    positive) and lays them out for one forward.

    Args:
        tokenizer: a Hugging Face tokenizer with ``pad_token_id`` (or ``eos_token_id``) set.
        layout: ``"packed"`` (one row per prompt) or ``"separate"`` (one row per candidate); the
            trainers set it from :func:`resolve_layout`.
        max_prompt_length: keep at most this many prompt tokens (the last ones: the candidate list
            and the question sit at the end of the templates).
        add_eos: append EOS to every answer, so a greedy generation learns to stop.
        num_candidates: pad the candidate dimension to this C (default: the batch's largest).

    Extra keys: ``example_index [B]`` and, when features carry a ``history`` of item texts,
    ``history_ids [B, Lh]`` with ``history_weights [B, Lh]`` such that
    ``sum_t w[b, t] * E[history_ids[b, t]]`` is the mean over history items of the mean embedding
    of each item's tokens (the user embedding of :meth:`PreferenceTrainer.user_embeddings`).
    """

    def __init__(
        self,
        tokenizer,
        layout: str = "packed",
        max_prompt_length: int | None = None,
        add_eos: bool = True,
        num_candidates: int | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.tokenizer, self.layout, self.max_prompt_length = tokenizer, layout, max_prompt_length
        self.add_eos, self.num_candidates = add_eos, num_candidates
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither pad_token_id nor eos_token_id")
        if add_eos and tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True needs tokenizer.eos_token_id")
        self.pad_token_id = pad
        self._answer_cache: dict[str, list[int]] = {}

    def prompt_ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text)["input_ids"])
        if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
            ids = ids[-self.max_prompt_length :]
        return ids

    def answer_ids(self, text: str, eos: bool | None = None) -> list[int]:
        eos = self.add_eos if eos is None else eos
        ids = self._answer_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._answer_cache[text] = ids
        return ids + [self.tokenizer.eos_token_id] if eos else list(ids)

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        for i, f in enumerate(features):
            if "prompt" not in f or "candidates" not in f:
                raise ValueError(
                    f"feature {i}: needs 'prompt' and 'candidates' (candidate 0 is the positive)"
                )
        prompts = [self.prompt_ids(f["prompt"]) for f in features]
        cands = [[self.answer_ids(a) for a in f["candidates"]] for f in features]
        batch = layout_candidates(self.layout, prompts, cands, self.pad_token_id, self.num_candidates)
        batch["example_index"] = torch.tensor([int(f.get("index", i)) for i, f in enumerate(features)])
        if any(f.get("history") for f in features):
            batch.update(self._history(features))
        return batch

    def _history(self, features: list[dict]) -> dict[str, Tensor]:
        per_user = []
        for f in features:
            items = [self.answer_ids(h, eos=False) for h in f.get("history") or []]
            items = [ids for ids in items if ids]
            ids = [t for item in items for t in item]
            w = [1.0 / (len(items) * len(item)) for item in items for _ in item]
            per_user.append((ids, w))
        width = max(1, max(len(ids) for ids, _ in per_user))
        hist = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        weights = torch.zeros(len(features), width)
        for b, (ids, w) in enumerate(per_user):
            hist[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            weights[b, : len(w)] = torch.tensor(w)
        return {"history_ids": hist, "history_weights": weights}


# ---------------------------------------------------------------- running a model on a layout


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(body, head module)`` of a supported Hugging Face causal LM (see
    :func:`napo_kernels.heads.lm_head_of`, which also reads the head's bias, soft-cap and scale:
    use it, not this pair, to score with the head)."""
    head = lm_head_of(model)
    return head.body, head.module


def _additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def candidate_rows(model: nn.Module, batch: dict[str, Tensor], *, through: nn.Module | None = None) -> Tensor:
    """Run the model body on a layout batch; returns the ``[R, H]`` hidden rows at ``score_index``.

    ``through``: a wrapper of ``model`` to run the forward through instead of calling the body
    directly (``DistributedDataParallel``, or a model whose ``forward`` accelerate patched for
    autocast), so that the wrapper's hooks apply: DDP averages gradients only for forwards run
    through it. The whole causal LM then runs with ``logits_to_keep=1`` (the head on one position
    per row) and the body's output is captured by a forward hook.
    """
    body = lm_head_of(model).body
    mask = batch["attention_mask"]
    if mask.dim() == 4:
        mask = _additive_mask(mask, body.get_input_embeddings().weight.dtype)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])
    if through is None:
        hidden = body(**inputs, use_cache=False)[0]
    else:
        captured: list[Tensor] = []
        hook = body.register_forward_hook(lambda _module, _args, out: captured.append(out[0]))
        try:
            through(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        if len(captured) != 1:
            raise RuntimeError(f"through: expected one call of the model body, saw {len(captured)}")
        hidden = captured[0]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["score_index"])


def candidate_logps(
    model: nn.Module,
    batch: dict[str, Tensor],
    reduction: str = "sum",
    *,
    through: nn.Module | None = None,
    **kwargs,
) -> Tensor:
    """``[B, C]`` candidate scores ``s(y|x)`` (0 where a candidate is absent) via the fused op, with
    the model's own head (bias, soft-cap, logit scale: :func:`napo_kernels.heads.lm_head_of`);
    ``through``: see :func:`candidate_rows`; other keyword arguments go to
    :func:`~napo_kernels.sequence_logprobs`.

    A sharded model (FSDP2, ZeRO-3: :mod:`napo_kernels.integrations.sharded`) is scored inside the
    forward of ``through`` (default: the model), body and head together, where the engine gathers
    the head; every rank must call it."""
    b, c = batch["candidate_mask"].shape
    sharded = sharding_of(model if through is None else through) is not None

    def scores(head: LMHead, rows: Tensor) -> Tensor:
        return sequence_logprobs(
            rows, head.weight, batch["score_labels"], **head.loss_kwargs(),
            sequence_ids=batch["score_sequence"], num_sequences=b * c, sequence_mask=batch["candidate_mask"],
            reduction=reduction, **kwargs,
        )  # fmt: skip

    def run(through: nn.Module | None) -> Tensor:
        return with_gathered_head(model, scores, candidate_rows(model, batch, through=through))

    if sharded:  # flat scores out of the forward: a [B, C] view would lose the engine's backward hook
        flat = run_as_forward(model if through is None else through, run, None)
    else:
        flat = run(through)
    return flat.reshape(b, c)


def packing_supported(model: nn.Module, atol: float = 1e-4) -> bool:
    """Probe once (cached on the model) whether ``model`` gives the same candidate scores packed
    as separate: False for attention implementations that ignore or reject custom 4-D masks."""
    cached = getattr(model, "_napo_packing_supported", None)
    if cached is not None:
        return cached
    head = lm_head_of(model)  # outside the probe: a head it does not understand is an error, not a fallback
    if sharding_of(model) == "zero3":
        # A ZeRO-3 model can run a forward only inside DeepSpeed's engine, which the Trainer builds
        # later: trust the attention implementations the packed layout is tested with.
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        model._napo_packing_supported = impl in ("eager", "sdpa")
        return model._napo_packing_supported
    vocab = head.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(vocab, (5,), generator=g).tolist(),
        torch.randint(vocab, (3,), generator=g).tolist(),
    ]
    cands = [[torch.randint(vocab, (n,), generator=g).tolist() for n in ns] for ns in ((2, 3), (1, 2))]
    device = head.weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores = []
            for layout in LAYOUTS:
                batch = {k: v.to(device) for k, v in layout_candidates(layout, prompts, cands, 0).items()}
                scores.append(candidate_logps(model, batch).float())
        ok = bool(
            torch.allclose(scores[0], scores[1], atol=atol * max(1.0, float(scores[1].abs().max())), rtol=0)
        )
    except Exception as err:  # noqa: BLE001 - any rejection of the mask means: do not pack
        warnings.warn(f"packed candidates: the model rejected a 4-D attention mask ({err!r})", stacklevel=2)
        ok = False
    finally:
        model.train(was_training)
    model._napo_packing_supported = ok
    return ok


def resolve_layout(model: nn.Module, layout: str = "auto") -> str:
    """``"packed"`` when requested or when ``layout="auto"`` and :func:`packing_supported`; else
    ``"separate"`` (with a warning when packing was wanted but the model does not support it)."""
    if layout in LAYOUTS:
        return layout
    if layout != "auto":
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    if packing_supported(model):
        return "packed"
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "?")
    warnings.warn(
        f"packed candidates: scores from the packed layout do not match separate sequences for this model "
        f"(attn_implementation={impl!r}); falling back to one sequence per candidate (slower)",
        stacklevel=2,
    )
    return "separate"
