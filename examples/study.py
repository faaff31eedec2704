r"""Does the preference stage help? One SFT checkpoint, then from it every preference method and a
control that continues SFT for the same number of steps (same LoRA adapters, learning rate and
batches), each with several seeds; metrics as mean +- standard error across seeds, a table and a
plot. Only the validation split is read: search hyper-parameters here, not on a test split.

    .venv/bin/python examples/study.py                         # synthetic world, every arm, 3 seeds
    .venv/bin/python examples/study.py --arms control napo --seeds 5 --lr 3e-3
    .venv/bin/python examples/study.py --grid lr=3e-4,1e-3,3e-3 --grid beta=0.1,1 --arms control s_dpo napo
    .venv/bin/python examples/study.py --data ../shared/data/lastfm-cans20 --domain artist \
        --vocab-size 4096 --max-train 8000 --sft-epochs 1 --out runs/study-lastfm

What varies with the seed: the adapters' initialisation, the order of the batches and the sampled
negatives; the data, the tokenizer and the SFT checkpoint stay fixed (``--data-seed``), so the
standard error measures the training's spread. Each arm's gain over the control is given in
standard errors of the difference, ``(mean_a - mean_c) / sqrt(se_a^2 + se_c^2)``.

Reward accuracy is measured the same way for every arm, the control included: the reward of a
candidate is ``log pi(y|x) - log pi_sft(y|x)`` (sequence sums), and the accuracy is the share of
(true item, other candidate) pairs, over all candidates of each prompt, where the true item's
reward is higher (ties count one half; the SFT model itself scores 0.5). ``train`` uses a fixed
sample of training prompts, ``val`` the evaluated validation prompts.

``--grid KEY=V1,V2`` (repeatable) runs every combination of the listed values; each finished run is
cached under ``--out/runs`` (rerunning the command skips it), and ``--out/sweep.md`` lists every
configuration tried with its best arm's gain over the control, so the search keeps its size honest.
Keys: steps, lr, beta, k, tuning (lora, full), negatives (resample, fixed), reference (auto, none),
sft_epochs, sft_weight.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_recommender as recipe  # noqa: E402  (the SFT stage, the model and the Trainer arguments)

from napo_kernels import LossConfig  # noqa: E402
from napo_kernels.recommender.data import (  # noqa: E402
    ItemPopularity,
    RecExample,
    RecPreferenceDataset,
    RecPromptTemplate,
    generate_world,
    read_rec_json,
)
from napo_kernels.recommender.evaluation import (  # noqa: E402
    popularity_metrics,
    ranking_metrics,
    score_candidates,
)
from napo_kernels.recommender.trainer import PreferenceTrainer, RecommenderSFTTrainer  # noqa: E402

ARMS = ("control", "dpo", "s_dpo", "dmpo", "napo", "dynamicpo")
LABELS = {
    "sft": "SFT checkpoint",
    "control": "SFT continued (control)",
    "dpo": "DPO",
    "s_dpo": "S-DPO",
    "dmpo": "DMPO",
    "napo": "NAPO",
    "dynamicpo": "DynamicPO",
}
# (result key, column title) of the table; the first is the one the gain over the control is given for
COLUMNS = [
    ("rank/HR@1", "HR@1"),
    ("rank/NDCG@5", "NDCG@5"),
    ("rank/MRR", "MRR"),
    ("reward_acc/train", "train reward acc"),
    ("reward_acc/val", "val reward acc"),
    ("rank/pop/top1_percentile", "top-1 pop. pct"),
    ("rank/pop/long_tail_share", "long-tail share"),
]
TUNINGS, NEGATIVE_MODES, REFERENCES = ("lora", "full"), ("resample", "fixed"), ("auto", "none")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the preference stage (and the control) is trained with; ``--grid`` varies its fields."""

    steps: int = 200
    lr: float = 1e-3
    beta: float = 1.0
    k: int | None = None  # negatives per prompt; None: 1 for DPO, 5 for DynamicPO, 3 for the others
    tuning: str = "lora"
    negatives: str = "resample"
    reference: str = "auto"
    sft_epochs: float = 3.0
    sft_weight: float = 0.0  # add this times the positive's token NLL to the preference loss

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("tuning", self.tuning, TUNINGS),
            ("negatives", self.negatives, NEGATIVE_MODES),
            ("reference", self.reference, REFERENCES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}")
        if self.steps < 1 or self.k is not None and self.k < 1:
            raise ValueError(f"steps and k must be >= 1, got steps={self.steps}, k={self.k}")
        if not self.sft_weight >= 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if not (self.lr > 0 and self.beta > 0 and self.sft_epochs > 0):
            raise ValueError(
                f"lr, beta and sft_epochs must be > 0, got {self.lr}, {self.beta}, {self.sft_epochs}"
            )

    def fields(self) -> dict[str, Any]:
        """The fields that identify the recipe (``sft_weight`` only when set, so runs cached before
        it existed keep their keys)."""
        out = dataclasses.asdict(self)
        if out["sft_weight"] == 0.0:
            del out["sft_weight"]
        return out

    def negatives_of(self, arm: str) -> int:
        if arm == "control":
            return 0
        if LossConfig(method=arm).spec.single_negative:
            return 1
        return self.k if self.k is not None else recipe.DEFAULT_K.get(arm, 3)

    def name(self, base: Recipe) -> str:
        """The fields that differ from ``base`` (``"base"`` if none)."""
        diff = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(base, f.name)
        ]
        return " ".join(diff) or "base"


