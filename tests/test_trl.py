"""``FusedDPOTrainer`` (napo_kernels.integrations.trl) against stock ``trl.DPOTrainer``.

Tiny models built from configs and a BPE tokenizer trained here (nothing is downloaded), fp32, LoRA:

- parity, one rejected completion: the per-step loss, the logged reward and log-prob metrics and the
  LoRA weights after 5 optimizer steps equal stock TRL's within 1e-5, on a Llama (standard format)
  and a Qwen2 (conversational format, a chat template), with a reference model, with adapters
  disabled and with precomputed reference log-probs, for ``sigmoid``, ``ipo`` and
  ``["sigmoid", "sft"]``; every other TRL pairwise loss type for two steps;
- K = 3 rejected completions with ``loss_type="dmpo"``, ``dmpo_form="pairwise"`` (DMPO's released
  loss, with and without its SFT term) equals stock TRL on the 3 expanded pairs per prompt;
- the multi-negative methods on a variable number of rejected completions equal
  ``napo_kernels.preference_loss`` on scores from plain full-logits forwards, packed and separate;
- gradient accumulation with gradient checkpointing, bf16 autocast, reference-free rewards, NAPO's
  user embeddings from a ``history`` column and per-negative confidences, bad options.
"""

from __future__ import annotations

import copy
import math
import os

import pytest

pytest.importorskip("trl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)
from trl import DPOConfig, DPOTrainer  # noqa: E402

import napo_kernels as nk  # noqa: E402
from napo_kernels.integrations.trl import (  # noqa: E402
    PLAIN_CHAT_TEMPLATE,
    FusedDPOConfig,
    FusedDPOTrainer,
    rec_to_trl,
)
from napo_kernels.recommender.data import RecExample, train_bpe_tokenizer  # noqa: E402

SLOW = pytest.mark.slow
STEPS = 5
TOL = 1e-5
METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected", "num_tokens",
)  # fmt: skip
WORDS = ("velvet moons", "red green", "blue", "kaisha", "alpha beta", "gamma delta", "troubux", "sing")

TOK = train_bpe_tokenizer(
    [f"user {i} likes {w} and {v}" for i in range(10) for w in WORDS for v in WORDS[:3]]
    + ["<|user|>", "<|assistant|>"] * 20,
    vocab_size=320,
)
TOK.chat_template = PLAIN_CHAT_TEMPLATE


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    dims = dict(
        vocab_size=len(TOK), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=TOK.pad_token_id,
        bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
    )  # fmt: skip
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**dims))
    return Qwen2ForCausalLM(Qwen2Config(**dims))


MODELS = {"llama": tiny("llama"), "qwen2": tiny("qwen2")}


def _msg(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def rows(n: int, k: int | list[int], conversational: bool) -> list[dict]:
    """``n`` prompts; ``k`` rejected completions each (an int: TRL's single-rejected format when 1)."""
    out = []
    for i in range(n):
        ki = k[i % len(k)] if isinstance(k, list) else k
        prompt = f"user {i} likes {WORDS[i % 8]} and {WORDS[(3 * i) % 8]}"
        chosen = " " + WORDS[i % 8] + " sing" * (i % 2)
        rejected = [" " + WORDS[(i + j + 1) % 8] + " blue" * j for j in range(ki)]
        if conversational:
            prompt, chosen = _msg("user", prompt), _msg("assistant", chosen.strip())
            rejected = [_msg("assistant", r.strip()) for r in rejected]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected[0] if k == 1 else rejected})
    return out


def expanded(multi: list[dict]) -> list[dict]:
    return [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": x} for r in multi for x in r["rejected"]
    ]


