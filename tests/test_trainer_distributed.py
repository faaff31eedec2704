"""The trainers under data parallelism: 2 ``gloo`` processes on 127.0.0.1, set up the way
``torchrun`` sets them up (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...: the Trainer and accelerate
create the group and wrap the model in DDP), against one process holding the concatenated batch.

Each rank trains a tiny float64 Llama with LoRA adapters for two optimizer steps on 3 prompts per
step (sequential sampling: the ranks' batches concatenated are the single process's 6-prompt
batches). Asserted, within 1e-9:

- preference stage (NAPO, similarity sharing across ranks): every step's averaged LoRA gradients,
  the LoRA weights after the steps (plain SGD, so weights follow gradients linearly), the logged
  loss, gradient norm and metrics (pool size included) and the margin EMA equal the single
  process's, identically on both ranks;
- the same with gradient accumulation (2 micro-batches per optimizer step), and evaluation: the
  eval loss and metrics equal the single process's (no rank counted twice, the EMA untouched);
- ``share_across_ranks=False``: the ranks still agree (DDP averages), but each pool holds the rank's
  own negatives only: smaller than the global one, and the gradients differ from the single process;
- SFT stage (full fine-tuning, ``lm_head`` included): the averaged gradients equal the single
  process's token-mean NLL gradients.

Plus, single-process: ``candidate_rows(..., through=wrapper)`` (how the trainers reach DDP) gives the
body call's rows and gradients.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from spawn_ranks import free_port, run_ranks
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
)

from napo_kernels.recommender.data import RecPreferenceDataset, generate_world, train_bpe_tokenizer
from napo_kernels.recommender.packing import LAYOUTS, candidate_rows, layout_candidates
from napo_kernels.recommender.trainer import PreferenceTrainer, RecommenderSFTTrainer

# the `runs` fixture trains in 2 spawned gloo ranks (about 40 s on 2 cores)
SPAWNS = pytest.mark.slow
WORLD_SIZE = 2
GLOBAL_BATCH = 6
STEPS = 2
SPAWN_TIMEOUT_S = 120
TOL = dict(atol=1e-9, rtol=1e-9)
LOG_REL = 1e-6  # the Trainer accumulates the logged loss in float32
LOGGED = ("loss", "grad_norm", "pool/size", "margin/gamma", "rewards/accuracies", "rewards/margins")


def _world():
    return generate_world(num_items=40, num_genres=3, genre_words=3, common_words=10, num_candidates=6,
                          min_history=2, max_history=4, num_train=GLOBAL_BATCH * STEPS, num_val=2, num_test=2,
                          seed=7)  # fmt: skip


def _llama(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
    return LlamaForCausalLM(cfg).double()


def _lora(tok) -> torch.nn.Module:
    # init_lora_weights=False: non-zero B, so the policy differs from the reference from step 0
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    return get_peft_model(_llama(tok), lora)


class _Record(TrainerCallback):
    """The trainable parameters' gradients just before each optimizer step (after DDP's averaging)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainable = (item for item in self.model.named_parameters() if item[1].requires_grad)
        self.grads.append({n: p.grad.detach().clone() for n, p in trainable})