def _grid_value(key: str, text: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(Recipe)}[key]
    if "int" in kind:
        return None if text == "None" else int(text)
    return float(text) if "float" in kind else text


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    keys = {f.name for f in dataclasses.fields(Recipe)}
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, _, values = item.partition("=")
        if key not in keys or not values:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... with KEY one of {sorted(keys)}")
        try:
            grid[key] = [_grid_value(key, v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid {item!r}: a value is not a number") from None
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=recipe.HelpFormatter,
    )
    positive = recipe._number(int, 1)
    rate = recipe._number(float, 0.0, strict=True)
    data = p.add_argument_group("data and model (as examples/train_recommender.py)")
    recipe.add_data_options(data, max_eval=1000)
    data.add_argument(
        "--world-val", type=positive, default=1000, help="validation prompts of the synthetic world"
    )
    data.add_argument(
        "--data-seed", type=int, default=0, help="seed of the data sample, the tokenizer and the SFT model"
    )
    recipe.add_model_options(data)
    data.add_argument("--sft-lr", type=rate, default=2e-3, help="SFT learning rate (cosine schedule)")
    study = p.add_argument_group("the study")
    study.add_argument(
        "--arms", nargs="+", choices=ARMS, default=list(ARMS), help="what to train from the SFT checkpoint"
    )
    study.add_argument("--seeds", type=positive, default=3, help="seeds per arm (0, 1, ...)")
    study.add_argument("--steps", type=positive, default=Recipe.steps, help="optimizer steps of every arm")
    study.add_argument(
        "--lr", type=rate, default=Recipe.lr, help="learning rate of every arm (cosine schedule)"
    )
    study.add_argument("--beta", type=rate, default=Recipe.beta, help="the losses' beta")
    study.add_argument(
        "--k",
        type=positive,
        default=None,
        help="negatives per prompt (default: 1 DPO, 5 DynamicPO, 3 others)",
    )
    study.add_argument(
        "--tuning", choices=TUNINGS, default=Recipe.tuning, help="LoRA adapters or the whole model"
    )
    study.add_argument(
        "--negatives", choices=NEGATIVE_MODES, default=Recipe.negatives, help="resample each epoch or fixed"
    )
    study.add_argument(
        "--reference",
        choices=REFERENCES,
        default=Recipe.reference,
        help="auto: the SFT model; none: reference-free",
    )
    study.add_argument(
        "--sft-epochs", type=rate, default=Recipe.sft_epochs, help="epochs of the SFT checkpoint"
    )
    study.add_argument(
        "--sft-weight",
        type=recipe._number(float, 0.0),
        default=Recipe.sft_weight,
        help="add this times the positive's token NLL to every preference loss (0: none)",
    )
    study.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="also vary KEY (repeatable)"
    )
    study.add_argument("--lora-r", type=positive, default=16, help="LoRA rank (alpha = 2 r)")
    study.add_argument("--batch-size", type=positive, default=16, help="prompts per step")
    study.add_argument(
        "--curve-every",
        type=int,
        default=None,
        help="curve points every N steps (default: steps / 4; 0: none)",
    )
    study.add_argument(
        "--curve-prompts", type=positive, default=200, help="prompts per curve point and split"
    )
    study.add_argument(
        "--train-acc-prompts",
        type=positive,
        default=500,
        help="training prompts of the final train reward accuracy",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--jobs", type=positive, default=2, help="runs in parallel (one torch thread each when > 1)"
    )
    run.add_argument(
        "--out", default="runs/study", help="directory of the results, the cache, the table and the plots"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# -- data, SFT checkpoint and reference scores (built once, in the main process)


def load_data(args: argparse.Namespace) -> tuple[list[RecExample], list[RecExample]]:
    if args.data is None:
        world = generate_world(seed=args.data_seed, num_val=args.world_val)
        train, val = world.train, world.val
    else:
        d = Path(args.data)
        train_path = d / "train.json" if (d / "train.json").exists() else d / "train.json.gz"
        if not train_path.exists() or not (d / "val.json").exists():
            raise SystemExit(f"--data {d}: expected train.json (or train.json.gz) and val.json there")
        train, val = read_rec_json(train_path), read_rec_json(d / "val.json")
    g = torch.Generator().manual_seed(args.data_seed)
    if args.max_train is not None and args.max_train < len(train):
        train = [train[i] for i in torch.randperm(len(train), generator=g)[: args.max_train].tolist()]
    if args.max_eval < len(val):
        val = [val[i] for i in torch.randperm(len(val), generator=g)[: args.max_eval].tolist()]
    return train, val


def recipe_args(args: argparse.Namespace, r: Recipe, seed: int, **extra: Any) -> argparse.Namespace:
    """The options examples/train_recommender.py's helpers read."""
    argv = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab-size", str(args.vocab_size)]
    argv += ["--sft-epochs", str(r.sft_epochs), "--sft-lr", str(args.sft_lr), "--seed", str(seed)]
    argv += ["--batch-size", str(args.batch_size), "--pref-steps", str(r.steps), "--pref-lr", str(r.lr)]
    argv += ["--logging-steps", str(max(1, r.steps // 10)), "--threads", "0"] + (
        ["--quiet"] if args.quiet else []
    )
    ns = recipe.parse_args(argv)
    ns.main, ns.data, ns.domain = True, args.data, args.domain
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


def sft_checkpoint(
    args: argparse.Namespace, r: Recipe, train: list[RecExample], template: RecPromptTemplate
) -> Path:
    """The SFT checkpoint of ``r.sft_epochs`` (trained and saved under --out the first time)."""
    key = _digest({"data": _data_key(args), "sft_epochs": r.sft_epochs, "sft_lr": args.sft_lr})
    path = Path(args.out) / f"sft-{key}"
    if not (path / "config.json").exists():
        with tempfile.TemporaryDirectory(prefix="study-") as scratch:
            ns = recipe_args(args, r, args.data_seed, sft_checkpoint=str(path), scratch=scratch)
            print(f"training the SFT checkpoint ({r.sft_epochs:g} epochs) into {path}")
            recipe.sft_stage(train, template, ns)
    return path


def reference_scores(
    path: Path,
    args: argparse.Namespace,
    val: list[RecExample],
    train_sample: list[RecExample],
    template: RecPromptTemplate,
) -> dict[str, torch.Tensor]:
    """The SFT model's candidate scores on the evaluated and the sampled training prompts (cached)."""
    cache = path / "study_reference_scores.pt"
    if cache.exists():
        return torch.load(cache)
    model = LlamaForCausalLM.from_pretrained(path)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    scores = {
        split: score_candidates(model, tok, examples, template, batch_size=16, progress=not args.quiet)
        for split, examples in (("val", val), ("train", train_sample))
    }
    torch.save(scores, cache)
    return scores


# -- one run (a worker process)


def reward_accuracy(policy: torch.Tensor, ref: torch.Tensor, examples: list[RecExample]) -> float:
    """Share of (true item, other candidate) pairs whose reward ``policy - ref`` ranks the true item
    higher (ties one half), over every candidate of every prompt."""
    target = torch.tensor([e.target_index for e in examples])
    present = torch.isfinite(policy) & torch.isfinite(ref)
    reward = torch.where(present, policy - ref, 0.0).double()
    mine = reward.gather(1, target[:, None])
    wins = (mine > reward).double() + 0.5 * (mine == reward).double()
    present[torch.arange(len(examples)), target] = False
    return float((wins * present).sum() / present.sum())


def ranking_report(
    scores: torch.Tensor, examples: list[RecExample], popularity: ItemPopularity
) -> dict[str, float]:
    """Ranking metrics and the popularity of the top-1 (``evaluate_recommender`` without generation)."""
    target = torch.tensor([e.target_index for e in examples])
    res = {f"rank/{k}": v for k, v in ranking_metrics(scores, target).items()}
    top1 = [e.candidates[int(i)] for e, i in zip(examples, scores.argmax(1))]
    targets = [e.target for e in examples]
    return res | {f"rank/pop/{k}": v for k, v in popularity_metrics(top1, targets, popularity).items()}


class CurveCallback(TrainerCallback):
    """Every ``every`` steps (and before the first): validation HR@1 and reward accuracy on both splits."""

    def __init__(self, measure, every: int) -> None:
        self.measure, self.every, self.points = measure, every, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.points.append({"step": 0} | self.measure())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.points.append({"step": state.global_step} | self.measure())


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one arm with one seed from the SFT checkpoint; its metrics and curve."""
    args, r, arm, seed = job["args"], Recipe(**job["recipe"]), job["arm"], job["seed"]
    torch.set_num_threads(job["threads"])
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft/transformers
    template = RecPromptTemplate(domain=args.domain)
    train, val = load_data(args)
    train_sample = train[: args.train_acc_prompts]
    ref = torch.load(Path(job["sft"]) / "study_reference_scores.pt")
    tok = PreTrainedTokenizerFast.from_pretrained(job["sft"])
    model = LlamaForCausalLM.from_pretrained(job["sft"])
    torch.manual_seed(seed)
    if r.tuning == "lora":
        model = get_peft_model(model, recipe.lora_config(args.lora_r))
    k = r.negatives_of(arm)
    dataset = RecPreferenceDataset(train, template, num_negatives=k, mode=r.negatives, seed=seed)
    n = args.curve_prompts

    def measure() -> dict[str, float]:
        out = {}
        for split, examples in (("val", val[:n]), ("train", train_sample[:n])):
            s = score_candidates(model, tok, examples, template, batch_size=16, progress=False)
            out[f"reward_acc/{split}"] = reward_accuracy(s, ref[split][: len(examples)], examples)
            if split == "val":
                out["rank/HR@1"] = float(
                    (s.argmax(1) == torch.tensor([e.target_index for e in examples])).double().mean()
                )
        return out

    with tempfile.TemporaryDirectory(prefix="study-run-") as scratch:
        targs = recipe.training_args(
            scratch, recipe_args(args, r, seed, quiet=True), max_steps=r.steps, learning_rate=r.lr
        )
        if arm == "control":
            trainer = RecommenderSFTTrainer(model, targs, train_dataset=dataset, processing_class=tok)
        else:
            trainer = PreferenceTrainer(
                model,
                targs,
                method=arm,
                beta=r.beta,
                reference=r.reference,
                sft_weight=r.sft_weight,
                train_dataset=dataset,
                processing_class=tok,
            )
        every = args.curve_every if args.curve_every is not None else max(1, r.steps // 4)
        curve = CurveCallback(measure, every) if every > 0 else None
        if curve is not None:
            trainer.add_callback(curve)
        trainer.remove_callback(PrinterCallback)  # the logs go to the results, not the terminal
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    popularity = ItemPopularity.from_examples(train)
    scores = score_candidates(model, tok, val, template, batch_size=16, progress=False)
    res = ranking_report(scores, val, popularity)
    res["reward_acc/val"] = reward_accuracy(scores, ref["val"], val)
    s = score_candidates(model, tok, train_sample, template, batch_size=16, progress=False)
    res["reward_acc/train"] = reward_accuracy(s, ref["train"], train_sample)
    hits = scores.argmax(1) == torch.tensor([e.target_index for e in val])
    return {
        "setup": job["setup"],
        "recipe": job["recipe"],
        "arm": arm,
        "seed": seed,
        "K": k,
        "metrics": res,
        "val_hits": hits.int().tolist(),  # per prompt: the paired test against the control
        "curve": curve.points if curve is not None else [],
        "train_log": logs,
        "train_seconds": seconds,
    }


# -- aggregation, table and plots


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _data_key(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "data",
        "domain",
        "max_train",
        "max_eval",
        "world_val",
        "data_seed",
        "vocab_size",
        "hidden",
        "layers",
    )
    return {n: getattr(args, n) for n in names}


def setup_key(args: argparse.Namespace) -> str:
    """What every run of one study shares: the data, the model, the measurements."""
    keys = _data_key(args) | {"lora_r": args.lora_r, "batch_size": args.batch_size, "sft_lr": args.sft_lr}
    keys |= {
        "curve_every": args.curve_every,
        "curve_prompts": args.curve_prompts,
        "train_acc_prompts": args.train_acc_prompts,
    }
    return _digest(keys)


# what the control (SFT continued) depends on: recipes differing only in the preference loss share it
CONTROL_FIELDS = ("steps", "lr", "tuning", "sft_epochs")


def arm_fields(r: Recipe, arm: str) -> dict[str, Any]:
    fields = r.fields()
    return {k: fields[k] for k in CONTROL_FIELDS} if arm == "control" else fields


def run_key(args: argparse.Namespace, r: Recipe, arm: str, seed: int) -> str:
    return _digest({"setup": setup_key(args)} | arm_fields(r, arm) | {"arm": arm, "seed": seed})


def sweep_table(out: Path, setup: str) -> str:
    """Every configuration of this setup in the cache (whichever command trained it): its best arm's
    HR@1 gain over the control, so a search reports its whole size."""
    by_recipe: dict[str, list[dict]] = defaultdict(list)
    controls: dict[str, list[dict]] = defaultdict(list)
    for path in sorted((out / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        if run.get("setup") != setup:
            continue
        r = Recipe(**run["recipe"])
        if run["arm"] == "control":
            controls[json.dumps(arm_fields(r, "control"), sort_keys=True)].append(run)
        else:
            by_recipe[json.dumps(r.fields(), sort_keys=True)].append(run)
    for key in by_recipe:  # each configuration with the control it shares
        control_key = json.dumps(arm_fields(Recipe(**json.loads(key)), "control"), sort_keys=True)
        by_recipe[key] += controls[control_key]
    rows = [
        "| configuration | arms | seeds | best arm | its HR@1 gain over control | z seeds | z prompts |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {key: Recipe(**json.loads(key)).name(Recipe()) for key in by_recipe}
    for key in sorted(by_recipe, key=lambda k: (names[k] != "base", names[k])):
        runs = by_recipe[key]
        arms = sorted({r["arm"] for r in runs}, key=ARMS.index)
        seeds = min(sum(r["arm"] == a for r in runs) for a in arms)
        stats = summarise(runs, arms)
        gains = [(s["gain"], a) for a, s in stats.items() if "gain" in s]
        best = "| | | | "
        if gains:
            (g, z), arm = max(gains)
            best = f"| {LABELS[arm]} | {g:+.3f} | {_z(z)} | {_z(stats[arm]['paired'][1])} "
        rows.append(f"| {names[key]} | {len(arms)} | {seeds} {best}|")
    rows.append(f"\n{len(by_recipe)} configuration(s) tried on this setup.")
    return "\n".join(rows) + "\n"


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n); nan for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def paired_gain(arm_runs: list[dict], control_runs: list[dict]) -> tuple[float, float]:
    """HR@1 gain over the control and its z over the validation prompts: each prompt's hit rate
    (mean over seeds) minus the control's, the mean of those differences over its standard error.
    It adds the sampling of the prompts to the seeds' spread (nan if a run lacks per-prompt hits)."""
    if not all("val_hits" in r for r in arm_runs + control_runs):
        return math.nan, math.nan
    a = torch.tensor([r["val_hits"] for r in arm_runs], dtype=torch.float64).mean(0)
    c = torch.tensor([r["val_hits"] for r in control_runs], dtype=torch.float64).mean(0)
    d = a - c
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.nan
    gain = float(d.mean())
    return gain, gain / se if se > 0 else math.nan


def summarise(runs: list[dict], arms: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{arm: {metric: (mean, se)}}`` across seeds, and the HR@1 gain over the control with its z
    across seeds (``gain``: ``(mean_a - mean_c) / sqrt(se_a^2 + se_c^2)``) and over prompts
    (``paired``: :func:`paired_gain`)."""
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_arm[run["arm"]].append(run)
    out = {
        arm: {key: mean_se([r["metrics"][key] for r in by_arm[arm]]) for key, _ in COLUMNS}
        for arm in arms
        if by_arm[arm]
    }
    main = COLUMNS[0][0]
    if "control" in out:
        c, c_se = out["control"][main]
        for arm, stats in out.items():
            if arm != "control":
                m, se = stats[main]
                gain = m - c
                spread = math.sqrt(se**2 + c_se**2)
                stats["gain"] = (gain, gain / spread if spread > 0 else math.nan)
                stats["paired"] = paired_gain(by_arm[arm], by_arm["control"])
    return out


def _z(z: float) -> str:
    return "n/a" if math.isnan(z) else f"{z:+.1f}"


def _cell(mean: float, se: float) -> str:
    return f"{mean:.3f}" if math.isnan(se) else f"{mean:.3f} ± {se:.3f}"


def table(stats: dict, sft: dict[str, float], seeds: int) -> str:
    head = (
        "| arm | " + " | ".join(t for _, t in COLUMNS) + " | HR@1 gain over control | z seeds | z prompts |"
    )
    rows = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    rows.append(f"| {LABELS['sft']} | " + " | ".join(f"{sft[k]:.3f}" for k, _ in COLUMNS) + " | | | |")
    for arm, s in stats.items():
        g = "| | |"
        if "gain" in s:
            g = f"{s['gain'][0]:+.3f} | {_z(s['gain'][1])} | {_z(s['paired'][1])} |"
        rows.append(f"| {LABELS[arm]} | " + " | ".join(_cell(*s[k]) for k, _ in COLUMNS) + f" | {g}")
    rows.append(
        f"\nmean ± standard error over {seeds} seeds; the SFT checkpoint is one model (no spread). "
        "z seeds: the gain over the standard error of the difference across seeds; z prompts: over "
        "the standard error of the per-prompt differences (the sampling of the validation prompts)."
    )
    return "\n".join(rows)


def plot(path: Path, title: str, stats: dict, runs: list[dict], sft: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    arms = list(stats)
    ax = axes[0]
    means = [stats[a]["rank/HR@1"][0] for a in arms]
    errs = [0.0 if math.isnan(stats[a]["rank/HR@1"][1]) else stats[a]["rank/HR@1"][1] for a in arms]
    ax.bar(
        range(len(arms)), means, yerr=errs, capsize=4, color=["0.6" if a == "control" else "C0" for a in arms]
    )
    ax.axhline(sft["rank/HR@1"], color="k", ls="--", lw=1, label="SFT checkpoint")
    ax.set_xticks(
        range(len(arms)), [LABELS[a].replace(" (control)", "\n(control)") for a in arms], fontsize=8
    )
    lo = min(m - e for m, e in zip(means, errs))
    ax.set_ylim(max(0.0, min(lo, sft["rank/HR@1"]) - 0.03), None)
    ax.set_title("validation HR@1 (mean ± s.e.)")
    ax.legend(fontsize=8)
    for ax, key, name in zip(
        axes[1:],
        ("rank/HR@1", "reward_acc/val", "reward_acc/train"),
        ("validation HR@1", "validation reward accuracy", "training reward accuracy"),
    ):
        for i, arm in enumerate(arms):
            curves = [run["curve"] for run in runs if run["arm"] == arm and run["curve"]]
            if not curves:
                continue
            steps = [p["step"] for p in curves[0]]
            ms = [mean_se([c[j][key] for c in curves]) for j in range(len(steps))]
            m = [x for x, _ in ms]
            e = [0.0 if math.isnan(s) else s for _, s in ms]
            color = "0.4" if arm == "control" else f"C{i}"
            ax.plot(steps, m, marker="o", ms=3, color=color, label=LABELS[arm])
            ax.fill_between(
                steps, [a - b for a, b in zip(m, e)], [a + b for a, b in zip(m, e)], color=color, alpha=0.15
            )
        ax.set_xlabel("step")
        ax.set_title(f"{name} (curve sample)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        base = Recipe(
            args.steps,
            args.lr,
            args.beta,
            args.k,
            args.tuning,
            args.negatives,
            args.reference,
            args.sft_epochs,
            args.sft_weight,
        )
        grid = parse_grid(args.grid)
        recipes = [
            dataclasses.replace(base, **dict(zip(grid, values)))
            for values in itertools.product(*grid.values())
        ]
        for r in recipes:
            for arm in args.arms:
                r.negatives_of(arm)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    template = RecPromptTemplate(domain=args.domain)
    train, val = load_data(args)
    print(
        f"data: {len(train)} train / {len(val)} validation prompts; {len(recipes)} configuration(s) x "
        f"{len(args.arms)} arm(s) x {args.seeds} seed(s)"
    )
    torch.set_num_threads(os.cpu_count() or 1)
    checkpoints, sft_metrics = {}, {}
    for r in recipes:
        if r.sft_epochs in checkpoints:
            continue
        path = sft_checkpoint(args, r, train, template)
        ref = reference_scores(path, args, val, train[: args.train_acc_prompts], template)
        checkpoints[r.sft_epochs] = path
        m = ranking_report(ref["val"], val, ItemPopularity.from_examples(train))
        sft_metrics[r.sft_epochs] = m | {"reward_acc/val": 0.5, "reward_acc/train": 0.5}

    jobs, results = [], {}
    threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)
    for r in recipes:
        for arm in args.arms:
            for seed in range(args.seeds):
                key = run_key(args, r, arm, seed)
                cached = out / "runs" / f"{key}.json"
                if key in results or any(j["key"] == key for j in jobs):  # a control two recipes share
                    continue
                if cached.exists():
                    results[key] = json.loads(cached.read_text())
                else:
                    job = {
                        "args": args,
                        "recipe": r.fields(),
                        "arm": arm,
                        "seed": seed,
                        "sft": str(checkpoints[r.sft_epochs]),
                        "threads": threads,
                        "key": key,
                        "setup": setup_key(args),
                    }
                    jobs.append(job)
    if jobs:
        print(f"{len(jobs)} run(s) to train ({len(results)} cached), {args.jobs} at a time")
    t0 = time.time()
    bar = tqdm(total=len(jobs), desc="runs", disable=args.quiet)

    def done(job: dict, res: dict) -> None:
        (out / "runs" / f"{job['key']}.json").write_text(json.dumps(res))
        results[job["key"]] = res
        bar.update()

    if args.jobs == 1:
        for job in jobs:
            done(job, run_one(job))
    elif jobs:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for job, res in zip(jobs, pool.map(run_one, jobs)):
                done(job, res)
    bar.close()
    if jobs:
        print(f"trained {len(jobs)} run(s) in {time.time() - t0:.0f} s")

    report = {}
    for r in recipes:
        runs = [results[run_key(args, r, arm, s)] for arm in args.arms for s in range(args.seeds)]
        stats = summarise(runs, args.arms)
        name = r.name(Recipe())
        text = table(stats, sft_metrics[r.sft_epochs], args.seeds)
        print(f"\n## {name}: {r.fields()}\n\n{text}")
        slug = _digest(r.fields()) if name != "base" else "base"
        plot(
            out / f"study-{slug}.png",
            f"{name}: {r.fields()}",
            stats,
            runs,
            sft_metrics[r.sft_epochs],
        )
        report[name] = {
            "recipe": r.fields(),
            "stats": stats,
            "sft": sft_metrics[r.sft_epochs],
            "table": text,
            "plot": f"study-{slug}.png",
        }
    sweep = sweep_table(out, setup_key(args))
    (out / "sweep.md").write_text(sweep)
    (out / "tables.md").write_text("\n\n".join(f"## {n}\n\n{v['table']}" for n, v in report.items()) + "\n")
    (out / "study.json").write_text(
        json.dumps({"args": {k: v for k, v in vars(args).items()}, "report": report}, indent=1)
    )
    if len(recipes) > 1:
        print("\n" + sweep)
    print(f"\nwritten: {out / 'tables.md'}, {out / 'sweep.md'}, {out}/study-*.png, {out / 'study.json'}")
    return report


if __name__ == "__main__":
    main()