class _Logs(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append(dict(logs))


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def make(fused: bool, kind: str, reference: str, data: list[dict], batch: int, steps: int = STEPS, **config):
    """A LoRA trainer on a fresh copy of the tiny model; ``reference``: 'model' (a frozen copy),
    'adapters' (adapters disabled), 'precompute' (precomputed with adapters disabled) or 'none'."""
    logs = _Logs()
    args = (FusedDPOConfig if fused else DPOConfig)(
        output_dir="runs/test-trl", per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-3,
        logging_steps=1, report_to="none", save_strategy="no", beta=0.5, seed=0,
        bf16=config.pop("bf16", False), gradient_checkpointing=config.pop("gradient_checkpointing", False),
        precompute_ref_log_probs=reference == "precompute", **config,
    )  # fmt: skip
    base = MODELS[kind]
    ref = copy.deepcopy(base) if reference == "model" else None
    trainer = (FusedDPOTrainer if fused else DPOTrainer)(
        copy.deepcopy(base), ref_model=ref, args=args, train_dataset=Dataset.from_list(data),
        processing_class=TOK, peft_config=lora(), callbacks=[logs],
    )  # fmt: skip
    return trainer, logs


def train(fused: bool, kind: str, reference: str, data: list[dict], batch: int, steps: int = STEPS, **config):
    trainer, logs = make(fused, kind, reference, data, batch, steps, **config)
    trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    return logs.steps, weights


def assert_same_run(stock, fused, steps: int = STEPS, tol: float = TOL, metrics=METRICS) -> None:
    (stock_logs, stock_w), (fused_logs, fused_w) = stock, fused
    assert len(stock_logs) == len(fused_logs) == steps
    for step, (a, b) in enumerate(zip(stock_logs, fused_logs)):
        for key in metrics:
            assert key in b, f"step {step}: {key} not logged"
            if (
                key == "rewards/accuracies"
                and max(abs(a["rewards/chosen"]), abs(a["rewards/rejected"])) < tol
            ):
                continue  # policy = reference (LoRA B = 0): every reward is rounding noise, ties flip
            assert math.isclose(a[key], b[key], rel_tol=tol, abs_tol=tol), (
                f"step {step} {key}: {a[key]} vs {b[key]}"
            )
    assert stock_w.keys() == fused_w.keys() and stock_w
    worst = max((stock_w[n] - fused_w[n]).abs().max().item() for n in stock_w)
    assert worst <= tol, f"LoRA weights differ by {worst:.2e}"
    moved = max((fused_w[n] - 0).abs().max().item() for n in fused_w if "lora_B" in n)
    assert moved > 1e-3, "the LoRA weights did not train"


CASES = [
    (kind, ref, loss)
    for kind in ("llama", "qwen2")
    for ref in ("model", "adapters", "precompute")
    for loss in ("sigmoid", "ipo", "sigmoid+sft")
]
FAST = {
    ("llama", "model", "sigmoid"),
    ("llama", "adapters", "sigmoid"),
    ("llama", "precompute", "sigmoid"),
    ("qwen2", "adapters", "sigmoid"),
    ("llama", "adapters", "ipo"),
    ("qwen2", "precompute", "sigmoid+sft"),
}


@pytest.mark.parametrize(
    "kind, reference, loss", [c if c in FAST else pytest.param(*c, marks=SLOW) for c in CASES]
)
def test_one_rejected_equals_stock_trl(kind: str, reference: str, loss: str) -> None:
    data = rows(8, 1, conversational=kind == "qwen2")
    loss_type = loss.split("+")
    stock = train(False, kind, reference, data, 4, loss_type=loss_type)
    fused = train(True, kind, reference, data, 4, loss_type=loss_type)
    assert_same_run(stock, fused)


OTHER_LOSSES = {
    "hinge": {}, "robust": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 1e-3}, "nca_pair": {},
    "bco_pair": {}, "sppo_hard": {}, "aot": {"label_smoothing": 0.1}, "aot_unpaired": {}, "apo_zero": {},
    "apo_down": {}, "discopop": {}, "sigmoid_norm": {},
}  # fmt: skip


@pytest.mark.parametrize(
    "loss", [x if x in ("hinge", "robust") else pytest.param(x, marks=SLOW) for x in OTHER_LOSSES]
)
def test_other_trl_loss_types_equal_stock_trl(loss: str) -> None:
    data = rows(8, 1, conversational=False)
    opts = dict(loss_type=[loss], **OTHER_LOSSES[loss])
    stock = train(False, "llama", "model", data, 4, steps=2, **opts)
    fused = train(True, "llama", "model", data, 4, steps=2, **opts)
    assert_same_run(stock, fused, steps=2)


