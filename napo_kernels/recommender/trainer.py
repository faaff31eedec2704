"""Hugging Face ``transformers.Trainer`` integration: an SFT stage and a preference stage that
run one packed forward per prompt (:mod:`napo_kernels.recommender.packing`), take the model body's last hidden
states and the model's own output head (:func:`napo_kernels.heads.lm_head_of`: weight, bias,
soft-cap, logit scale; full logits are never computed), and call the fused loss.

* :class:`RecommenderSFTTrainer`: token-mean negative log-likelihood of the positive answer
  (prompt tokens are not scored), through the same fused log-prob op.
* :class:`PreferenceTrainer`: any method of the family (``dpo``, ``s_dpo``, ``dmpo``, ``napo``,
  ``dynamicpo``) via :class:`napo_kernels.PreferenceLoss`. Reference scores come from the same
  model with its LoRA adapters disabled (``peft``), from a separate frozen ``ref_model`` (full
  fine-tuning), or are omitted (``reference="none"``, NAPO's released setting). NAPO's margin EMA
  is saved into every checkpoint (``napo_loss_state.pt``) and restored on resume. User embeddings
  for NAPO's similarity sharing are the mean, over the history's items, of each item title's mean
  input-token embedding (detached).

Data-parallel (``torchrun --nproc_per_node N``, gloo on CPU or NCCL on GPUs): the policy forward
runs through the model the Trainer prepared (the ``DistributedDataParallel`` wrapper), so DDP
averages the gradients; the preference loss shares its negatives across ranks
(``process_group=data_parallel_group()``, opt out with ``share_across_ranks=False``), so NAPO's pool
spans the global batch and the averaged gradient is the one of a single process holding it; the
SFT loss divides by the global token count, for the same reason. Logged metrics are means over
ranks.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..distributed import data_parallel_group
from ..heads import LMHead
from ..integrations.sharded import run_as_forward, sharding_of, with_gathered_head
from ..losses import PreferenceLoss
from ..pipeline import PreferenceOutput
from .packing import CandidateCollator, candidate_logps, candidate_rows, resolve_layout

LOSS_STATE_NAME = "napo_loss_state.pt"
REFERENCES = ("auto", "adapters", "model", "none")


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


class _EpochCallback(TrainerCallback):
    """Tells the training dataset the epoch, so that it resamples its negatives."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        ds = self.trainer.train_dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(int(state.epoch or 0))