def _args(out_dir: str, world: int, **kw) -> TrainingArguments:
    base = dict(
        output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // world,
        per_device_eval_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
        train_sampling_strategy="sequential", optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    return TrainingArguments(**(base | kw))


def _train(tok_dir: str, out_dir: str, world: int) -> dict:
    """Both stages on this process's share of the global batches; what the test compares."""
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    data = _world().train
    results = {}
    runs = [("napo", True, {}), ("napo_local", False, {}),
            # all 12 prompts in one optimizer step: DDP skips the sync on the first micro-batch
            ("napo_accum", True, dict(gradient_accumulation_steps=STEPS, max_steps=1))]  # fmt: skip
    for name, share, options in runs:
        model = _lora(tok)
        ds = RecPreferenceDataset(data, num_negatives=2, seed=3)
        trainer = PreferenceTrainer(model, _args(out_dir, world, **options), method="napo",
                                    share_across_ranks=share, train_dataset=ds, processing_class=tok,
                                    backend="torch")  # fmt: skip
        record = _Record(model)
        trainer.add_callback(record)
        trainer.train()
        ema = float(trainer.criterion.margin.ema)
        evaluation = trainer.evaluate(RecPreferenceDataset(data[:GLOBAL_BATCH], num_negatives=2, seed=4))
        assert float(trainer.criterion.margin.ema) == ema  # evaluation leaves the EMA alone
        results[name] = dict(
            grads=record.grads,
            weights={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            logs=[h for h in trainer.state.log_history if "loss" in h],
            ema=ema,
            eval=evaluation,
            shares=trainer.criterion.process_group is not None,
            wrapped=type(trainer.model_wrapped).__name__,
        )
    model = _llama(tok)  # full fine-tuning: lm_head and embeddings train too
    ds = RecPreferenceDataset(data, num_negatives=0)
    trainer = RecommenderSFTTrainer(model, _args(out_dir, world), train_dataset=ds, processing_class=tok,
                                    backend="torch")  # fmt: skip
    record = _Record(model)
    trainer.add_callback(record)
    trainer.train()
    results["sft"] = dict(grads=record.grads, logs=[h for h in trainer.state.log_history if "loss" in h])
    return results


def _worker(rank: int, world: int, port: int, tok_dir: str, out_dir: str) -> None:
    # what torchrun exports; the Trainer (accelerate) then joins a gloo group on loopback
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = _train(tok_dir, os.path.join(out_dir, f"rank{rank}"), world)
    except BaseException:
        results = {"crash": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer_ddp")
    data = _world()
    texts = [f"{' '.join(e.history)} | {' '.join(e.candidates)}" for e in data.train] + data.items
    tok_dir = str(tmp / "tokenizer")
    train_bpe_tokenizer(texts * 3, vocab_size=320).save_pretrained(tok_dir)  # one vocabulary for all

    t0 = time.perf_counter()
    args = (WORLD_SIZE, free_port(), tok_dir, str(tmp))
    ranks = run_ranks(_worker, WORLD_SIZE, args, tmp, SPAWN_TIMEOUT_S, f"{WORLD_SIZE}-process training")
    t1 = time.perf_counter()
    single = _train(tok_dir, str(tmp / "single"), world=1)
    pools = {name: ranks[0][name]["logs"][0]["pool/size"] for name in ("napo", "napo_local")}
    print(f"\n{WORLD_SIZE} ranks {t1 - t0:.1f} s, 1 process {time.perf_counter() - t1:.1f} s; pool/size at "
          f"step 1: shared {pools['napo']}, local {pools['napo_local']}, "
          f"single {single['napo']['logs'][0]['pool/size']}")  # fmt: skip
    return ranks, single


def _same(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


@SPAWNS
def test_ddp_is_used_and_sharing_is_automatic(runs):
    ranks, single = runs
    for res in ranks:
        assert res["napo"]["wrapped"] == "DistributedDataParallel"
        assert res["napo"]["shares"] and not res["napo_local"]["shares"]
    assert not single["napo"]["shares"]  # single process: no group


@SPAWNS
def test_preference_steps_match_one_process_over_the_global_batch(runs):
    ranks, single = runs
    want = single["napo"]
    for res in ranks:
        got = res["napo"]
        assert len(got["grads"]) == len(want["grads"]) == STEPS
        for step in range(STEPS):
            _same(got["grads"][step], want["grads"][step], **TOL)
        _same(got["weights"], want["weights"], **TOL)
        assert got["ema"] == pytest.approx(want["ema"], rel=1e-9, abs=1e-12) and want["ema"] != 0.0
        for mine, theirs in zip(got["logs"], want["logs"], strict=True):
            for key in LOGGED:
                assert mine[key] == pytest.approx(theirs[key], rel=LOG_REL, abs=1e-9), key
        for key in ("eval_loss", "eval_pool/size", "eval_rewards/accuracies", "eval_rewards/margins"):
            assert got["eval"][key] == pytest.approx(want["eval"][key], rel=1e-9, abs=1e-12), key
    # the weights moved, identically on both ranks (bitwise: DDP's all-reduce gives every rank one result)
    first = ranks[0]["napo"]["weights"]
    _same(first, ranks[1]["napo"]["weights"], atol=0, rtol=0)
    assert any(float(g.abs().max()) > 1e-4 for g in want["grads"][0].values())


@SPAWNS
def test_gradient_accumulation_matches_one_process(runs):
    ranks, single = runs
    want = single["napo_accum"]
    for res in ranks:
        got = res["napo_accum"]
        assert len(got["grads"]) == len(want["grads"]) == 1
        _same(got["grads"][0], want["grads"][0], **TOL)
        _same(got["weights"], want["weights"], **TOL)
        assert got["ema"] == pytest.approx(want["ema"], rel=1e-9)


@SPAWNS
def test_local_pools_are_smaller_but_ranks_still_agree(runs):
    ranks, single = runs
    _same(ranks[0]["napo_local"]["weights"], ranks[1]["napo_local"]["weights"], atol=0, rtol=0)
    local = ranks[0]["napo_local"]["logs"][0]["pool/size"]
    assert local < ranks[0]["napo"]["logs"][0]["pool/size"] == single["napo"]["logs"][0]["pool/size"]
    diff = max(
        float((ranks[0]["napo_local"]["grads"][0][n] - single["napo"]["grads"][0][n]).abs().max())
        for n in single["napo"]["grads"][0]
    )
    assert diff > 1e-6  # a per-rank pool is a different loss


@SPAWNS
def test_sft_gradients_match_one_process(runs):
    ranks, single = runs
    for res in ranks:
        for step in range(STEPS):
            _same(res["sft"]["grads"][step], single["sft"]["grads"][step], **TOL)
        for mine, theirs in zip(res["sft"]["logs"], single["sft"]["logs"], strict=True):
            for key in ("loss", "grad_norm", "sft/nll_per_token", "sft/answer_tokens"):
                assert mine[key] == pytest.approx(theirs[key], rel=LOG_REL), key


class _Wrapper(torch.nn.Module):
    """Stands for DDP: forwards every call to the wrapped model, counting them."""

    def __init__(self, module: torch.nn.Module, call: bool = True) -> None:
        super().__init__()
        self.module, self.call, self.calls = module, call, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.module(**kwargs) if self.call else None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_through_a_wrapper_equal_the_body_call(layout):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(cfg).double(), LoraConfig(r=2, init_lora_weights=False))
    batch = layout_candidates(layout, [[5, 6, 7], [8, 9]], [[[10, 11], [12]], [[13], [14, 15, 16]]], 0)
    params = [p for p in model.parameters() if p.requires_grad]
    direct = candidate_rows(model, batch)
    wrapper = _Wrapper(model)
    through = candidate_rows(model, batch, through=wrapper)
    assert wrapper.calls == 1
    torch.testing.assert_close(through, direct, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(direct)
    want = torch.autograd.grad((direct * w).sum(), params)
    for got, expected in zip(torch.autograd.grad((through * w).sum(), params), want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(RuntimeError, match="one call of the model body, saw 0"):
        candidate_rows(model, batch, through=_Wrapper(model, call=False))