@pytest.mark.parametrize("sft", [False, pytest.param(True, marks=SLOW)])
def test_dmpo_pairwise_equals_stock_trl_on_expanded_pairs(sft: bool) -> None:
    multi = rows(4, 3, conversational=True)
    extra = dict(loss_type=["sft"], loss_weights=[1.0, 0.5]) if sft else dict(loss_type=[])
    types, weights = extra["loss_type"], extra.get("loss_weights")
    stock = train(
        False, "llama", "adapters", expanded(multi), 12, loss_type=["sigmoid", *types], loss_weights=weights
    )
    fused = train(
        True,
        "llama",
        "adapters",
        multi,
        4,
        loss_type=["dmpo", *types],
        loss_weights=weights,
        dmpo_form="pairwise",
    )
    assert_same_run(stock, fused, metrics=METRICS[:-1])  # num_tokens: the expanded pairs repeat the prompt


def test_gradient_accumulation_and_checkpointing_equal_stock_trl() -> None:
    data = rows(8, 1, conversational=False)
    opts = dict(gradient_accumulation_steps=2, gradient_checkpointing=True)
    stock = train(False, "llama", "adapters", data, 2, steps=3, **opts)
    fused = train(True, "llama", "adapters", data, 2, steps=3, **opts)
    assert_same_run(stock, fused, steps=3)


def test_bf16_autocast_close_to_stock_trl() -> None:
    data = rows(8, 1, conversational=False)
    stock = train(False, "llama", "adapters", data, 4, steps=2, bf16=True, use_cpu=True)
    fused = train(True, "llama", "adapters", data, 4, steps=2, bf16=True, use_cpu=True)
    for a, b in zip(stock[0], fused[0]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=3e-2, abs_tol=3e-2)
        assert math.isclose(a["logps/chosen"], b["logps/chosen"], rel_tol=3e-2)


# ------------------------------------------------------------------ the multi-negative methods


def full_logits_scores(
    model: torch.nn.Module, prompt: list[int], completions: list[list[int]]
) -> torch.Tensor:
    """Summed completion log-probs from one plain forward per ``prompt + completion`` (full logits)."""
    out = []
    for c in completions:
        ids = torch.tensor([prompt + c])
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:]
        out.append(logp.gather(1, target[:, None])[len(prompt) - 1 :].sum())
    return torch.stack(out)


def _first_batch(trainer: FusedDPOTrainer) -> dict:
    ds = trainer.train_dataset
    return trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(len(ds))]))


@pytest.mark.parametrize(
    "method, options",
    [
        ("napo", {}),
        ("napo", {"sharing": "own", "detach_negatives": "all"}),
        ("s_dpo", {"gamma": 0.2}),
        ("dmpo", {}),
        ("dynamicpo", {}),
    ],
)
@pytest.mark.parametrize("layout", ["packed", "separate"])
def test_multi_negative_methods_equal_preference_loss(method: str, options: dict, layout: str) -> None:
    data = rows(5, [1, 3, 2], conversational=False)  # a variable number of rejected completions
    trainer, _ = make(True, "llama", "model", data, 5, loss_type=[method], layout=layout, **options)
    assert trainer.data_collator.layout == layout
    batch = _first_batch(trainer)
    model = trainer.model
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    ds = trainer.train_dataset
    k = max(len(r) for r in ds["rejected_ids"])
    policy, ref = torch.zeros(len(ds), 1 + k), torch.zeros(len(ds), 1 + k)
    mask = torch.zeros(len(ds), 1 + k, dtype=torch.bool)
    with torch.no_grad():
        for i, ex in enumerate(ds):
            comps = [ex["chosen_ids"], *ex["rejected_ids"]]
            policy[i, : len(comps)] = full_logits_scores(model, ex["prompt_ids"], comps)
            ref[i, : len(comps)] = full_logits_scores(trainer.ref_model, ex["prompt_ids"], comps)
            mask[i, : len(comps)] = True
    margin = {"margin_state": nk.DynamicMargin()} if method == "napo" else {}
    want = nk.preference_loss(
        policy[:, 0], policy[:, 1:], mask[:, 1:], ref[:, 0], ref[:, 1:], method=method, beta=0.5, **options,
        **margin,
    )  # fmt: skip
    torch.testing.assert_close(loss, want, atol=2e-5, rtol=2e-5)
    logged = {key: v[-1] for key, v in trainer._metrics["train" if model.training else "eval"].items()}
    assert "pool/size" in logged and "rewards/accuracies" in logged
    pairs = int(mask[:, 1:].sum())
    torch.testing.assert_close(
        logged["logps/rejected"], float(policy[:, 1:][mask[:, 1:]].sum()) / pairs, rtol=1e-5, atol=1e-4
    )


