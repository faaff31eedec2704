r"""Train an LLM recommender end to end: SFT, then preference training with a loss of the family,
evaluated before and after. Nothing is downloaded: the model is a tiny Llama built from a config,
the tokenizer a byte-level BPE trained on the data's own prompts and titles.

    .venv/bin/python examples/train_recommender.py               # NAPO on the synthetic world
    .venv/bin/python examples/train_recommender.py --methods sft s_dpo napo --out runs/demo.json
    .venv/bin/python examples/train_recommender.py --data path/to/lastfm-cans20 --domain artist \
        --sft-checkpoint runs/lastfm-sft --methods sft dpo s_dpo dmpo napo dynamicpo

Checkpoints, and an interrupted run continued where it stopped (same options plus the flag):

    .venv/bin/python examples/train_recommender.py --checkpoint-dir runs/ckpt --save-steps 50
    .venv/bin/python examples/train_recommender.py --checkpoint-dir runs/ckpt --save-steps 50 \
        --resume-from-checkpoint

``--data`` is a directory with ``train.json[.gz]`` and ``val.json`` in the S-DPO/NAPO format.
The SFT stage trains the whole (randomly initialised) model; the preference stage trains LoRA
adapters (peft) on top of the SFT model, whose frozen copy (adapters disabled) is the reference.
``sft`` in ``--methods`` reports the SFT-only model. Results go to ``--out`` as JSON and a table.

Data-parallel, same script (``--batch-size`` is per process; NAPO's pool spans all processes):

    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/train_recommender.py --methods napo  # CPU
    .venv/bin/torchrun --standalone --nproc_per_node 4 examples/train_recommender.py ...    # 4 GPUs, NCCL

Every process trains; rank 0 alone builds the tokenizer, evaluates, saves and prints.

Sharded instead of replicated (each process holds a shard of the parameters, gradients and
optimizer state; the fused loss runs where the engine gathers the head: docs/distributed.md):

    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/train_recommender.py --fsdp   # FSDP2
    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/train_recommender.py --zero3  # ZeRO-3

or, on GPUs, ``accelerate launch --config_file examples/accelerate/fsdp2.yaml`` (or ``zero3.yaml``)
with the script's usual options.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from napo_kernels import LossConfig, lm_head_of
from napo_kernels.integrations.sharded import full_parameters, sharding_of
from napo_kernels.recommender.data import (
    ItemPopularity,
    RecExample,
    RecPreferenceDataset,
    RecPromptTemplate,
    generate_world,
    read_rec_json,
    train_bpe_tokenizer,
)
from napo_kernels.recommender.evaluation import evaluate_recommender
from napo_kernels.recommender.trainer import PreferenceTrainer, RecommenderSFTTrainer

METHODS = ("sft", "dpo", "s_dpo", "dmpo", "napo", "dynamicpo")
DEFAULT_K = {"dpo": 1, "dynamicpo": 5}  # S-DPO, DMPO and NAPO: 3 (the papers' settings)
TABLE = [
    ("rank/HR@1", "HR@1"),
    ("rank/NDCG@5", "NDCG@5"),
    ("rank/MRR", "MRR"),
    ("gen/HR@1", "genHR@1"),
    ("gen/ValidRatio", "Valid"),
    ("rank/pop/top1_percentile", "PopPct"),
    ("rank/pop/long_tail_share", "Tail"),
]
T = TypeVar("T")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except None (the help says what it means) and a flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        if isinstance(action.default, list):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _number(kind: type, minimum: float, strict: bool = False) -> Callable[[str], int | float]:
    """An argparse type: ``kind`` at least (or, ``strict``, more than) ``minimum``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value

    return parse


def add_data_options(group: argparse._ArgumentGroup, max_eval: int) -> None:
    """--data, --domain, --max-train, --max-eval (examples/study.py shares them)."""
    positive = _number(int, 1)
    group.add_argument(
        "--data",
        default=None,
        help="directory with train.json[.gz] and val.json (default: the synthetic world)",
    )
    group.add_argument("--domain", default="item", help="wording of the prompt: item, artist, movie, ...")
    group.add_argument(
        "--max-train", type=positive, default=None, help="train on at most this many examples (default: all)"
    )
    group.add_argument(
        "--max-eval",
        type=positive,
        default=max_eval,
        help="evaluate on at most this many validation examples",
    )


