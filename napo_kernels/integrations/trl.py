"""A drop-in for ``trl.DPOTrainer``: fused, prompt-shared, multi-negative log-probs.

Switching a TRL script over::

    from napo_kernels.integrations.trl import FusedDPOConfig, FusedDPOTrainer

    args = FusedDPOConfig(output_dir="out", loss_type="sigmoid")      # every DPOConfig field
    trainer = FusedDPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=LoraConfig(...))               # DPOTrainer's arguments
    trainer.train()

What changes against stock TRL (tested range: ``trl`` 1.16):

* **Log-probs.** Stock TRL runs ``prompt + chosen`` and ``prompt + rejected`` as two sequences (the
  prompt twice) and projects every position onto the vocabulary. Here each prompt runs once,
  followed by its chosen and all its rejected completions, with a 4-D attention mask
  (:mod:`napo_kernels.recommender.packing`; models that reject such masks fall back to one sequence
  per completion, with a warning), and only completion positions reach the fused log-prob op
  (:func:`napo_kernels.sequence_logprobs`): no ``[tokens, vocab]`` logits anywhere.
* **Datasets.** TRL's own formats and tokenisation (standard and conversational ``prompt`` /
  ``chosen`` / ``rejected``, chat templates, EOS, ``max_length`` with ``keep_start``), plus a
  multi-negative format: ``rejected`` a list of completions (strings, or lists of messages), of any
  length per prompt. Optional columns: ``confidence`` (one number per rejected completion, NAPO's
  margin), ``user_embedding`` (a vector per prompt) or ``history`` (item texts, embedded as the mean
  input-token embedding, as :class:`~napo_kernels.recommender.trainer.PreferenceTrainer` does) for
  NAPO's similarity sharing. :func:`rec_to_trl` converts the S-DPO / NAPO recommendation JSON.
* **Losses.** ``loss_type`` takes TRL's pairwise types (``sigmoid``, ``hinge``, ``ipo``, ``robust``,
  ``exo_pair``, ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``,
  ``apo_down``, ``discopop``, ``sigmoid_norm``, ``sft``) computed as TRL computes them, with
  ``loss_weights``, ``label_smoothing`` and ``f_divergence_type``; with several rejected
  completions a pairwise type is averaged over each prompt's pairs. And this package's methods
  ``s_dpo``, ``dmpo``, ``napo``, ``dynamicpo`` (:class:`napo_kernels.PreferenceLoss`), configured by
  :class:`FusedDPOConfig`'s extra fields or ``loss_config=LossConfig(...)``; ``dmpo_form="pairwise"``
  is DMPO's released loss (the mean of the K pairwise DPO losses).
* **References** as TRL offers them: ``ref_model``, the peft model with its adapters disabled (or
  TRL's ``"ref"`` adapter), ``precompute_ref_log_probs``; and ``reference_free=True``.
* **Metrics**: TRL's names (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
  ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``num_tokens``) over each prompt's own
  pairs, plus this package's (``pool/size``, ``margin/gamma``, ...). ``entropy``, ``logits/*`` and
  ``mean_token_accuracy`` are not logged: each needs a pass over the vocabulary that the fused op
  skips.
* **Not supported** (a ``ValueError`` names them): ``use_weighting``, ``ld_alpha`` (per-token
  quantities), ``truncation_mode="keep_end"`` (it cuts the shared prompt differently per
  completion), vision datasets, ``compute_metrics`` (it needs logits), DeepSpeed ZeRO-3 / FSDP (the
  loss reads the ``lm_head`` weight outside the forward).

Gradient accumulation, gradient checkpointing, bf16 autocast, peft LoRA and DDP (``torchrun`` /
``accelerate launch``) work as in TRL; under DDP the multi-negative methods' pool spans the global
batch (``share_across_ranks``, :mod:`napo_kernels.distributed`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
import trl
from accelerate.utils import is_peft_model
from datasets import Dataset
from datasets.fingerprint import Hasher
from packaging.version import Version
from torch import Tensor, nn
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import dpo_trainer as _trl_dpo
from trl.trainer.utils import use_adapter

from ..config import LossConfig
from ..distributed import data_parallel_group
from ..heads import lm_head_of
from ..logprobs import sequence_logprobs
from ..losses import PreferenceLoss
from ..recommender.data.records import RecExample
from ..recommender.data.sampling import NegativeSampler
from ..recommender.data.templates import RecPromptTemplate
from ..recommender.packing import LAYOUTS, candidate_rows, layout_candidates, resolve_layout
from ..recommender.trainer import LOSS_STATE_NAME

__all__ = [
    "PACKAGE_LOSS_TYPES",
    "PLAIN_CHAT_TEMPLATE",
    "TESTED_TRL_VERSIONS",
    "TRL_LOSS_TYPES",
    "FusedDPOConfig",
    "FusedDPOTrainer",
    "FusedPreferenceCollator",
    "rec_to_trl",
]

TESTED_TRL_VERSIONS = (">=1.16.0", "<1.17")
"""The ``trl`` versions the parity tests ran on; others warn once at import (the trainer overrides
TRL internals: ``_prepare_dataset``, ``_compute_loss``, ``compute_ref_log_probs``)."""

if not (Version("1.16.0") <= Version(trl.__version__) < Version("1.17")):
    warnings.warn(
        f"napo_kernels.integrations.trl was tested with trl {', '.join(TESTED_TRL_VERSIONS)}; "
        f"trl {trl.__version__} is installed",
        stacklevel=2,
    )

TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
)  # fmt: skip
PACKAGE_LOSS_TYPES = ("s_dpo", "dmpo", "napo", "dynamicpo")
DMPO_FORMS = ("paper", "pairwise")
# FusedDPOConfig fields that are LossConfig fields (beta is DPOConfig's own)
_LOSS_FIELDS = ("gamma", "gamma0", "sharing", "rho", "margin_mode", "alpha", "mu", "tau", "detach_negatives")
_EXTRA_COLUMNS = ("confidence", "user_embedding", "history_ids")

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A minimal chat template for tokenizers trained locally (examples, tests): every message is
``<|role|>content`` and EOS; the generation prompt is ``<|assistant|>``."""