def test_reference_free_rewards_are_policy_log_probs() -> None:
    data = rows(4, 1, conversational=False)
    trainer, _ = make(True, "llama", "none", data, 4, reference_free=True)
    assert trainer.ref_model is None
    batch = _first_batch(trainer)
    with torch.no_grad():
        loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    want = -F.logsigmoid(0.5 * (out["chosen_logps"] - out["rejected_logps"][:, 0])).mean()
    torch.testing.assert_close(loss, want)


def test_napo_user_embeddings_from_history_and_confidence() -> None:
    data = rows(6, 2, conversational=True)
    for i, r in enumerate(data):
        r["history"] = [WORDS[(i + j) % 8] for j in range(3)]
        r["confidence"] = [0.2, 0.9]
    trainer, logs = make(True, "llama", "adapters", data, 6, steps=2, loss_type=["napo"], rho=0.5)
    trainer.train()
    # similarity sharing: own prompt + floor(0.5 * 5) others, 2 negatives each
    assert logs.steps[-1]["pool/size"] == pytest.approx((1 + math.floor(0.5 * 5 + 1e-9)) * 2)
    assert "margin/gamma" in logs.steps[-1]
    assert int(trainer.criterion.margin.steps) == 2  # the EMA moved on each training step


def test_config_parses_from_the_command_line() -> None:
    from transformers import HfArgumentParser

    argv = [
        "--output_dir",
        "runs/x",
        "--loss_type",
        "napo",
        "sft",
        "--loss_weights",
        "1",
        "0.5",
        "--gamma0",
        "0.5",
    ]
    (args,) = HfArgumentParser(FusedDPOConfig).parse_args_into_dataclasses(
        [*argv, "--sharing", "all", "--bf16", "False"]
    )
    assert args.loss_type == ["napo", "sft"] and args.loss_weights == [1.0, 0.5]
    assert (args.gamma0, args.sharing, args.layout, args.dmpo_form) == (0.5, "all", "auto", "paper")


def test_bad_options_raise() -> None:
    data = rows(4, 1, conversational=False)
    with pytest.raises(ValueError, match="unknown"):
        FusedDPOConfig(output_dir="runs/x", loss_type=["softmax"], bf16=False)
    with pytest.raises(ValueError, match="at most one"):
        FusedDPOConfig(output_dir="runs/x", loss_type=["napo", "s_dpo"], bf16=False)
    with pytest.raises(ValueError, match="configure this package"):
        FusedDPOConfig(output_dir="runs/x", loss_type=["sigmoid"], gamma0=1.0, bf16=False)
    with pytest.raises(ValueError, match="gamma0"):
        FusedDPOConfig(output_dir="runs/x", loss_type=["dmpo"], gamma0=1.0, bf16=False)
    with pytest.raises(ValueError, match="use_weighting"):
        make(True, "llama", "adapters", data, 4, use_weighting=True)
    with pytest.raises(ValueError, match="reference_free"):
        make(True, "llama", "model", data, 4, reference_free=True)


def test_rec_to_trl_rows() -> None:
    ex = RecExample(history=("a", "b"), candidates=("x", "y", "z", "w"), target="y")
    conv = rec_to_trl([ex, ex], num_negatives=2, seed=3)
    assert conv[0]["chosen"] == [{"role": "assistant", "content": "y"}]
    assert len(conv[0]["rejected"]) == 2 and all(r[0]["content"] in "xzw" for r in conv[0]["rejected"])
    assert conv[0]["history"] == ["a", "b"] and conv[0]["prompt"][0]["role"] == "user"
    assert conv == rec_to_trl([ex, ex], num_negatives=2, seed=3)  # fixed, seeded negatives
    plain = rec_to_trl([ex], num_negatives=5, conversational=False, history=False)
    assert (
        isinstance(plain[0]["prompt"], str) and len(plain[0]["rejected"]) == 3 and "history" not in plain[0]
    )


# ------------------------------------------------------------------ DDP: the pool spans the ranks

WORLD = 2
DDP_STEPS = 2