def add_model_options(group: argparse._ArgumentGroup) -> None:
    """--vocab-size, --hidden, --layers of the tiny Llama (examples/study.py shares them)."""
    group.add_argument("--vocab-size", type=_number(int, 300), default=1024, help="BPE vocabulary size")
    group.add_argument(
        "--hidden", type=_number(int, 1), default=128, help="hidden size (one attention head per 32)"
    )
    group.add_argument("--layers", type=_number(int, 1), default=4, help="decoder layers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=HelpFormatter,
    )
    positive, count = _number(int, 1), _number(int, 0)
    rate = _number(float, 0.0, strict=True)
    add_data_options(p.add_argument_group("data"), max_eval=200)
    add_model_options(p.add_argument_group("model (a tiny Llama built from a config)"))
    sft = p.add_argument_group("SFT stage (the whole model)")
    sft.add_argument("--sft-epochs", type=rate, default=3.0, help="epochs over the training examples")
    sft.add_argument("--sft-lr", type=rate, default=2e-3, help="learning rate (cosine schedule)")
    sft.add_argument(
        "--sft-checkpoint",
        default=None,
        help="load the SFT model from this directory if it holds one, else save it there "
        "(default: CHECKPOINT_DIR/sft-model with --checkpoint-dir, else not saved)",
    )
    pref = p.add_argument_group("preference stage (LoRA adapters on the SFT model, which is the reference)")
    pref.add_argument(
        "--methods",
        nargs="+",
        default=["sft", "napo"],
        choices=METHODS,
        help="what to train and evaluate, in order (sft: the SFT model alone)",
    )
    pref.add_argument(
        "--num-negatives",
        type=positive,
        default=None,
        help="negatives per prompt K (default: 1 for dpo, 5 for dynamicpo, 3 for the others)",
    )
    pref.add_argument("--beta", type=float, default=1.0, help="the loss's temperature beta (> 0)")
    pref.add_argument(
        "--reference",
        default="auto",
        choices=["auto", "none"],
        help="auto: the SFT model (adapters disabled); none: reference-free rewards",
    )
    pref.add_argument("--pref-steps", type=positive, default=150, help="optimizer steps per method")
    pref.add_argument("--pref-lr", type=rate, default=1e-3, help="learning rate (cosine schedule)")
    pref.add_argument("--lora-r", type=positive, default=16, help="LoRA rank (alpha = 2 r)")
    pref.add_argument(
        "--local-pool",
        action="store_true",
        help="under torchrun: NAPO's pool from the process's own batch only (otherwise the global batch)",
    )
    shard = p.add_argument_group(
        "sharding (under torchrun, 2+ processes; default: DDP, every process a full copy)"
    )
    engine = shard.add_mutually_exclusive_group()
    engine.add_argument(
        "--fsdp",
        action="store_true",
        help="FSDP2: load the model sharded across the processes (transformers' DistributedConfig)",
    )
    engine.add_argument("--zero3", action="store_true", help="DeepSpeed ZeRO-3 (needs deepspeed installed)")
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=positive, default=16, help="prompts per step and process")
    run.add_argument("--eval-batch-size", type=positive, default=16, help="prompts per evaluation batch")
    run.add_argument("--no-generation", action="store_true", help="skip the (slower) generation protocol")
    run.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the training")
    run.add_argument("--out", default="runs/train_recommender.json", help="the results as JSON")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--logging-steps", type=positive, default=25, help="log the training metrics every N steps"
    )
    run.add_argument(
        "--threads", type=count, default=1, help="torch threads (0: torch's default); tiny models gain little"
    )
    ckpt = p.add_argument_group("checkpoints (without --checkpoint-dir nothing is written but --out)")
    ckpt.add_argument(
        "--checkpoint-dir",
        default=None,
        help="write Trainer checkpoints (model or LoRA adapters, optimizer, scheduler, RNG, NAPO's margin "
        "EMA) to CHECKPOINT_DIR/sft and CHECKPOINT_DIR/<method>, the SFT model to CHECKPOINT_DIR/sft-model "
        "(default: none, no checkpoints)",
    )
    ckpt.add_argument(
        "--save-steps", type=positive, default=50, help="a checkpoint every N steps, and at the end"
    )
    ckpt.add_argument(
        "--save-total-limit",
        type=positive,
        default=None,
        help="keep the newest N checkpoints of each stage (default: all)",
    )
    ckpt.add_argument(
        "--resume-from-checkpoint",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue an interrupted run with the same options: alone, from the newest checkpoints under "
        "--checkpoint-dir (the saved SFT model or its stage's checkpoint, then each method's; a stage "
        "without one starts afresh); with a path, the one preference method from that checkpoint "
        "(default: start afresh)",
    )
    return p


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no data or model, so that a mistake stops the run before the SFT stage."""
    heads, kv_heads = max(1, args.hidden // 32), max(1, args.hidden // 64)
    if args.hidden % heads or heads % kv_heads:
        raise ValueError(
            f"--hidden {args.hidden}: {heads} attention heads cannot split it or share {kv_heads} "
            "key-value heads; use 32 or a multiple of 64"
        )
    if args.data is not None:
        d = Path(args.data)
        has_train = (d / "train.json").exists() or (d / "train.json.gz").exists()
        if not has_train or not (d / "val.json").exists():
            raise ValueError(f"--data {args.data}: expected train.json (or train.json.gz) and val.json there")
    methods = [m for m in args.methods if m != "sft"]
    for method in methods:
        try:
            config = LossConfig(method=method, beta=args.beta)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--beta {args.beta} with --methods {method}: {exc}") from None
        k = negatives(method, args)
        if config.spec.single_negative and k != 1:
            raise ValueError(
                f"--num-negatives {k}: {method} compares each positive with exactly one negative; "
                "run it alone (its default K is 1), or use s_dpo / napo for several negatives"
            )
    if args.fsdp or args.zero3:
        flag = "--fsdp" if args.fsdp else "--zero3"
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ValueError(f"{flag} shards the model across processes: run under torchrun with 2 or more")
        if args.checkpoint_dir is not None or args.sft_checkpoint is not None:
            raise ValueError(
                f"{flag}: checkpoints are not supported for sharded runs here; drop the checkpoint options"
            )
    resume = args.resume_from_checkpoint
    if args.save_total_limit is not None and args.checkpoint_dir is None:
        raise ValueError("--save-total-limit needs --checkpoint-dir")
    if resume == "latest" and args.checkpoint_dir is None:
        raise ValueError("--resume-from-checkpoint without a path resumes from --checkpoint-dir: give it")
    if resume not in (None, "latest"):
        if len(methods) != 1:
            raise ValueError(
                f"--resume-from-checkpoint {resume}: a checkpoint belongs to one preference method, "
                f"but --methods has {len(methods)}"
            )
        if not (Path(resume) / "trainer_state.json").is_file():
            raise ValueError(f"--resume-from-checkpoint {resume}: not a checkpoint (no trainer_state.json)")
        if sft_checkpoint(args) is None or not (sft_checkpoint(args) / "config.json").is_file():
            raise ValueError(
                f"--resume-from-checkpoint {resume}: the SFT model it was trained on is needed; give "
                "--sft-checkpoint (or --checkpoint-dir) where it was saved"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def negatives(method: str, args: argparse.Namespace) -> int:
    """K for ``method``: --num-negatives, else the method's own default."""
    return args.num_negatives if args.num_negatives is not None else DEFAULT_K.get(method, 3)