@dataclass
class FusedDPOConfig(DPOConfig):
    """``trl.DPOConfig`` plus the options of the fused path and of the multi-negative losses.

    ``loss_type`` may name this package's methods (``"s_dpo"``, ``"dmpo"``, ``"napo"``,
    ``"dynamicpo"``, at most one, combinable with TRL's types such as ``"sft"``); ``beta`` is shared.
    The fields ``gamma`` ... ``detach_negatives`` are those of :class:`napo_kernels.LossConfig`
    (``None``: its default); a plain ``DPOConfig`` works too (every extra field at its default).
    """

    layout: str = field(
        default="auto",
        metadata={"help": "'packed' (one forward per prompt, 4-D mask), 'separate', or 'auto' (packed when "
                  "the model gives the same scores both ways)"},
    )  # fmt: skip
    backend: str = field(
        default="auto", metadata={"help": "napo-kernels backend: auto, torch, cpp, triton, cuda"}
    )
    reference_free: bool = field(
        default=False, metadata={"help": "rewards are the policy log-probs themselves (no reference model)"}
    )
    dmpo_form: str = field(
        default="paper",
        metadata={"help": "loss_type 'dmpo': 'paper' (-log sigma(beta r+ - mean_n beta r_n)) or 'pairwise' "
                  "(DMPO's released code: the mean of the K pairwise DPO losses)"},
    )  # fmt: skip
    gamma: float | None = field(default=None, metadata={"help": "additive margin of s_dpo / dmpo"})
    gamma0: float | None = field(default=None, metadata={"help": "NAPO's base margin gamma_0"})
    sharing: str | None = field(default=None, metadata={"help": "negative pool: own, all, similarity"})
    rho: float | None = field(default=None, metadata={"help": "share of prompts in a similarity pool"})
    margin_mode: str | None = field(default=None, metadata={"help": "NAPO: batch, per_negative, none"})
    alpha: float | None = field(default=None, metadata={"help": "NAPO: margin adaptation strength"})
    mu: float | None = field(default=None, metadata={"help": "NAPO: margin EMA momentum"})
    tau: float | None = field(default=None, metadata={"help": "DynamicPO's offset in beta_n"})
    detach_negatives: str | None = field(default=None, metadata={"help": "none, shared, all"})
    user_embeddings: str | None = field(
        default="history",
        metadata={"help": "NAPO's similarity sharing: 'history' embeds a 'history' column of item texts; "
                  "None ignores it (a 'user_embedding' column is always used)"},
    )  # fmt: skip
    share_across_ranks: bool = field(
        default=True, metadata={"help": "under DDP, the multi-negative pool spans every rank's batch"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {self.layout!r}")
        if self.dmpo_form not in DMPO_FORMS:
            raise ValueError(f"dmpo_form must be one of {DMPO_FORMS}, got {self.dmpo_form!r}")
        if self.user_embeddings not in ("history", None):
            raise ValueError(f"user_embeddings must be 'history' or None, got {self.user_embeddings!r}")
        _LossPlan.from_args(self, None)  # fail at construction, not at the first step


def _option(args: DPOConfig, name: str) -> Any:
    """An extra field of :class:`FusedDPOConfig`, or its default for a plain ``DPOConfig``."""
    if hasattr(args, name):
        return getattr(args, name)
    return next(f.default for f in fields(FusedDPOConfig) if f.name == name)


@dataclass(frozen=True)
class _LossPlan:
    """What ``loss_type`` asks for: weighted terms, and the package method's configuration."""

    terms: tuple[tuple[str, float], ...]
    package: LossConfig | None  # the multi-negative method, or None
    pairwise_dmpo: bool  # loss_type 'dmpo' with dmpo_form='pairwise': TRL's sigmoid per pair
    pairwise_gamma: float = 0.0  # its additive margin

    @staticmethod
    def from_args(args: DPOConfig, loss_config: LossConfig | None) -> _LossPlan:
        types = list(args.loss_type)
        weights = list(args.loss_weights or [1.0] * len(types))
        unknown = [t for t in types if t not in TRL_LOSS_TYPES + PACKAGE_LOSS_TYPES]
        if unknown:
            raise ValueError(
                f"loss_type: unknown {unknown}; TRL's: {', '.join(TRL_LOSS_TYPES)}; this package's: "
                f"{', '.join(PACKAGE_LOSS_TYPES)}"
            )
        methods = [t for t in types if t in PACKAGE_LOSS_TYPES]
        if len(methods) > 1:
            raise ValueError(f"loss_type: at most one multi-negative method, got {methods}")
        pairwise = methods == ["dmpo"] and _option(args, "dmpo_form") == "pairwise"
        given = {k: _option(args, k) for k in _LOSS_FIELDS if _option(args, k) is not None}
        package = None
        if loss_config is not None:
            if not isinstance(loss_config, LossConfig):
                raise TypeError(
                    f"loss_config must be a napo_kernels.LossConfig, got {type(loss_config).__name__}"
                )
            if not methods or loss_config.method != methods[0]:
                raise ValueError(
                    f"loss_config.method={loss_config.method!r} must be the multi-negative method named in "
                    f"loss_type ({methods or 'none'})"
                )
            if given:
                raise ValueError(
                    f"give loss options in loss_config or in the config ({sorted(given)}), not both"
                )
            if loss_config.beta != args.beta:  # the rewards TRL logs use the config's beta
                raise ValueError(
                    f"loss_config.beta={loss_config.beta} differs from the config's beta={args.beta}"
                )
            package = loss_config
        elif methods:
            package = LossConfig(method=methods[0], beta=args.beta, **given)
        elif given:
            raise ValueError(
                f"{sorted(given)} configure this package's losses; loss_type {types} names none of "
                f"{PACKAGE_LOSS_TYPES}"
            )
        if methods and args.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"f_divergence_type={args.f_divergence_type!r} applies to TRL's pairwise loss types only"
            )
        gamma = 0.0
        if pairwise:  # TRL's sigmoid per own pair: no pool, every negative keeps its gradient
            if package.sharing not in (None, "own") or package.detach_negatives != "none":
                raise ValueError(
                    "dmpo_form='pairwise' compares each chosen completion with its own rejected ones: "
                    "sharing and detach_negatives do not apply"
                )
            gamma, package = package.additive_margin(), None
        return _LossPlan(tuple(zip(types, map(float, weights))), package, pairwise, gamma)


# ----------------------------------------------------------------------------------------------
# Data: the multi-negative format, tokenised by TRL itself one (prompt, chosen, rejected) pair at a
# time and regrouped per prompt; the collator lays each prompt out once with all its completions.
# ----------------------------------------------------------------------------------------------


def _is_multi_negative(example: dict[str, Any]) -> bool:
    """``rejected`` is a list of completions (strings, or lists of messages), not one completion."""
    rejected = example.get("rejected")
    if not isinstance(rejected, list) or not rejected:
        return False
    return isinstance(rejected[0], (str, list))


# columns TRL's tokenisation reads
_TOKENISED_FROM = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")


def _expand_pairs(dataset: Dataset) -> Dataset:
    """One row per (prompt, rejected completion), tagged with its source row and position."""
    keep = [c for c in _TOKENISED_FROM if c in dataset.column_names]

    def expand(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in (*keep, "_napo_row", "_napo_k")}
        for i, row in enumerate(indices):
            rejected = batch["rejected"][i]
            if not rejected:
                raise ValueError(
                    f"example {row}: 'rejected' is an empty list (each prompt needs one or more)"
                )
            for k, completion in enumerate(rejected):
                for c in keep:
                    out[c].append(completion if c == "rejected" else batch[c][i])
                out["_napo_row"].append(row)
                out["_napo_k"].append(k)
        return out

    return dataset.map(expand, batched=True, with_indices=True, remove_columns=dataset.column_names)


def _regroup(prepared: Dataset, source: Dataset) -> Dataset:
    """Tokenised pairs back to one row per prompt: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
    (a list per rejected completion). A pair's prompt ends where the tokenised prompt and
    prompt+completion diverge (TRL's rule), so it may differ per pair: the shared prompt is the
    shortest, and the tokens a pair's prompt had beyond it start that pair's completions (the
    concatenations are unchanged). A prompt that lost any pair (TRL drops prompts that fill
    ``max_length``) is dropped whole, so per-negative columns stay aligned."""
    cols = prepared.select_columns(["_napo_row", "_napo_k", "prompt_ids", "chosen_ids", "rejected_ids"])
    groups: dict[int, list[dict]] = {}
    for pair in cols:
        groups.setdefault(pair["_napo_row"], []).append(pair)
    rows, prompt_ids, chosen_ids, rejected_ids = [], [], [], []
    for row, pairs in groups.items():
        if len(pairs) != len(source[row]["rejected"]):
            continue
        pairs.sort(key=lambda p: p["_napo_k"])
        shared = min(len(p["prompt_ids"]) for p in pairs)
        rows.append(row)
        prompt_ids.append(pairs[0]["prompt_ids"][:shared])
        chosen_ids.append(pairs[0]["prompt_ids"][shared:] + pairs[0]["chosen_ids"])
        rejected_ids.append([p["prompt_ids"][shared:] + p["rejected_ids"] for p in pairs])
    out = source.select(rows)
    for name, values in (
        ("prompt_ids", prompt_ids),
        ("chosen_ids", chosen_ids),
        ("rejected_ids", rejected_ids),
    ):
        if name in out.column_names:
            out = out.remove_columns(name)
        out = out.add_column(name, values)
    return out


def _as_rejected_list(rejected_ids: list) -> list[list[int]]:
    """TRL's single ``rejected_ids`` (a token list) or the multi-negative list of token lists."""
    if rejected_ids and isinstance(rejected_ids[0], int):
        return [list(rejected_ids)]
    return [list(r) for r in rejected_ids]


def _per_negative(values: Any, k: int, name: str, index: int) -> list[float]:
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) < k:
        raise ValueError(
            f"example {index} of the batch: {name} has {len(values)} values for {k} rejected completions"
        )
    return [float(v) for v in values[:k]]


