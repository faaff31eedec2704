"""Stock ``trl.DPOTrainer`` against the drop-in ``FusedDPOTrainer`` on the same tiny model and data.

    .venv/bin/python examples/trl_dpo.py                 # one rejected completion, synthetic data
    .venv/bin/python examples/trl_dpo.py --lastfm        # 3 rejected completions, LastFM (../shared/data)
    .venv/bin/python examples/trl_dpo.py --lastfm --method napo

A tiny Llama built from a config, a BPE tokenizer trained on the data with a plain chat template,
conversational rows (``rec_to_trl``), LoRA with the reference being the model with its adapters
disabled. Both trainers start from the same weights and see the same batches (sequential
sampling: stock TRL's batch holds the expanded pairs of the drop-in's prompts); the script prints
both runs' per-step losses side by side and, as its last line, the largest loss and LoRA weight
differences and the time and peak-memory ratios (stock / fused; time: the steps after the first,
whose one-time set-up is not a step's cost; memory: the growth of the process's peak resident set
during ``train()``).

With ``--lastfm`` every prompt has ``--num-negatives`` rejected completions: stock TRL trains on the
expanded pairs (one row per rejected completion, the prompt repeated), the drop-in on the prompts
with all their rejected completions. ``--method dmpo-pairwise`` (default; DMPO's released loss, the
mean of the pairwise DPO losses) is the same loss as stock TRL's ``sigmoid`` on the expanded pairs,
so the two columns agree; ``s_dpo``, ``dmpo``, ``napo`` and ``dynamicpo`` are other losses, shown
beside TRL's for scale only.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here: nothing to download
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from napo_kernels.integrations.trl import (  # noqa: E402
    PLAIN_CHAT_TEMPLATE,
    FusedDPOConfig,
    FusedDPOTrainer,
    rec_to_trl,
)
from napo_kernels.recommender.data import (  # noqa: E402
    LASTFM_TEMPLATE,
    SYNTHETIC_TEMPLATE,
    generate_world,
    read_rec_json,
    train_bpe_tokenizer,
)

METHODS = ("dmpo-pairwise", "s_dpo", "dmpo", "napo", "dynamicpo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lastfm", action="store_true", help="multi-negative rows from --data (default: off)")
    p.add_argument(
        "--data", default="../shared/data/lastfm-cans20", help="LastFM folder (default: %(default)s)"
    )
    p.add_argument(
        "--method", default="dmpo-pairwise", choices=METHODS, help="--lastfm loss (default: %(default)s)"
    )
    p.add_argument(
        "--num-negatives", type=int, default=3, help="--lastfm rejected per prompt (default: %(default)s)"
    )
    p.add_argument(
        "--examples", type=int, default=None, help="training prompts (default: 32, 64 with --lastfm)"
    )
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="model width (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=0, help="model, negatives and shuffling (default: %(default)s)"
    )
    return p


def load_rows(args: argparse.Namespace) -> list[dict]:
    """Conversational TRL rows with a list of rejected completions each."""
    if args.lastfm:
        path = Path(args.data) / "train.json.gz"
        if not path.exists():
            sys.exit(f"--lastfm: {path} not found (pass the lastfm-cans20 folder with --data)")
        examples = read_rec_json(path, limit=args.examples or 64)
        return rec_to_trl(
            examples, num_negatives=args.num_negatives, template=LASTFM_TEMPLATE, seed=args.seed
        )
    world = generate_world(num_train=args.examples or 32, seed=args.seed)
    return rec_to_trl(
        world.train, num_negatives=1, template=SYNTHETIC_TEMPLATE, seed=args.seed, history=False
    )


def tokenizer_for(rows: list[dict]):
    texts = [r["prompt"][0]["content"] for r in rows] + [r["chosen"][0]["content"] for r in rows]
    tok = train_bpe_tokenizer(texts * 2 + ["<|user|>", "<|assistant|>"] * 10, vocab_size=1024)
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


class LossLog(TrainerCallback):
    """Each step's logged loss and wall time."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def _peak_rss_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> int | None:
    """Give freed heap back to the system and restart the peak-RSS counter; the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux)
    except OSError:
        return None
    return _peak_rss_kib()


def run(fused: bool, args: argparse.Namespace, base: torch.nn.Module, tok, rows: list[dict]) -> dict:
    multi = args.lastfm
    if fused:
        loss = {}
        if multi:
            method = "dmpo" if args.method == "dmpo-pairwise" else args.method
            loss = dict(
                loss_type=[method], dmpo_form="pairwise" if args.method == "dmpo-pairwise" else "paper"
            )
        data, batch, config_cls, trainer_cls = rows, args.batch_size, FusedDPOConfig, FusedDPOTrainer
    else:  # stock TRL takes one rejected completion per row: the expanded pairs
        data = [dict(r, rejected=x) for r in rows for x in r["rejected"]]
        batch, loss, config_cls, trainer_cls = (
            args.batch_size * len(rows[0]["rejected"]),
            {},
            DPOConfig,
            DPOTrainer,
        )
    for r in data:
        r.pop("history", None)
    config = config_cls(
        output_dir="runs/trl_dpo", per_device_train_batch_size=batch, max_steps=args.steps,
        learning_rate=args.lr, beta=0.1, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
        gradient_checkpointing=False, seed=args.seed, train_sampling_strategy="sequential", max_length=None,
        disable_tqdm=True, **loss,
    )  # fmt: skip
    log = LossLog()
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0
    )
    trainer = trainer_cls(copy.deepcopy(base), args=config, train_dataset=Dataset.from_list(data),
                          processing_class=tok, peft_config=lora, callbacks=[log])  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the table below shows the losses
    before = _reset_peak_rss()
    trainer.train()
    seconds = sum(
        log.seconds[1:]
    )  # after the first step: one-time set-up (imports, kernel choice) is not a step
    peak = _peak_rss_kib()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    memory = None if before is None or peak is None else (peak - before) * 1024
    return {"losses": log.losses, "weights": weights, "seconds": seconds, "memory": memory}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hf_logging.set_verbosity_error()
    rows = load_rows(args)
    tok = tokenizer_for(rows)
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    base = LlamaForCausalLM(config)  # a tiny Llama from a config: nothing is downloaded
    k = len(rows[0]["rejected"])
    what = "" if not args.lastfm else f", method {args.method}"
    print(
        f"{len(rows)} prompts, {k} rejected each{what}; "
        f"Llama H={args.hidden} x {args.layers} layers, V={len(tok)}"
    )
    fused = run(True, args, base, tok, rows)
    stock = run(False, args, base, tok, rows)
    comparable = not args.lastfm or args.method == "dmpo-pairwise"
    label = "stock TRL" if k == 1 else "stock TRL (expanded pairs)"
    print(f"{'step':>4s}  {label:>26s}  {'FusedDPOTrainer':>16s}  {'difference':>10s}")
    for i, (a, b) in enumerate(zip(stock["losses"], fused["losses"]), 1):
        print(f"{i:4d}  {a:26.6f}  {b:16.6f}  {abs(a - b):10.2e}")
    loss_diff = max(abs(a - b) for a, b in zip(stock["losses"], fused["losses"]))
    param_diff = max((stock["weights"][n] - fused["weights"][n]).abs().max().item() for n in stock["weights"])
    mem = (
        "-"
        if not stock["memory"] or not fused["memory"]
        else f"{stock['memory'] / fused['memory']:.2f}x ({stock['memory'] / 2**20:.0f} vs "
        f"{fused['memory'] / 2**20:.0f} MiB)"
    )
    note = "" if comparable else " (different losses: for scale only)"
    print(
        f"max loss difference {loss_diff:.2e}, max LoRA parameter difference {param_diff:.2e}{note}; "
        f"stock/fused time {stock['seconds'] / fused['seconds']:.2f}x ({stock['seconds']:.2f} vs "
        f"{fused['seconds']:.2f} s), peak memory {mem}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