def _ddp_train(tok_dir: str, out_dir: str, world: int, share: bool) -> dict:
    from peft import get_peft_model
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    torch.manual_seed(0)
    base = copy.deepcopy(MODELS["llama"]).double()
    # init_lora_weights=False: the policy differs from its reference from the first step
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    args = FusedDPOConfig(
        output_dir=out_dir, per_device_train_batch_size=4 // world, max_steps=DDP_STEPS,
        train_sampling_strategy="sequential", optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        gradient_checkpointing=False, loss_type=["napo"], beta=0.5, share_across_ranks=share,
    )  # fmt: skip
    trainer = FusedDPOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(rows(4 * DDP_STEPS, [2, 3], False)),
        processing_class=tok,
    )
    trainer.train()
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "ema": float(trainer.criterion.margin.ema),
        "wrapped": type(trainer.model_wrapped).__name__,
    }


def _ddp_worker(rank: int, world: int, port: int, tok_dir: str, out_dir: str) -> None:
    import datetime
    import traceback

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = {
            share: _ddp_train(tok_dir, os.path.join(out_dir, f"r{rank}"), world, share)
            for share in (True, False)
        }
    except BaseException:
        results = {"crash": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@SLOW
def test_ddp_pool_spans_the_ranks(tmp_path) -> None:
    """2 gloo ranks with 2 prompts each train like one process with the 4 prompts: NAPO's pool, margin
    EMA, logged metrics and the LoRA weights after 2 SGD steps (fp64); without sharing, each pool
    holds its rank's negatives only."""
    from spawn_ranks import free_port, run_ranks

    tok_dir = str(tmp_path / "tokenizer")
    TOK.save_pretrained(tok_dir)
    ranks = run_ranks(
        _ddp_worker, WORLD, (WORLD, free_port(), tok_dir, str(tmp_path)), tmp_path, 180, "2 ranks"
    )
    single = _ddp_train(tok_dir, str(tmp_path / "single"), 1, True)
    for res in ranks:
        got = res[True]
        assert got["wrapped"] == "DistributedDataParallel"
        for name, w in single["weights"].items():
            torch.testing.assert_close(got["weights"][name], w, atol=1e-9, rtol=1e-9)
        assert got["ema"] == pytest.approx(single["ema"], rel=1e-9)
        for a, b in zip(got["logs"], single["logs"]):
            for key in (
                "loss",
                "pool/size",
                "margin/gamma",
                "rewards/chosen",
                "rewards/accuracies",
                "num_tokens",
            ):
                assert a[key] == pytest.approx(b[key], rel=1e-6), key
        local = res[False]["logs"][0]["pool/size"]
        assert local < got["logs"][0]["pool/size"] == single["logs"][0]["pool/size"]


# ------------------------------------------------------------------ python -m benchmarks --case trl


def test_trl_benchmark_bars() -> None:
    from benchmarks.bars import judge

    def entry(k: int, stock_s: list[float], fused_s: list[float], stock_mb: float, fused_mb: float) -> dict:
        rows = [
            {"median_s": sorted(t)[len(t) // 2], "peak_bytes": mb * 2**20}
            for t, mb in ((stock_s, stock_mb), (fused_s, fused_mb))
        ]
        paired = sorted(a / b for a, b in zip(stock_s, fused_s))
        return {"shape": {"negatives": k}, "rows": rows, "time_ratio": paired[len(paired) // 2]}

    bars = judge(
        [], None, [entry(1, [4.0, 8.0, 6.0], [1.0, 4.0, 2.0], 2600, 270), entry(3, [9.0], [3.0], 1, 1)]
    )
    verdict = {b.name: (b.measured, b.passed) for b in bars}
    assert verdict["trl K=1: stock TRL / fused time"] == (3.0, True)  # the paired ratio, not 6 / 2
    assert verdict["trl K=1: stock TRL / fused peak memory"][1] is True
    assert verdict["trl K=3: stock TRL (expanded pairs) / fused time"] == (3.0, False)  # bar: 4x
    assert len(bars) == 3  # no memory bar for K = 3


@SLOW
def test_trl_benchmark_case_runs_quick() -> None:
    from benchmarks.trl_case import run_case

    for entry in run_case(quick=True, repeats=1, memory=False):
        stock, fused = entry["rows"]
        assert stock["status"] == fused["status"] == "ok"
        assert stock["loss"] == pytest.approx(fused["loss"], abs=1e-6)
        assert fused["param_diff_after_warmup"] < 1e-5
