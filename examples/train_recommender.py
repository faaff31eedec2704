"""Train an LLM recommender end to end: SFT, then preference training with a loss of the family,
evaluated before and after. Nothing is downloaded: the model is a tiny Llama built from a config,
the tokenizer a byte-level BPE trained on the data's own prompts and titles.

    python examples/train_recommender.py                       # NAPO on the synthetic world
    python examples/train_recommender.py --methods sft s_dpo napo --out runs/demo.json
    python examples/train_recommender.py --data ../shared/data/lastfm-cans20 --domain artist \
        --sft-checkpoint runs/lastfm-sft --methods sft dpo s_dpo dmpo napo dynamicpo

``--data`` is a directory with ``train.json[.gz]`` and ``val.json`` in the S-DPO/NAPO format.
The SFT stage trains the whole (randomly initialised) model; the preference stage trains LoRA
adapters (peft) on top of the SFT model, whose frozen copy (adapters disabled) is the reference.
``sft`` in ``--methods`` reports the SFT-only model. Results go to ``--out`` as JSON and a table.

Data-parallel, same script (``--batch-size`` is per process; NAPO's pool spans all processes):

    torchrun --standalone --nproc_per_node 2 examples/train_recommender.py --methods napo   # CPU, gloo
    torchrun --standalone --nproc_per_node 4 examples/train_recommender.py ...              # 4 GPUs, NCCL

Every process trains; rank 0 alone builds the tokenizer, evaluates, saves and prints.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments
from transformers.utils import logging as hf_logging

from napo_kernels.recommender.data import (
    ItemPopularity,
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", default=None, help="directory with train.json[.gz] and val.json (default: synthetic)"
    )
    p.add_argument("--domain", default="item", help="wording of the prompt: item, artist, movie, ...")
    p.add_argument("--methods", nargs="+", default=["sft", "napo"], choices=METHODS)
    p.add_argument("--num-negatives", type=int, default=None, help="K (default: 1 dpo, 5 dynamicpo, else 3)")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument(
        "--reference", default="auto", choices=["auto", "none"], help="none: reference-free rewards"
    )
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sft-epochs", type=float, default=3.0)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument(
        "--sft-checkpoint", default=None, help="load the SFT model from here if present, else save it"
    )
    p.add_argument("--pref-steps", type=int, default=150)
    p.add_argument("--pref-lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per step and process")
    p.add_argument(
        "--local-pool",
        action="store_true",
        help="under torchrun: NAPO's pool from the process's own batch only (default: the global batch)",
    )
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--no-generation", action="store_true", help="skip the (slower) generation protocol")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train_recommender.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--logging-steps", type=int, default=25)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default); tiny models gain little from more",
    )
    return p.parse_args(argv)


def init_distributed() -> bool:
    """Join the process group when launched by ``torchrun``; True on rank 0 (or single-process).
    The Trainer would create the group lazily; creating it here lets rank 0 share the tokenizer."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # generous timeout: the other ranks wait while rank 0 evaluates
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
    return not dist.is_initialized() or dist.get_rank() == 0


def on_rank0(fn, *args):
    """``fn(*args)`` on rank 0, broadcast to the other ranks (which wait for it)."""
    if not dist.is_initialized():
        return fn(*args)
    box = [fn(*args) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def load_data(args):
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


def build_model(tokenizer, args) -> LlamaForCausalLM:
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


def training_args(out_dir: str, args, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        report_to="none",
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=args.quiet,
        logging_steps=args.logging_steps,
        seed=args.seed,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        weight_decay=0.0,
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in each forward
        **kw,
    )


def evaluate(model, tok, val, template, popularity, args, label: str) -> dict:
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


def sft_stage(train, template, args):
    ckpt = Path(args.sft_checkpoint) if args.sft_checkpoint else None
    if ckpt is not None and (ckpt / "config.json").exists():
        if args.main:
            print(f"loading the SFT checkpoint {ckpt}")
        tok = PreTrainedTokenizerFast.from_pretrained(ckpt)
        return LlamaForCausalLM.from_pretrained(ckpt), tok, None, 0.0
    texts = [template.prompt(e.history, e.candidates) for e in train[:5000]]
    titles = sorted({t for e in train for t in (*e.history, *e.candidates)})
    # one tokenizer for every rank (the model's vocabulary and every rank's token ids must agree)
    tok = on_rank0(train_bpe_tokenizer, texts + [template.answer(t) for t in titles], args.vocab_size)
    model = build_model(tok, args)
    untrained = None
    if "untrained" not in args.skip and args.main:
        untrained = copy.deepcopy(model)
    t0 = time.time()
    trainer = RecommenderSFTTrainer(
        model,
        training_args("runs/sft", args, num_train_epochs=args.sft_epochs, learning_rate=args.sft_lr),
        train_dataset=RecPreferenceDataset(train, template, num_negatives=0, seed=args.seed),
        processing_class=tok,
    )
    trainer.train()
    seconds = time.time() - t0
    if ckpt is not None and args.main:
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
    return model, tok, untrained, seconds


def preference_stage(sft_model, tok, train, template, method: str, args):
    model = get_peft_model(
        copy.deepcopy(sft_model),
        LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    k = args.num_negatives or DEFAULT_K.get(method, 3)
    trainer = PreferenceTrainer(
        model,
        training_args(f"runs/{method}", args, max_steps=args.pref_steps, learning_rate=args.pref_lr),
        method=method,
        beta=args.beta,
        reference=args.reference,
        share_across_ranks=not args.local_pool,
        train_dataset=RecPreferenceDataset(train, template, num_negatives=k, seed=args.seed),
        processing_class=tok,
    )
    t0 = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return model, time.time() - t0, k, logs[-1] if logs else {}


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.skip = set()
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

    skip = {"skip", "main"}
    results: dict = {"args": {k: v for k, v in vars(args).items() if k not in skip}, "runs": {}}
    results["args"]["world_size"] = world
    sft_model, tok, untrained, sft_seconds = sft_stage(train, template, args)
    if untrained is not None:
        results["runs"]["untrained"] = evaluate(untrained, tok, val, template, popularity, args, "untrained")
        del untrained
    if "sft" in args.methods and args.main:
        results["runs"]["sft"] = evaluate(sft_model, tok, val, template, popularity, args, "sft")
        results["runs"]["sft"]["train_seconds"] = sft_seconds
    for method in args.methods:
        if method == "sft":
            continue
        barrier()  # the other ranks wait for rank 0's evaluation before the next collectives
        model, seconds, k, last = preference_stage(sft_model, tok, train, template, method, args)
        if args.main:
            res = evaluate(model, tok, val, template, popularity, args, method)
            res |= {"train_seconds": seconds, "steps": args.pref_steps, "K": k, "last_log": last}
            results["runs"][method] = res
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
