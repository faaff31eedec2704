"""Evaluation of LLM recommenders: candidate scoring, the generation protocol, DMPO's AUC and
popularity-bias metrics.

* **Candidate scoring** (deterministic, valid by construction): every candidate of a prompt is
  scored ``s(y|x)`` in one packed forward and ranked. The rank of the true item is
  ``1 + #{other candidates j : s_j >= s_true}`` (ties count against the model). Reported:
  ``HR@1``, ``HR@5``, ``NDCG@5``, ``NDCG@10`` (one relevant item: ``1 / log2(1 + rank)`` if
  ``rank <= k``) and ``MRR``.
* **Generation** (S-DPO / NAPO / DynamicPO protocol): greedy decoding of ``max_new_tokens``
  tokens after the prompt; an output is *valid* iff exactly one candidate title occurs in it as a
  substring, a *hit* iff valid and that title is the true item. ``HR@1 = hits / N``,
  ``ValidRatio = valid / N``.
* **AUC** (DMPO protocol): for each ``[chosen, rejected]`` row, with probability 0.5 (a
  ``random.Random(42)`` stream) the chosen answer's mean token log-prob with label 1, otherwise the
  rejected one's with label 0; ROC-AUC over those (Mann-Whitney, ties counted half).
* **Popularity bias** (with :class:`napo_kernels.recommender.data.ItemPopularity`, counts from the training
  split): mean popularity percentile of the top-1 recommendations (``top1_percentile``) next to
  that of the true items (``true_percentile``); the ratio of their mean interaction counts
  (``count_ratio``, 1 = as popular as the truth, above 1 = biased to popular items); and the share
  of top-1 recommendations from the long tail (``long_tail_share``, to compare with
  ``true_long_tail_share``). The papers give no formula: these are this package's definitions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..heads import lm_head_of
from .data.popularity import ItemPopularity
from .data.records import PairExample, RecExample
from .data.templates import AlpacaTemplate, RecPromptTemplate
from .packing import CandidateCollator, candidate_logps, resolve_layout


class _EvalMode:
    """Puts a model in eval mode and grad-free, restoring its training flag afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self):
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def _device(model: nn.Module) -> torch.device:
    return lm_head_of(model).weight.device


def score_features(
    model: nn.Module,
    tokenizer,
    features: Sequence[dict],
    *,
    batch_size: int = 8,
    reduction: str = "sum",
    layout: str = "auto",
    max_prompt_length: int | None = None,
    add_eos: bool = True,
    progress: bool = True,
    desc: str = "scoring candidates",
) -> Tensor:
    """``[N, C]`` scores of ``features`` (``{"prompt", "candidates"}`` text dicts), ``-inf`` where a
    prompt has fewer than ``C`` candidates; one packed forward per batch of prompts."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not features:
        raise ValueError("features: nothing to score")
    num_c = max(len(f["candidates"]) for f in features)
    collator = CandidateCollator(
        tokenizer, resolve_layout(model, layout), max_prompt_length, add_eos=add_eos, num_candidates=num_c
    )
    device = _device(model)
    out = []
    with _EvalMode(model):
        for start in tqdm(range(0, len(features), batch_size), desc=desc, disable=not progress, leave=False):
            batch = collator(list(features[start : start + batch_size]))
            batch = {k: v.to(device) for k, v in batch.items()}
            s = candidate_logps(model, batch, reduction=reduction).float().cpu()
            out.append(s.masked_fill(~batch["candidate_mask"].cpu(), float("-inf")))
    return torch.cat(out)


def score_candidates(
    model: nn.Module,
    tokenizer,
    examples: Sequence[RecExample],
    template: RecPromptTemplate | None = None,
    **kwargs,
) -> Tensor:
    """``[N, C]`` score of every candidate of every example, in ``itemList`` order."""
    t = template or RecPromptTemplate()
    features = [
        {"prompt": t.prompt(e.history, e.candidates), "candidates": [t.answer(c) for c in e.candidates]}
        for e in examples
    ]
    return score_features(model, tokenizer, features, **kwargs)


def ranking_metrics(
    scores: Tensor, target_index: Tensor | Sequence[int], ks: Sequence[int] = (5, 10)
) -> dict:
    """HR@1, HR@k, NDCG@k and MRR from ``[N, C]`` scores (``-inf`` = absent) and true indices ``[N]``."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    target = torch.as_tensor(target_index, dtype=torch.long)
    if scores.dim() != 2 or target.shape != scores.shape[:1]:
        raise ValueError(
            f"scores must be [N, C] and target_index [N]; got {list(scores.shape)}, {list(target.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("scores: no examples")
    if bool(((target < 0) | (target >= scores.shape[1])).any()):
        raise ValueError(f"target_index must lie in [0, {scores.shape[1]})")
    true = scores.gather(1, target[:, None])
    if not bool(torch.isfinite(true).all()):
        raise ValueError("scores: the true candidate of some example is -inf/NaN (absent or not scored)")
    others = torch.ones_like(scores, dtype=torch.bool).scatter(1, target[:, None], False)
    rank = 1 + ((scores >= true) & others).sum(1)
    out = {"HR@1": float((rank == 1).double().mean()), "MRR": float((1.0 / rank).mean())}
    for k in ks:
        gain = torch.where(rank <= k, 1.0 / torch.log2(rank.double() + 1.0), 0.0)
        out[f"HR@{k}"] = float((rank <= k).double().mean())
        out[f"NDCG@{k}"] = float(gain.mean())
    return out


def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    batch_size: int = 16,
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    collator = CandidateCollator(tokenizer, "separate", max_prompt_length)
    pad = collator.pad_token_id
    device = _device(model)
    outputs: list[str] = []
    with _EvalMode(model):
        for start in tqdm(
            range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False
        ):
            ids = [collator.prompt_ids(p) for p in prompts[start : start + batch_size]]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for i, x in enumerate(ids):
                input_ids[i, width - len(x) :] = torch.tensor(x)
                mask[i, width - len(x) :] = 1
            gen = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            outputs.extend(tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True))
    return outputs