@dataclass
class FusedPreferenceCollator:
    """Collates tokenised preference rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``: one token
    list or a list of them) into one layout batch (:mod:`napo_kernels.recommender.packing`):
    candidate 0 is the chosen completion, ``1..K`` the rejected ones.

    Truncation follows TRL's ``keep_start``: ``prompt + completion`` keeps its first ``max_length``
    tokens, so each completion keeps ``max_length - len(prompt)`` tokens at most. Optional columns
    become ``ref_chosen_logps [B]``, ``ref_rejected_logps [B, K]``, ``confidence [B, K]``,
    ``user_embedding [B, D]`` and ``history_ids`` / ``history_weights [B, L]``. ``prompt_lengths [B]``
    counts the tokens TRL's ``num_tokens`` metric counts.

    Args:
        pad_token_id: the token id on padding positions (never attended to nor scored).
        layout: ``"packed"`` or ``"separate"``; :class:`FusedDPOTrainer` resolves ``"auto"``.
        max_length: TRL's ``max_length`` (``None``: no truncation).
    """

    pad_token_id: int
    layout: str = "packed"
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} when collating, got {self.layout!r}")
        prompts, candidates = [], []
        for i, ex in enumerate(examples):
            prompt = list(ex["prompt_ids"])
            completions = [list(ex["chosen_ids"]), *_as_rejected_list(ex["rejected_ids"])]
            if self.max_length is not None:
                room = self.max_length - len(prompt)
                if room <= 0:
                    raise ValueError(
                        f"example {i} of the batch: its prompt ({len(prompt)} tokens) fills max_length="
                        f"{self.max_length}; TRL's dataset preparation drops such prompts"
                    )
                completions = [c[:room] for c in completions]
            prompts.append(prompt)
            candidates.append(completions)
        batch = layout_candidates(self.layout, prompts, candidates, self.pad_token_id)
        k = batch["candidate_mask"].shape[1] - 1
        counts = [len(c) - 1 for c in candidates]
        batch["prompt_lengths"] = torch.tensor([len(p) for p in prompts])
        first = examples[0]
        if "ref_chosen_logps" in first:
            batch["ref_chosen_logps"] = torch.tensor([float(ex["ref_chosen_logps"]) for ex in examples])
            batch["ref_rejected_logps"] = self._padded(examples, "ref_rejected_logps", counts, k)
        if "confidence" in first:
            batch["confidence"] = self._padded(examples, "confidence", counts, k)
        if "user_embedding" in first:
            batch["user_embedding"] = torch.tensor([list(ex["user_embedding"]) for ex in examples]).float()
        if "history_ids" in first:
            batch.update(self._history(examples))
        return batch

    @staticmethod
    def _padded(examples: list[dict], name: str, counts: list[int], k: int) -> Tensor:
        out = torch.zeros(len(examples), k)
        for b, (ex, n) in enumerate(zip(examples, counts)):
            out[b, :n] = torch.tensor(_per_negative(ex[name], n, name, b))
        return out

    def _history(self, examples: list[dict]) -> dict[str, Tensor]:
        # weights w such that sum_t w[b, t] E[ids[b, t]] = mean over items of the item's mean token embedding
        per_user = []
        for ex in examples:
            items = [list(ids) for ids in ex["history_ids"] or [] if ids]
            ids = [t for item in items for t in item]
            per_user.append((ids, [1.0 / (len(items) * len(item)) for item in items for _ in item]))
        width = max(1, max(len(ids) for ids, _ in per_user))
        hist = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        weights = torch.zeros(len(examples), width)
        for b, (ids, w) in enumerate(per_user):
            hist[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            weights[b, : len(w)] = torch.tensor(w)
        return {"history_ids": hist, "history_weights": weights}


# ----------------------------------------------------------------------------------------------
# TRL's pairwise loss types, written from the sequence scores (what TRL 1.16 computes per pair)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Pairs:
    """One entry per (prompt, own rejected completion) pair that exists."""

    prompt: Tensor  # [P] index of the pair's prompt
    chosen: Tensor  # [P] policy log-probs
    rejected: Tensor
    ref_chosen: Tensor  # [P] reference log-probs (0 reference-free)
    ref_rejected: Tensor
    chosen_len: Tensor  # [P] completion tokens
    rejected_len: Tensor

    @property
    def chosen_ratio(self) -> Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_ratio(self) -> Tensor:
        return self.rejected - self.ref_rejected


def _f_scores(ratio: Tensor, kind: str, alpha_coef: float) -> Tensor:
    """TRL's f-divergence transform ``f'(pi / pi_ref)`` of a log-ratio."""
    if kind == "reverse_kl":
        return ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-ratio)
    if kind == "js_divergence":
        return torch.log(torch.tensor(2.0, dtype=ratio.dtype)) + F.logsigmoid(ratio)
    if kind == "alpha_divergence":
        if abs(alpha_coef - 1.0) < 1e-6:  # the limit is reverse KL
            return ratio
        t = (alpha_coef - 1.0) * ratio
        cap = {torch.float16: 11.0, torch.bfloat16: 80.0}.get(t.dtype, 80.0)  # exp stays finite
        return (torch.exp(t.float().clamp(max=cap)) - 1.0).to(t.dtype) / (alpha_coef - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def _smoothed(delta: Tensor, beta: float, eps: float) -> Tensor:
    return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps


def _pair_loss(loss_type: str, p: _Pairs, args: DPOConfig) -> Tensor:
    """Per-pair loss ``[P]`` of one of TRL's pairwise loss types (not ``sft``)."""
    beta, eps = args.beta, args.label_smoothing
    cs = _f_scores(p.chosen_ratio, args.f_divergence_type, args.f_alpha_divergence_coef)
    rs = _f_scores(p.rejected_ratio, args.f_divergence_type, args.f_alpha_divergence_coef)
    delta = cs - rs
    c_len, r_len = p.chosen_len.clamp(min=1), p.rejected_len.clamp(min=1)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":  # per-token (length-normalised) log-ratios, as TRL does
        return (cs / c_len - rs / r_len - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * (cs / c_len - rs / r_len))
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        z = beta * delta
        eps_t = torch.tensor(eps, dtype=z.dtype, device=z.device)
        return torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps_t)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - torch.log(eps_t)
        )
    if loss_type == "nca_pair":
        c, r = beta * p.chosen_ratio, beta * p.rejected_ratio
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * p.chosen_ratio) - F.logsigmoid(-beta * p.rejected_ratio)
    if loss_type == "sppo_hard":
        return (p.chosen_ratio - 0.5 / beta) ** 2 + (p.rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "aot":  # sorted over the batch's pairs: the rows lose their pairing
        policy, _ = torch.sort(p.chosen - p.rejected)
        ref, _ = torch.sort(p.ref_chosen - p.ref_rejected)
        return _smoothed(policy - ref, beta, eps)
    if loss_type == "aot_unpaired":
        chosen, _ = torch.sort(p.chosen_ratio)
        rejected, _ = torch.sort(p.rejected_ratio)
        return _smoothed(chosen - rejected, beta, eps)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * p.chosen_ratio) + torch.sigmoid(beta * p.rejected_ratio)
    if loss_type == "apo_down":
        return (
            torch.sigmoid(beta * p.chosen_ratio)
            + 1
            - torch.sigmoid(beta * (p.chosen_ratio - p.rejected_ratio))
        )
    if loss_type == "discopop":
        z = beta * delta
        mix = torch.sigmoid(z / args.discopop_tau)
        return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
    raise ValueError(f"unknown loss type {loss_type!r}")


