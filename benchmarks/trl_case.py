"""The ``trl`` case of ``python -m benchmarks``: one optimizer step of stock ``trl.DPOTrainer``
against :class:`napo_kernels.integrations.trl.FusedDPOTrainer` on the same batch.

A tiny Llama built from a config (4 layers, H = 512, V = 32000, fp32, sdpa attention), a separate
reference model (a frozen copy: its forward is part of the step), full fine-tuning with AdamW;
``B = 4`` prompts of 256 tokens, 16-token completions, a word-level tokenizer so that token counts
are exact. Gradient checkpointing is off for both (DPOConfig turns it on by default).

- ``K = 1``: stock TRL on the pairs (loss ``sigmoid``) vs the drop-in (the same loss).
- ``K = 3``: stock TRL on the 3 expanded pairs per prompt (12 sequence pairs) vs the drop-in with
  ``loss_type="dmpo"``, ``dmpo_form="pairwise"`` (the same loss: the mean of the pairwise DPO
  losses) on the 4 prompts with 3 rejected completions each.

A step is ``compute_loss`` (policy and reference forwards), ``backward``, ``optimizer.step`` and
``zero_grad``, after one warm-up step (AdamW's state exists). Time: the two contenders alternate,
one step each per round; the ratio is the median over rounds of the per-round ratio, robust to
load from other processes that drifts during the run (the medians of each are shown too).
Memory: peak extra allocation during one step, in a fresh process per contender (``torch.profiler``
allocator events, as the other cases; RSS growth beside it).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .measure import PROBE_MARK, _proc_status_kib, _profiled_peak_bytes, _reset_peak_rss, first_line

CONTENDERS = ("trl", "fused")
LABELS = {"trl": "stock trl.DPOTrainer", "fused": "FusedDPOTrainer (napo-kernels)"}


@dataclass(frozen=True)
class TrlShape:
    """One measured configuration of the trl case."""

    negatives: int = 1  # K rejected completions per prompt
    prompts: int = 4  # B
    prompt_len: int = 256  # tokens, BOS included
    completion_len: int = 16  # tokens, EOS included
    layers: int = 4
    hidden: int = 512
    vocab: int = 32000
    seed: int = 0

    def describe(self) -> str:
        return (
            f"K={self.negatives} B={self.prompts} prompt {self.prompt_len} + completions "
            f"{self.completion_len} tokens, Llama {self.layers} layers H={self.hidden} V={self.vocab}, "
            "fp32, full fine-tuning, reference model"
        )


def trl_shapes(quick: bool) -> list[TrlShape]:
    if quick:
        small = dict(prompts=2, prompt_len=24, completion_len=4, layers=1, hidden=32, vocab=512)
        return [TrlShape(negatives=1, **small), TrlShape(negatives=3, **small)]
    return [TrlShape(negatives=1), TrlShape(negatives=3)]


def _word_tokenizer(vocab: int):
    """Word ``w<i>`` is token ``i``: every word is exactly one token; BOS is prepended to prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {s: i for i, s in enumerate(special)}
    words.update({f"w{i}": i for i in range(len(special), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _rows(shape: TrlShape) -> list[dict]:
    """Standard-format rows: ``prompt_len - 1`` words (+ BOS), completions of ``completion_len - 1``
    words (+ EOS, which TRL appends)."""
    gen = torch.Generator().manual_seed(shape.seed)

    def words(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(4, shape.vocab, (n,), generator=gen))

    rows = []
    for _ in range(shape.prompts):
        prompt = words(shape.prompt_len - 1)
        chosen = " " + words(shape.completion_len - 1)
        rejected = [" " + words(shape.completion_len - 1) for _ in range(shape.negatives)]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _model(shape: TrlShape, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(shape.seed)
    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.hidden * 11 // 4,
        num_hidden_layers=shape.layers,
        num_attention_heads=max(1, shape.hidden // 64),
        num_key_value_heads=max(1, shape.hidden // 64),
        max_position_embeddings=2 * (shape.prompt_len + (1 + shape.negatives) * shape.completion_len),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg)


def prepare_step(contender: str, shape: TrlShape) -> tuple[Callable[[], float], Callable[[], dict]]:
    """Build the trainer for ``contender`` and return ``(step, params)``: ``step()`` runs one
    optimizer step on the batch and returns the loss; ``params()`` the current weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from napo_kernels.integrations.trl import FusedDPOConfig, FusedDPOTrainer

    tok = _word_tokenizer(shape.vocab)
    model = _model(shape, tok)
    rows = _rows(shape)
    common = dict(
        output_dir="runs/bench-trl", per_device_train_batch_size=shape.prompts * shape.negatives,
        learning_rate=1e-5, beta=0.1, report_to="none", save_strategy="no", bf16=False,
        gradient_checkpointing=False, max_length=None, seed=shape.seed,
    )  # fmt: skip
    if contender == "trl":  # the expanded pairs
        pairs = [
            {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": x} for r in rows for x in r["rejected"]
        ]
        trainer = DPOTrainer(
            model, ref_model=copy.deepcopy(model), args=DPOConfig(**common),
            train_dataset=Dataset.from_list(pairs), processing_class=tok,
        )  # fmt: skip
    elif contender == "fused":
        common["per_device_train_batch_size"] = shape.prompts
        extra = dict(loss_type="dmpo", dmpo_form="pairwise") if shape.negatives > 1 else {}
        data = rows if shape.negatives > 1 else [dict(r, rejected=r["rejected"][0]) for r in rows]
        trainer = FusedDPOTrainer(
            model, ref_model=copy.deepcopy(model), args=FusedDPOConfig(**common, **extra),
            train_dataset=Dataset.from_list(data), processing_class=tok,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown contender {contender!r}; choose from {CONTENDERS}")
    dataset = trainer.train_dataset
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    trainer.create_optimizer()
    optimizer = trainer.optimizer
    model = trainer.model
    model.train()

    def step() -> float:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def params() -> dict:
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    return step, params


def time_case(shape: TrlShape, repeats: int) -> dict[str, dict]:
    """Both contenders in this process, alternating one step each per round; the losses of the
    first step and the largest parameter difference after the warm-up step check they agree."""
    results: dict[str, dict] = {}
    steps, params = {}, {}
    for name in CONTENDERS:
        try:
            steps[name], get = prepare_step(name, shape)
            start = time.perf_counter()
            loss = steps[name]()
            results[name] = {
                "status": "ok",
                "warmup_s": time.perf_counter() - start,
                "loss": loss,
                "times_s": [],
            }
            params[name] = get()
        except Exception as exc:  # a broken contender is reported, the other still runs
            results[name] = {"status": "error", "reason": first_line(exc), "times_s": []}
        gc.collect()
    if len(params) == 2:
        diff = max((params["trl"][k] - params["fused"][k]).abs().max().item() for k in params["trl"])
        results["fused"]["param_diff_after_warmup"] = diff
    params.clear()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            results[name]["times_s"].append(time.perf_counter() - start)
    for r in results.values():
        r["median_s"] = statistics.median(r["times_s"]) if r["times_s"] else None
    return results


def probe_one(contender: str, shape: TrlShape) -> dict:
    """Peak extra memory of one step (after a warm-up step), in this process."""
    step, _ = prepare_step(contender, shape)
    _profiled_peak_bytes(step)  # warm-up under the profiler too: AdamW's state, lazy initialisation
    gc.collect()
    rss_ok = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    peak = _profiled_peak_bytes(step)
    hwm = _proc_status_kib("VmHWM")
    rss = (hwm - rss_before) * 1024 if rss_ok and hwm is not None and rss_before is not None else None
    return {"status": "ok", "peak_bytes": peak, "rss_bytes": rss}


def probe_memory(contender: str, shape: TrlShape, timeout_s: float = 900.0) -> dict:
    """:func:`probe_one` in a fresh process (``python -m benchmarks.trl_case``)."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    spec = json.dumps({"contender": contender, "shape": asdict(shape)})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.trl_case"],
            input=spec,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"memory probe timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"status": "error", "reason": f"memory probe exited with {proc.returncode}: {tail}"}


def run_case(quick: bool, repeats: int, memory: bool) -> list[dict]:
    """Every trl shape: timings, memory probes and ratios (stock / fused)."""
    out = []
    for shape in trl_shapes(quick):
        timed = time_case(shape, repeats)
        mem = {
            n: (probe_memory(n, shape) if memory and timed[n]["status"] == "ok" else {}) for n in CONTENDERS
        }
        rows = []
        for name in CONTENDERS:
            t, m = timed[name], mem[name]
            rows.append({"contender": name, "label": LABELS[name], **t, "peak_bytes": m.get("peak_bytes"),
                         "rss_bytes": m.get("rss_bytes"), "memory_reason": m.get("reason", "")})  # fmt: skip
        stock, fused = rows
        entry = {"shape": asdict(shape), "describe": shape.describe(), "rows": rows}
        paired = [a / b for a, b in zip(stock["times_s"], fused["times_s"]) if b > 0]
        entry["time_ratio"] = statistics.median(paired) if paired else None
        entry["time_ratio_of_medians"] = _ratio(stock.get("median_s"), fused.get("median_s"))
        entry["mem_ratio"] = _ratio(stock.get("peak_bytes"), fused.get("peak_bytes"))
        entry["rss_ratio"] = _ratio(stock.get("rss_bytes"), fused.get("rss_bytes"))
        out.append(entry)
        print(format_entry(entry))
        print()
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_entry(entry: dict) -> str:
    lines = [f"trl | {entry['describe']}", f"{'contender':34s} {'median ms':>10s} {'peak MiB':>9s} "
             f"{'RSS MiB':>8s} {'loss':>9s}"]  # fmt: skip
    for r in entry["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['label']:34s} {r['status']}: {r.get('reason', '')}")
            continue
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        rss = "-" if r["rss_bytes"] is None else f"{r['rss_bytes'] / 2**20:.0f}"
        lines.append(f"{r['label']:34s} {1e3 * r['median_s']:10.0f} {peak:>9s} {rss:>8s} {r['loss']:9.5f}")
    t, m = entry["time_ratio"], entry["mem_ratio"]
    diff = entry["rows"][1].get("param_diff_after_warmup")
    lines.append(
        f"stock / fused: time {'-' if t is None else f'{t:.2f}x'} (median of per-round ratios), "
        f"peak memory {'-' if m is None else f'{m:.2f}x'}"
        + ("" if diff is None else f"; largest parameter difference after one step {diff:.1e}")
    )
    return "\n".join(lines)


def main() -> int:
    """Child entry of the memory probe: a JSON job on stdin, one result line on stdout."""
    spec = json.loads(sys.stdin.read())
    try:
        out = probe_one(spec["contender"], TrlShape(**spec["shape"]))
    except Exception as exc:
        out = {"status": "error", "reason": first_line(exc)}
    print(PROBE_MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