def parse_generation(output: str, candidates: Sequence[str]) -> str | None:
    """The one candidate title found in ``output`` (substring), or None if none or several are."""
    found = [c for c in candidates if c in output]
    return found[0] if len(found) == 1 else None


def generation_metrics(
    outputs: Sequence[str], examples: Sequence[RecExample]
) -> tuple[dict, list[str | None]]:
    """``({"HR@1", "ValidRatio"}, picked title or None per example)``."""
    if len(outputs) != len(examples):
        raise ValueError(f"outputs ({len(outputs)}) and examples ({len(examples)}) must have the same length")
    if not examples:
        raise ValueError("examples: nothing to evaluate")
    picks = [parse_generation(o, e.candidates) for o, e in zip(outputs, examples)]
    valid = sum(p is not None for p in picks)
    hits = sum(p == e.target for p, e in zip(picks, examples))
    return {"HR@1": hits / len(examples), "ValidRatio": valid / len(examples)}, picks


def roc_auc(scores: Sequence[float] | Tensor, labels: Sequence[int] | Tensor) -> float:
    """ROC-AUC = P(score of a positive > score of a negative), ties counted half."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.numel()}) and labels ({y.numel()}) must have the same length")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels: ROC-AUC needs at least one positive and one negative")
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    # mid-ranks: equal scores share the mean of their positions
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mid = ends - (counts.double() - 1.0) / 2.0
    ranks[order] = mid[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pairwise_auc(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[PairExample],
    template: AlpacaTemplate | None = None,
    *,
    seed: int = 42,
    **kwargs,
) -> float:
    """DMPO's AUC over ``[chosen, rejected]`` rows (see the module docstring)."""
    if any(not p.rejected for p in pairs):
        raise ValueError("pairs: every row needs a rejected answer for the AUC")
    t = template or AlpacaTemplate()
    features = [
        {"prompt": t.prompt(p.prompt), "candidates": [t.answer(p.chosen), t.answer(p.rejected[0])]}
        for p in pairs
    ]
    scores = score_features(model, tokenizer, features, reduction="mean", desc="scoring pairs", **kwargs)
    rng = random.Random(seed)
    labels = [1 if rng.random() < 0.5 else 0 for _ in pairs]
    picked = [float(scores[i, 0 if y else 1]) for i, y in enumerate(labels)]
    return roc_auc(picked, labels)


def popularity_metrics(
    recommended: Sequence[str | None], targets: Sequence[str], popularity: ItemPopularity
) -> dict[str, float]:
    """Popularity bias of top-1 recommendations (None entries, invalid generations, are skipped)."""
    recs = [r for r in recommended if r is not None]
    if not targets:
        raise ValueError("targets: nothing to compare with")
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan
    true_count = mean([popularity.count(t) for t in targets])
    return {
        "top1_percentile": mean([popularity.percentile(r) for r in recs]),
        "true_percentile": mean([popularity.percentile(t) for t in targets]),
        "count_ratio": mean([popularity.count(r) for r in recs]) / true_count if true_count else math.nan,
        "long_tail_share": mean([float(popularity.is_long_tail(r)) for r in recs]),
        "true_long_tail_share": mean([float(popularity.is_long_tail(t)) for t in targets]),
    }


def evaluate_recommender(
    model: nn.Module,
    tokenizer,
    examples: Sequence[RecExample],
    template: RecPromptTemplate | None = None,
    *,
    popularity: ItemPopularity | None = None,
    generation: bool = True,
    max_new_tokens: int = 20,
    batch_size: int = 8,
    layout: str = "auto",
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Candidate-scoring metrics (``rank/...``), generation metrics (``gen/...``) and, with
    ``popularity``, the bias of each protocol's top-1 (``rank/pop/...``, ``gen/pop/...``)."""
    t = template or RecPromptTemplate()
    scores = score_candidates(
        model,
        tokenizer,
        examples,
        t,
        batch_size=batch_size,
        layout=layout,
        max_prompt_length=max_prompt_length,
        progress=progress,
    )
    target = torch.tensor([e.target_index for e in examples])
    results = {f"rank/{k}": v for k, v in ranking_metrics(scores, target).items()}
    targets = [e.target for e in examples]
    if popularity is not None:
        top1 = [e.candidates[int(i)] for e, i in zip(examples, scores.argmax(1))]
        results |= {f"rank/pop/{k}": v for k, v in popularity_metrics(top1, targets, popularity).items()}
    if generation:
        prompts = [t.prompt(e.history, e.candidates) for e in examples]
        outs = generate_answers(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=2 * batch_size,
            max_prompt_length=max_prompt_length,
            progress=progress,
        )
        gen, picks = generation_metrics(outs, examples)
        results |= {f"gen/{k}": v for k, v in gen.items()}
        if popularity is not None:
            results |= {f"gen/pop/{k}": v for k, v in popularity_metrics(picks, targets, popularity).items()}
    return results