class _CandidateTrainer(Trainer):
    """Shared plumbing: layout choice, the collator, metric buffering and a loss-only eval step."""

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        layout: str = "auto",
        max_prompt_length: int | None = None,
        backend: str = "auto",
        **kwargs,
    ) -> None:
        if args is None:
            args = TrainingArguments(output_dir="runs/trainer", report_to="none")
        args.remove_unused_columns = False  # the collator needs the raw text features
        self.layout = resolve_layout(model, layout)
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "processing_class: a tokenizer is needed to build the default CandidateCollator"
                )
            data_collator = CandidateCollator(processing_class, self.layout, max_prompt_length)
        elif isinstance(data_collator, CandidateCollator):
            data_collator.layout = self.layout
        self.backend = backend
        self._buffered: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.add_callback(_EpochCallback(self))

    def _core(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def _store(self, metrics: dict[str, Tensor | float], training: bool) -> None:
        split = self._buffered["train" if training else "eval"]
        for k, v in metrics.items():
            split[k].append(float(v))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        if split == "train" and "loss" not in logs:  # the end-of-training summary: no step metrics
            return super().log(logs, start_time)
        prefix = "eval_" if split == "eval" else ""
        totals = {k: (sum(v), len(v)) for k, v in self._buffered[split].items() if v}
        group = data_parallel_group()
        if group is not None:  # every rank logs the same steps (the Trainer gathers its loss here too)
            per_rank: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(per_rank, totals, group=group)
            totals = {}
            for part in per_rank:
                for k, (total, n) in part.items():
                    acc = totals.get(k, (0.0, 0))
                    totals[k] = (acc[0] + total, acc[1] + n)
        for k, (total, n) in totals.items():
            logs[prefix + k] = total / n
        self._buffered[split].clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class RecommenderSFTTrainer(_CandidateTrainer):
    """Supervised fine-tuning on the positive answer (candidate 0) with prompt tokens masked.

    The loss is the mean negative log-likelihood per answer token of the batch. Use a dataset
    with no negatives (``RecPreferenceDataset(..., num_negatives=0)``): other candidates would be
    scored for nothing.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        core = self._core(model)
        logps = candidate_logps(core, inputs, reduction="sum", through=model, backend=self.backend)
        tokens = inputs["candidate_lengths"][:, 0].sum()
        group = data_parallel_group()
        if group is None:
            loss = -logps[:, 0].sum() / tokens
        else:
            # W * (local NLL sum) / (global token count): its mean over ranks, and so DDP's averaged
            # gradient, is the global batch's token mean, whatever each rank's answer lengths
            tokens = tokens.detach().clone()
            dist.all_reduce(tokens, group=group)
            loss = -logps[:, 0].sum() * dist.get_world_size(group) / tokens.to(logps.dtype)
        self._store({"sft/nll_per_token": loss.detach(), "sft/answer_tokens": tokens}, core.training)
        return (loss, {"logps": logps}) if return_outputs else loss


class PreferenceTrainer(_CandidateTrainer):
    """Preference training with a loss of the family on packed candidates.

    Args:
        model: a ``*ForCausalLM`` or a ``peft`` model around one.
        method, beta, loss_kwargs: build the :class:`PreferenceLoss` (ignored if ``loss`` is given).
            ``loss_kwargs`` are the other fields of :class:`~napo_kernels.LossConfig` (``gamma``,
            ``gamma0``, ``rho``, ``alpha``, ``mu``, ``tau``, ``sharing``, ``margin_mode``,
            ``detach_negatives``).
        reference: ``"auto"`` (adapters disabled for a peft model, ``ref_model`` if given, else a
            frozen copy of the initial model), ``"adapters"``, ``"model"`` or ``"none"``
            (reference-free rewards ``r = s_theta``).
        user_embeddings: ``"history"`` (default for NAPO: the mean title embedding of the history,
            used by ``sharing="similarity"``) or ``None``.
        sft_weight: add ``sft_weight *`` the positive's mean token NLL (DMPO's released code uses 1.0).
        reduction: ``"sum"`` (sequence scores, what the papers use) or ``"mean"`` (length-normalised).
        share_across_ranks: under ``torch.distributed`` with more than one rank, set the criterion's
            ``process_group`` to :func:`~napo_kernels.distributed.data_parallel_group` (unless it
            already has one), so each pool spans the negatives of the global batch. False: each rank
            keeps its own pool and its own margin EMA (the loss is the local mean; DDP averages it).
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *,
        method: str = "napo",
        beta: float = 1.0,
        loss: PreferenceLoss | None = None,
        loss_kwargs: dict | None = None,
        ref_model: nn.Module | None = None,
        reference: str = "auto",
        user_embeddings: str | None = "history",
        sft_weight: float = 0.0,
        reduction: str = "sum",
        backend: str = "auto",
        share_across_ranks: bool = True,
        **kwargs,
    ) -> None:
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if user_embeddings not in ("history", None):
            raise ValueError(f"user_embeddings must be 'history' or None, got {user_embeddings!r}")
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
        if reference == "auto":
            reference = "adapters" if _is_peft(model) else "model"
        if reference == "adapters" and not _is_peft(model):
            raise ValueError("reference='adapters' needs a peft model (adapters to disable)")
        if reference == "model" and ref_model is None:
            if sharding_of(model) is not None:
                raise ValueError(
                    "a sharded model (FSDP2 / ZeRO-3) cannot be copied into a reference model: pass "
                    "ref_model= (loaded and sharded the same way) or reference='none'"
                )
            ref_model = copy.deepcopy(model)  # the frozen starting point, as DPO does for full fine-tuning
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.reference, self.ref_model = reference, ref_model if reference == "model" else None
        self.criterion = loss or PreferenceLoss(
            method, beta=beta, reduction=reduction, backend=backend, **(loss_kwargs or {})
        )
        self.user_embedding_source = user_embeddings if self.criterion.method == "napo" else None
        self.sft_weight = float(sft_weight)
        super().__init__(model, args, backend=backend, **kwargs)
        self.criterion.to(self.args.device)
        if share_across_ranks and self.criterion.process_group is None:
            self.criterion.process_group = data_parallel_group()  # None single-process
        if self.ref_model is not None and sharding_of(self.ref_model) == "zero3":
            self.ref_model = self._zero3_engine(self.ref_model)
        elif self.ref_model is not None and sharding_of(self.ref_model) is None:  # FSDP2 places its shards
            self.ref_model.to(self.args.device)

    def _zero3_engine(self, model: nn.Module) -> nn.Module:
        """A ZeRO-3 partitioned reference model runs only inside a DeepSpeed engine (its hooks
        gather each module's parameters): wrap it in one, without optimizer, from the Trainer's config."""
        import deepspeed

        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            raise ValueError("ref_model is ZeRO-3 partitioned, but the Trainer does not run DeepSpeed")
        config = copy.deepcopy(plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # the engine's eval() returns None
        return engine

    # -- pieces of a step -------------------------------------------------------------------

    @torch.no_grad()
    def reference_logps(
        self, model: nn.Module, inputs: dict[str, Tensor], through: nn.Module | None = None
    ) -> Tensor | None:
        """``[B, C]`` reference scores, or None when reference-free. ``through``: the wrapper the
        policy forward runs through (:func:`candidate_rows`), so that the adapters-disabled
        reference runs under the same autocast as the policy."""
        red = self.criterion.reduction
        if self.reference == "none":
            return None
        if self.reference == "adapters":
            with model.disable_adapter():
                return candidate_logps(model, inputs, reduction=red, through=through, backend=self.backend)
        return candidate_logps(self.ref_model, inputs, reduction=red, backend=self.backend)

    @torch.no_grad()
    def user_embeddings(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor | None:
        """``[B, H]`` mean history-item embeddings (see :class:`CandidateCollator`), or None."""
        if self.user_embedding_source is None or "history_ids" not in inputs:
            return None
        # the embedding module, not its weight: under FSDP2 / ZeRO-3 only its forward sees the whole table
        emb = model.get_input_embeddings()(inputs["history_ids"])
        return (emb * inputs["history_weights"].to(emb.dtype)[..., None]).sum(1).float()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        core = self._core(model)
        b, c = inputs["candidate_mask"].shape
        if c < 2:
            raise ValueError(
                "preference training needs negatives: the batch has C = 1 candidate per prompt "
                "(build the dataset with num_negatives >= 1)"
            )
        self.criterion.train(core.training)  # the margin EMA moves on training steps only
        ref = self.reference_logps(core, inputs, through=model)
        if sharding_of(core) is None:
            loss, out, metrics = self._policy_loss(core, inputs, ref, through=model)
        else:  # inside the model's forward, where the sharding engine gathers the head (and embeddings)
            loss, out, metrics = run_as_forward(model, self._policy_loss, core, inputs, ref, None)
        self._store(metrics, core.training)
        return (loss, out) if return_outputs else loss

    def _policy_loss(
        self, core: nn.Module, inputs: dict[str, Tensor], ref: Tensor | None, through: nn.Module | None
    ) -> tuple[Tensor, PreferenceOutput, dict[str, Tensor]]:
        """The training loss (preference, plus the SFT term), the criterion's output and the step's
        metrics. Without ``through`` (a sharded model: this runs as its forward) the output holds only
        detached tensors: what leaves a forward needing a gradient gets the engine's backward hooks."""
        users = self.user_embeddings(core, inputs)
        rows = candidate_rows(core, inputs, through=through)

        def loss_of(head: LMHead, rows: Tensor) -> tuple[Tensor, PreferenceOutput, dict[str, Tensor]]:
            loss, out, metrics = self._loss_from_rows(head, rows, inputs, ref, users)
            if through is None:
                out = PreferenceOutput(
                    out.loss.detach(), out.chosen_logps.detach(), out.rejected_logps.detach(), out.metrics,
                    None if out.rows is None else out.rows.detach(),
                )  # fmt: skip
            return loss, out, metrics

        return with_gathered_head(core, loss_of, rows)

    def _loss_from_rows(
        self, head: LMHead, rows: Tensor, inputs: dict[str, Tensor], ref: Tensor | None, users: Tensor | None
    ) -> tuple[Tensor, PreferenceOutput, dict[str, Tensor]]:
        b, c = inputs["candidate_mask"].shape
        out = self.criterion(
            rows,
            head.weight,  # with bias, soft-cap and logit scale: the model's own head
            inputs["score_labels"],
            **head.loss_kwargs(),
            sequence_ids=inputs["score_sequence"],
            num_prompts=b,
            num_candidates=c,
            candidate_mask=inputs["candidate_mask"],
            ref_logps=ref,
            user_embeddings=users,
        )
        loss = out.loss
        metrics = {k: v for k, v in out.metrics.items() if k != "loss"}
        if self.sft_weight:
            chosen = out.chosen_logps.float()
            if self.criterion.reduction == "sum":
                chosen = chosen / inputs["candidate_lengths"][:, 0].to(chosen.dtype)
            nll = -chosen.mean()
            loss = loss + self.sft_weight * nll
            metrics["sft/nll_per_token"] = nll.detach()
        metrics["loss/preference"] = out.loss.detach()
        return loss, out, metrics

    # -- checkpoints carry the loss state (NAPO's margin EMA) -------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        torch.save(self.criterion.state_dict(), os.path.join(output_dir, LOSS_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.load_loss_state(resume_from_checkpoint) and self.criterion.state_dict():
            # e.g. a checkpoint written by a plain Trainer: the run goes on, but not as it would have
            warnings.warn(
                f"resuming from {resume_from_checkpoint}, which has no {LOSS_STATE_NAME}: the loss state "
                f"({', '.join(self.criterion.state_dict())}) starts afresh, so the "
                "resumed run differs from an uninterrupted one",
                stacklevel=2,
            )

    def load_loss_state(self, checkpoint_dir: str) -> bool:
        """Restore the loss state saved in ``checkpoint_dir``; False when the file is absent."""
        path = os.path.join(checkpoint_dir, LOSS_STATE_NAME)
        if not os.path.exists(path):
            return False
        self.criterion.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
        return True