def sft_checkpoint(args: argparse.Namespace) -> Path | None:
    """Where the SFT model is loaded from, or saved to."""
    if args.sft_checkpoint is not None:
        return Path(args.sft_checkpoint)
    return Path(args.checkpoint_dir) / "sft-model" if args.checkpoint_dir is not None else None


def init_distributed() -> bool:
    """Join the process group when launched by ``torchrun``; True on rank 0 (or single-process).
    The Trainer would create the group lazily; creating it here lets rank 0 share the tokenizer."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # generous timeout: the other ranks wait while rank 0 evaluates
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
    return not dist.is_initialized() or dist.get_rank() == 0


def on_rank0(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on rank 0, broadcast to the other ranks (which wait for it)."""
    if not dist.is_initialized():
        return fn(*args)
    box = [fn(*args) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def load_data(args: argparse.Namespace) -> tuple[list[RecExample], list[RecExample]]:
    if args.data is None:
        world = generate_world(seed=args.seed)
        train, val = world.train, world.val
    else:
        d = Path(args.data)
        train_path = d / "train.json" if (d / "train.json").exists() else d / "train.json.gz"
        train, val = read_rec_json(train_path), read_rec_json(d / "val.json")
    rng = random.Random(args.seed)
    if args.max_train is not None and args.max_train < len(train):
        train = rng.sample(train, args.max_train)
    if args.max_eval is not None and args.max_eval < len(val):
        val = random.Random(args.seed + 1).sample(val, args.max_eval)
    return train, val


def build_model(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3 // 8 * 8),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def stage_dir(args: argparse.Namespace, stage: str) -> str:
    """The Trainer's output directory of a stage: under --checkpoint-dir, else a temporary one
    (the Trainer creates its output directory even when it saves nothing)."""
    return str(Path(args.checkpoint_dir) / stage) if args.checkpoint_dir is not None else args.scratch


def resume_point(args: argparse.Namespace, stage: str) -> str | None:
    """The checkpoint a stage resumes from (None: it starts afresh)."""
    resume = args.resume_from_checkpoint
    if resume is None or stage == "sft" and resume != "latest":
        return None
    if resume != "latest":
        return resume
    directory = Path(stage_dir(args, stage))
    return get_last_checkpoint(str(directory)) if directory.is_dir() else None


def zero3_options() -> dict[str, Any]:
    """TrainingArguments for DeepSpeed ZeRO-3 (the Trainer fills the "auto" values)."""
    if not torch.cuda.is_available():
        # Without GPUs accelerate gives DeepSpeed no process-group backend and counts one process
        # (every rank would train on the same batches): configure its state with gloo first.
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)  # a previous stage's Accelerator
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        # threshold 0: this script's tiny tensors are all below DeepSpeed's default persistence
        # threshold (1e5 elements) and would stay whole; real models keep the default
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    return dict(deepspeed=config, accelerator_config={"use_configured_state": not torch.cuda.is_available()})


def training_args(out_dir: str, args: argparse.Namespace, **kw: Any) -> TrainingArguments:
    saves = args.checkpoint_dir is not None
    if args.zero3:
        kw |= zero3_options()
    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        report_to="none",
        save_strategy="steps" if saves else "no",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        use_cpu=not torch.cuda.is_available() and not args.zero3,  # accelerate runs DeepSpeed only without it
        disable_tqdm=args.quiet,
        logging_steps=args.logging_steps,
        seed=args.seed,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        weight_decay=0.0,
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in each forward
        **kw,
    )