def _prompt_mean(per_pair: Tensor, prompt: Tensor, num_prompts: int) -> Tensor:
    """Mean over prompts of each prompt's mean over its pairs (the plain mean when K = 1 for all)."""
    if per_pair.shape[0] == num_prompts:  # one pair per prompt, in prompt order
        return per_pair.mean()
    sums = per_pair.new_zeros(num_prompts).index_add(0, prompt, per_pair)
    counts = torch.bincount(prompt, minlength=num_prompts).to(per_pair.dtype)
    return (sums / counts).mean()


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


def _keep_model_forward(*args: Any, **kwargs: Any) -> None:
    """Stands in for TRL's ``add_fused_lm_head`` while the trainer is built."""


@contextlib.contextmanager
def _without_trl_fused_head() -> Iterator[None]:
    # TRL replaces model.forward on the instance with its own fused head; this trainer runs the
    # body itself and reads the head through lm_head_of, which refuses a replaced forward (it could
    # post-process the logits), so the model keeps its own forward
    original = _trl_dpo.add_fused_lm_head
    _trl_dpo.add_fused_lm_head = _keep_model_forward
    try:
        yield
    finally:
        _trl_dpo.add_fused_lm_head = original


class _NoReference(nn.Module):
    """Takes the reference model's place while TRL builds the trainer with ``reference_free=True``,
    so that TRL does not load a copy of the policy; never called, and dropped afterwards."""


class FusedDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with one packed forward per prompt, fused completion-only log-probs and
    the multi-negative losses (see the module docstring).

    Takes ``DPOTrainer``'s arguments (a plain ``DPOConfig`` or a :class:`FusedDPOConfig`), plus:

    Args:
        loss_config: the multi-negative method's :class:`~napo_kernels.LossConfig`, instead of the
            config's extra fields (its ``method`` must be the one named in ``loss_type``).
    """

    _tag_names = ["trl", "dpo", "napo-kernels"]

    def __init__(
        self,
        model: Any,
        ref_model: nn.Module | None = None,
        args: DPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        loss_config: LossConfig | None = None,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = FusedDPOConfig(f"{name.split('/')[-1]}-DPO")
        self._loss_plan = _LossPlan.from_args(args, loss_config)
        problems = [
            what
            for what, bad in (
                ("use_weighting=True (WPO weights need a vocabulary pass per token)", args.use_weighting),
                ("ld_alpha (per-token log-probs)", args.ld_alpha is not None),
                (
                    "truncation_mode='keep_end' (it cuts the shared prompt per completion)",
                    args.truncation_mode == "keep_end" and args.max_length is not None,
                ),
                ("compute_metrics (it needs the logits)", compute_metrics is not None),
            )  # fmt: skip
            if bad
        ]
        if problems:
            raise ValueError(f"{type(self).__name__} does not support {'; '.join(problems)}")
        if data_collator is not None and not isinstance(data_collator, FusedPreferenceCollator):
            raise TypeError(
                "data_collator must be a FusedPreferenceCollator (or None), got "
                f"{type(data_collator).__name__}"
            )
        self._reference_free = bool(_option(args, "reference_free"))
        if self._reference_free:
            if ref_model is not None or args.precompute_ref_log_probs or args.sync_ref_model:
                raise ValueError(
                    "reference_free=True takes no ref_model, precompute_ref_log_probs or sync_ref_model"
                )
            if not is_peft_model(model) and peft_config is None:
                ref_model = _NoReference()
        self._layout_option = _option(args, "layout")
        self._backend = _option(args, "backend")
        self._rejected_width = 1  # widest rejected list of the prepared datasets (precompute pads to it)
        self._user_embedding_source = _option(args, "user_embeddings")
        with _without_trl_fused_head():
            super().__init__(
                model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                None, callbacks, optimizers, quantization_config, peft_config,
            )  # fmt: skip
        if self._reference_free:
            self.ref_model = None
        if self._is_vision_dataset:
            raise ValueError(f"{type(self).__name__} does not support vision datasets")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # the head's weight is read outside a forward
            raise ValueError(f"{type(self).__name__} does not support DeepSpeed or FSDP; use DDP")
        lm_head_of(self.model)  # an unsupported head fails here, naming the class
        self._install_collator()
        plan = self._loss_plan.package
        self.criterion = None
        if plan is not None:
            group = data_parallel_group() if _option(args, "share_across_ranks") else None
            self.criterion = PreferenceLoss(config=plan, backend=self._backend, process_group=group)
            self.criterion.to(self.args.device)

    # -- data ------------------------------------------------------------------------------------

    def _prepare_dataset(
        self, dataset: Any, processing_class: Any, args: DPOConfig, dataset_name: str
    ) -> Any:
        first = next(iter(dataset))
        if "prompt_ids" not in first:
            if _is_multi_negative(first):
                if not isinstance(dataset, Dataset):
                    raise TypeError(
                        f"{dataset_name}: the multi-negative format needs a map-style datasets.Dataset, "
                        f"got {type(dataset).__name__}"
                    )
                if "prompt" not in first:
                    raise ValueError(
                        f"{dataset_name}: the multi-negative format needs an explicit 'prompt' column (the "
                        "implicit-prompt format would extract a different prompt per rejected completion)"
                    )
                prepared = super()._prepare_dataset(
                    _expand_pairs(dataset), processing_class, args, dataset_name
                )
                dataset = _regroup(prepared, dataset)
            else:
                dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if isinstance(dataset, Dataset) and len(dataset):
            self._rejected_width = max(
                self._rejected_width, max(len(_as_rejected_list(r)) for r in dataset["rejected_ids"])
            )
        if self._wants_history(dataset):
            tok = self._tokenizer

            def tokenise(example: dict) -> dict:
                return {
                    "history_ids": [
                        tok(str(h), add_special_tokens=False)["input_ids"] for h in example["history"]
                    ]
                }

            dataset = dataset.map(tokenise)
        return dataset

    def _wants_history(self, dataset: Any) -> bool:
        plan = self._loss_plan.package
        names = getattr(dataset, "column_names", None) or []
        return (
            plan is not None
            and plan.method == "napo"
            and self._user_embedding_source == "history"
            and "history" in names
            and "history_ids" not in names
            and "user_embedding" not in names
        )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *_EXTRA_COLUMNS]))

    def _install_collator(self) -> None:
        """Replace TRL's pairwise collator (built with TRL's pad-token resolution) by the layout
        collator, choosing the layout on the model once."""
        collator = self.data_collator
        if not isinstance(collator, FusedPreferenceCollator):
            collator = FusedPreferenceCollator(collator.pad_token_id, "auto", self.args.max_length)
            self.data_collator = collator
        if collator.layout == "auto" or collator.layout not in LAYOUTS:
            collator.layout = resolve_layout(self.model, self._layout_option)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        self._install_collator()
        # TRL caches precomputed scores under (dataset, model) fingerprints; this path stores
        # [B, K] rejected scores, so its cache must not be shared with stock TRL's
        saved = self._precompute_model_hash
        self._precompute_model_hash = Hasher.hash((saved, "napo-kernels", self._rejected_width))
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = saved

    # -- scores ----------------------------------------------------------------------------------

    def _scores(
        self, model: nn.Module, inputs: dict[str, Tensor], through: nn.Module | None = None
    ) -> Tensor:
        """``[B, C]`` summed completion log-probs (0 where a candidate is absent); candidate 0 is the
        chosen completion. ``through``: the wrapper the forward runs through (DDP, autocast)."""
        head = lm_head_of(model)
        rows = candidate_rows(model, inputs, through=through)
        if rows.dtype != head.weight.dtype:  # autocast may hand back a lower-precision body output
            rows = rows.to(head.weight.dtype)
        b, c = inputs["candidate_mask"].shape
        return sequence_logprobs(
            rows, head.weight, inputs["score_labels"], **head.loss_kwargs(),
            sequence_ids=inputs["score_sequence"], num_sequences=b * c,
            sequence_mask=inputs["candidate_mask"], backend=self._backend,
        ).reshape(b, c)  # fmt: skip

    @contextlib.contextmanager
    def _reference_adapters(self) -> Iterator[nn.Module]:
        """The peft model with the reference adapters active: TRL's ``"ref"`` adapter when it made
        one (a pretrained adapter being re-trained), else every adapter disabled."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
            yield unwrapped

    @torch.no_grad()
    def _reference_scores(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor | None:
        """``[B, C]`` reference scores, or None reference-free."""
        if self._reference_free:
            return None
        if self.precompute_ref_logps:
            return torch.cat([inputs["ref_chosen_logps"][:, None], inputs["ref_rejected_logps"].reshape(
                inputs["ref_chosen_logps"].shape[0], -1)], dim=1)  # fmt: skip
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:
                with self._reference_adapters() as peft_model:
                    return self._scores(peft_model, inputs, through=model)
            return self._scores(self.ref_model, inputs)

    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Reference scores of one collated batch for ``precompute_ref_log_probs``: ``[B]`` chosen and
        ``[B]`` rejected (``[B, W]``, zero-padded to the widest rejected list, for several)."""
        use_peft = self.ref_model is None and is_peft_model(self.model)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_adapters() if use_peft else contextlib.nullcontext(model) as scored,
            self.accelerator.autocast(),
        ):
            scores = self._scores(scored, inputs)
        chosen, rejected = scores[:, 0], scores[:, 1:]
        if self._rejected_width == 1:
            return chosen, rejected[:, 0]
        return chosen, F.pad(rejected, (0, self._rejected_width - rejected.shape[1]))

    @torch.no_grad()
    def _user_embeddings(self, core: nn.Module, inputs: dict[str, Tensor]) -> Tensor | None:
        if "user_embedding" in inputs:
            return inputs["user_embedding"].float()
        if "history_ids" not in inputs:
            return None
        emb = core.get_input_embeddings().weight.detach()
        w = inputs["history_weights"].to(emb.dtype)
        return (emb[inputs["history_ids"]] * w[..., None]).sum(1).float()

    # -- the loss --------------------------------------------------------------------------------

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        core = self.accelerator.unwrap_model(model)
        scores = self._scores(core, inputs, through=model)
        ref = self._reference_scores(model, inputs)
        mask, lengths = inputs["candidate_mask"], inputs["candidate_lengths"]
        b = scores.shape[0]
        if mask.shape[1] < 2:
            raise ValueError("every prompt needs one or more rejected completions")
        neg_mask = mask[:, 1:]
        prompt, k = neg_mask.nonzero(as_tuple=True)
        ref_full = scores.detach().new_zeros(scores.shape) if ref is None else ref.to(scores.dtype)
        pairs = _Pairs(
            prompt, scores[prompt, 0], scores[prompt, k + 1], ref_full[prompt, 0], ref_full[prompt, k + 1],
            lengths[prompt, 0].to(scores.dtype), lengths[prompt, k + 1].to(scores.dtype),
        )  # fmt: skip

        loss: Tensor | float = 0.0
        extra: dict[str, Tensor] = {}
        for loss_type, weight in self._loss_plan.terms:
            if loss_type == "sft":  # TRL: mean NLL over every chosen completion token of the batch
                term = -scores[:, 0].sum() / lengths[:, 0].sum().to(scores.dtype)
            elif loss_type in PACKAGE_LOSS_TYPES and self._loss_plan.pairwise_dmpo:
                delta = pairs.chosen_ratio - pairs.rejected_ratio
                term = _prompt_mean(
                    -F.logsigmoid(self.beta * delta - self._loss_plan.pairwise_gamma), prompt, b
                )
            elif loss_type in PACKAGE_LOSS_TYPES:
                self.criterion.train(core.training)  # NAPO's margin EMA moves on training steps only
                out = self.criterion.from_logps(
                    scores[:, 0], scores[:, 1:], neg_mask,
                    None if ref is None else ref_full[:, 0], None if ref is None else ref_full[:, 1:],
                    user_embeddings=self._user_embeddings(core, inputs),
                    confidence=inputs.get("confidence"),
                )  # fmt: skip
                term = out.loss
                extra = {
                    k: v
                    for k, v in out.metrics.items()
                    if "/" in k and not k.startswith(("rewards/", "logps/"))
                }
            else:
                term = _prompt_mean(_pair_loss(loss_type, pairs, self.args), prompt, b)
            loss = loss + term * weight
        self._log_metrics(mode, inputs, pairs, extra)
        if return_outputs:
            return loss, {"chosen_logps": scores[:, 0].detach(), "rejected_logps": scores[:, 1:].detach()}
        return loss

    def _log_metrics(
        self, mode: str, inputs: dict[str, Tensor], pairs: _Pairs, extra: dict[str, Tensor]
    ) -> None:
        """TRL's reward and log-prob metrics over the batch's pairs, gathered over ranks as (sum,
        count) so that ranks with different numbers of pairs weigh each pair once; this package's
        metrics averaged over ranks."""
        chosen_r = self.beta * pairs.chosen_ratio.detach()
        rejected_r = self.beta * pairs.rejected_ratio.detach()
        first = torch.ones_like(pairs.prompt, dtype=torch.bool)
        first[1:] = pairs.prompt[1:] != pairs.prompt[:-1]  # the chosen completion counts once per prompt
        one = chosen_r.new_ones(())
        n_prompts, n_pairs = first.sum().to(chosen_r.dtype), one * pairs.prompt.numel()
        entries = {
            "rewards/chosen": ((chosen_r * first).sum(), n_prompts),
            "rewards/rejected": (rejected_r.sum(), n_pairs),
            "rewards/accuracies": ((chosen_r > rejected_r).to(chosen_r.dtype).sum(), n_pairs),
            "rewards/margins": ((chosen_r - rejected_r).sum(), n_pairs),
            "logps/chosen": ((pairs.chosen.detach() * first).sum(), n_prompts),
            "logps/rejected": (pairs.rejected.detach().sum(), n_pairs),
        }
        entries.update({k: (v.detach().to(chosen_r.dtype), one) for k, v in extra.items()})
        lengths = inputs["candidate_lengths"]
        tokens = (lengths + inputs["prompt_lengths"][:, None] * inputs["candidate_mask"]).sum()
        table = torch.stack([torch.stack([s.float(), n.float()]) for s, n in entries.values()])
        table = torch.cat(
            [table, torch.stack([tokens.float(), tokens.new_ones((), dtype=torch.float)])[None]]
        )
        gathered = self.accelerator.gather(table[None]).sum(0)  # [metrics + 1, 2]
        for name, (total, count) in zip([*entries, "num_tokens"], gathered.tolist()):
            if name == "num_tokens":
                if mode == "train":
                    self._total_train_tokens += int(total) // self._tp_size
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            else:
                self._metrics[mode][name].append(total / count)

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Tensor], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- checkpoints carry NAPO's margin EMA ------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.criterion is not None and self.criterion.state_dict():
            torch.save(
                self.criterion.state_dict(), os.path.join(output_dir or self.args.output_dir, LOSS_STATE_NAME)
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.criterion is None or not self.criterion.state_dict():
            return
        path = os.path.join(resume_from_checkpoint, LOSS_STATE_NAME)
        if os.path.exists(path):
            self.criterion.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
        else:
            warnings.warn(
                f"resuming from {resume_from_checkpoint}, which has no {LOSS_STATE_NAME}: NAPO's margin EMA "
                "starts afresh",
                stacklevel=2,
            )


# ----------------------------------------------------------------------------------------------
# Recommendation data in TRL's format
# ----------------------------------------------------------------------------------------------


def rec_to_trl(
    examples: Sequence[RecExample],
    *,
    num_negatives: int = 3,
    template: RecPromptTemplate | None = None,
    conversational: bool = True,
    seed: int = 0,
    history: bool = True,
) -> list[dict[str, Any]]:
    """S-DPO / NAPO recommendation records (:func:`~napo_kernels.recommender.data.read_rec_json`, e.g.
    ``../shared/data/lastfm-cans20``) as TRL preference rows with several rejected completions.

    Each example becomes ``{"prompt", "chosen", "rejected": [K completions]}``: the prompt is
    ``template.prompt(history, candidates)``, the chosen completion the true item, the rejected ones
    ``num_negatives`` other candidates drawn once per example (``NegativeSampler(mode="fixed")``, seeded
    by ``seed`` and the example's index, as the papers' released code fixes them). Conversational
    (default): the prompt is one user message, each completion one assistant message whose content is
    the item title; standard: plain strings, the completion ``template.answer(title)``. With
    ``history=True`` the row also holds ``"history"`` (the item titles), which
    :class:`FusedDPOTrainer` embeds for NAPO's similarity sharing. Use
    ``datasets.Dataset.from_list(rows)``.
    """
    template = template or RecPromptTemplate()
    sampler = NegativeSampler(num_negatives, mode="fixed", seed=seed)
    rows = []
    for i, ex in enumerate(examples):
        negatives = sampler.sample(ex.negatives(), i)
        if not negatives:
            raise ValueError(f"example {i}: no negative candidate to reject (num_negatives={num_negatives})")
        prompt = template.prompt(ex.history, ex.candidates)
        if conversational:
            row: dict[str, Any] = {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": ex.target}],
                "rejected": [[{"role": "assistant", "content": n}] for n in negatives],
            }
        else:
            row = {
                "prompt": prompt,
                "chosen": template.answer(ex.target),
                "rejected": [template.answer(n) for n in negatives],
            }
        if history:
            row["history"] = list(ex.history)
        rows.append(row)
    return rows