def evaluate(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerFast,
    val: list[RecExample],
    template: RecPromptTemplate,
    popularity: ItemPopularity,
    args: argparse.Namespace,
    label: str,
) -> dict[str, Any]:
    t0 = time.time()
    res = evaluate_recommender(
        model,
        tok,
        val,
        template,
        popularity=popularity,
        generation=not args.no_generation,
        batch_size=args.eval_batch_size,
        progress=not args.quiet,
    )
    res["eval_seconds"] = time.time() - t0
    print(
        f"[{label}] " + ", ".join(f"{k}={v:.4f}" for k, v in res.items() if k.startswith(("rank/HR", "gen/")))
    )
    return res


def load_sharded(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """``model`` sharded with FSDP2 across the processes (--fsdp), through transformers' own
    ``from_pretrained(distributed_config=...)``, the FSDP2 path its Trainer runs on CPU too; any other
    run gets ``model`` back. The torch random state is kept, so LoRA adapters created next start
    as in an unsharded run."""
    if not args.fsdp:
        return model
    from transformers.distributed import DistributedConfig

    state = torch.get_rng_state()
    # rank 0 saves the model where every rank loads it from
    path = on_rank0(lambda: tempfile.mkdtemp(prefix="train_recommender-shard-"))
    if args.main:
        model.save_pretrained(path)
    barrier()
    config = DistributedConfig(fsdp_size=dist.get_world_size())
    sharded = type(model).from_pretrained(path, distributed_config=config)
    barrier()
    if args.main:
        shutil.rmtree(path)
    torch.set_rng_state(state)
    return sharded


def describe_head(model: torch.nn.Module) -> str:
    """What this process holds of the output head's weight, under a sharding engine."""
    weight = lm_head_of(model).weight
    if hasattr(weight, "ds_shape"):  # ZeRO-3: a placeholder between forwards
        return f"ZeRO-3, lm_head.weight here: {list(weight.shape)} of {list(weight.ds_shape)}"
    return f"FSDP2, lm_head.weight here: {list(weight.to_local().shape)} of {list(weight.shape)}"


def gathered(model: torch.nn.Module, plain: T) -> T:
    """``plain`` (an unsharded model of the same structure) holding ``model``'s trained parameters,
    when training sharded them (--fsdp, --zero3, accelerate's FSDP2 / ZeRO-3): rank 0 evaluates and
    saves a whole model. Every process must call it."""
    if sharding_of(model) is None:
        return model
    print(f"[rank {dist.get_rank()}] trained sharded ({describe_head(model)}); gathering it")
    full = full_parameters(model)
    # named_parameters lists a tied weight once; the plain model's state_dict also names its alias
    missing = {n for n, _ in plain.named_parameters()} - full.keys()
    if missing:
        raise RuntimeError(f"gathered parameters do not match the plain model: missing {sorted(missing)}")
    plain.load_state_dict(full, strict=False)
    return plain


def sft_stage(
    train: list[RecExample], template: RecPromptTemplate, args: argparse.Namespace
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, LlamaForCausalLM | None, float, str | None]:
    """The SFT model, its tokenizer, the untrained model (rank 0, when trained here), the SFT
    seconds and the checkpoint the stage resumed from."""
    ckpt = sft_checkpoint(args)
    if ckpt is not None and (ckpt / "config.json").exists():
        if args.main:
            print(f"loading the SFT checkpoint {ckpt}")
        tok = PreTrainedTokenizerFast.from_pretrained(ckpt)
        return LlamaForCausalLM.from_pretrained(ckpt), tok, None, 0.0, None
    resume = resume_point(args, "sft")
    if resume is not None:  # the Trainer saved the tokenizer with the model: the same token ids
        tok = PreTrainedTokenizerFast.from_pretrained(resume)
    else:
        texts = [template.prompt(e.history, e.candidates) for e in train[:5000]]
        titles = sorted({t for e in train for t in (*e.history, *e.candidates)})
        # one tokenizer for every rank (the model's vocabulary and every rank's token ids must agree)
        tok = on_rank0(train_bpe_tokenizer, texts + [template.answer(t) for t in titles], args.vocab_size)
    model = build_model(tok, args)
    untrained = copy.deepcopy(model) if args.main else None
    plain = copy.deepcopy(model) if args.fsdp or args.zero3 else None  # receives the trained shards
    model = load_sharded(model, args)
    t0 = time.time()
    trainer = RecommenderSFTTrainer(
        model,
        training_args(
            stage_dir(args, "sft"), args, num_train_epochs=args.sft_epochs, learning_rate=args.sft_lr
        ),
        train_dataset=RecPreferenceDataset(train, template, num_negatives=0, seed=args.seed),
        processing_class=tok,
    )
    if resume is not None and args.main:
        print(f"SFT resumes from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - t0
    model = gathered(model, plain)
    if ckpt is not None and args.main:
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
    return model, tok, untrained, seconds, resume


def lora_config(rank: int) -> LoraConfig:
    """The preference stage's adapters: every attention and MLP projection, alpha = 2 r, no dropout."""
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=modules)


def preference_stage(
    sft_model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    train: list[RecExample],
    template: RecPromptTemplate,
    method: str,
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, float, int, dict[str, float], str | None]:
    """The trained model, the training seconds, K, the last training log and the checkpoint the
    stage resumed from."""
    model = get_peft_model(
        load_sharded(copy.deepcopy(sft_model), args),
        lora_config(args.lora_r),
    )
    k = negatives(method, args)
    trainer = PreferenceTrainer(
        model,
        training_args(stage_dir(args, method), args, max_steps=args.pref_steps, learning_rate=args.pref_lr),
        method=method,
        beta=args.beta,
        reference=args.reference,
        share_across_ranks=not args.local_pool,
        train_dataset=RecPreferenceDataset(train, template, num_negatives=k, seed=args.seed),
        processing_class=tok,
    )
    resume = resume_point(args, method)
    if resume is not None and args.main:
        print(f"{method} resumes from {resume}")
    t0 = time.time()
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    seconds = time.time() - t0
    if sharding_of(model) is not None:  # an unsharded copy with the same adapters, for rank 0
        state = torch.get_rng_state()  # the next method's adapters start as in an unsharded run
        plain = get_peft_model(copy.deepcopy(sft_model), copy.deepcopy(model.peft_config["default"]))
        torch.set_rng_state(state)
        model = gathered(model, plain)
    return model, seconds, k, logs[-1] if logs else {}, resume


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # the Trainers' output directories when nothing is saved (removed at the end)
    with tempfile.TemporaryDirectory(prefix="train_recommender-") as scratch:
        args.scratch = scratch
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.main = init_distributed()
    if not args.main:
        args.quiet = True  # one progress bar, from rank 0
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    template = RecPromptTemplate(domain=args.domain)
    train, val = load_data(args)
    popularity = ItemPopularity.from_examples(train)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.main:
        sizes = f"{len(train)} train / {len(val)} eval examples, {len(popularity)} items"
        print(f"data: {sizes}; {world} process(es)")

    internal = {"main", "scratch"}
    results: dict = {"args": {k: v for k, v in vars(args).items() if k not in internal}, "runs": {}}
    results["args"]["world_size"] = world
    sft_model, tok, untrained, sft_seconds, sft_resumed = sft_stage(train, template, args)
    if untrained is not None:
        results["runs"]["untrained"] = evaluate(untrained, tok, val, template, popularity, args, "untrained")
        del untrained
    if "sft" in args.methods and args.main:
        results["runs"]["sft"] = evaluate(sft_model, tok, val, template, popularity, args, "sft")
        results["runs"]["sft"] |= {"train_seconds": sft_seconds, "resumed_from": sft_resumed}
    for method in args.methods:
        if method == "sft":
            continue
        barrier()  # the other ranks wait for rank 0's evaluation before the next collectives
        model, seconds, k, last, resumed = preference_stage(sft_model, tok, train, template, method, args)
        if args.main:
            res = evaluate(model, tok, val, template, popularity, args, method)
            res |= {"train_seconds": seconds, "steps": args.pref_steps, "K": k, "last_log": last}
            results["runs"][method] = res | {"resumed_from": resumed}
        del model
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if not args.main:
        return results

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{'run':<10}" + "".join(f"{name:>9}" for _, name in TABLE) + f"{'train s':>9}")
    for name, res in results["runs"].items():
        cells = "".join(f"{res.get(key, float('nan')):>9.3f}" for key, _ in TABLE)
        print(f"{name:<10}{cells}{res.get('train_seconds', 0.0):>9.0f}")
    print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
