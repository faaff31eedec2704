"""The fused loss on sharded models (:mod:`napo_kernels.integrations.sharded`): 2 ``gloo`` ranks
holding a tiny float32 Llama sharded by FSDP2 or DeepSpeed ZeRO-3, trained for 3 steps, against one
unsharded process holding the global batch.

Asserted for every case (untied and tied heads, LoRA and full fine-tuning, NAPO with the pool
shared across ranks and SFT):

- each step's loss (the mean over ranks) and, gathered, every parameter after the steps equal the
  single process's within 1e-5;
- the head weight the loss read was a plain tensor of the full ``[V, H]`` shape holding the
  model's head (its checksum at the first step is the initial head's), never a shard;
- after the last step no rank holds a ``[V, H]`` tensor with storage (FSDP2: the gathered head
  was freed; ZeRO-3: the head is a 0-element placeholder again).

Plain loop (:func:`run_as_forward` + :func:`with_gathered_head` around the public loss), FSDP2 as
accelerate lays it out (:func:`shard_model`: layers, then the root holding the head), with the head
in a group of its own, with CPU offload (``CPUOffloadPolicy``, SGD momentum kept with the shards)
and with mixed precision (bf16 parameters, fp32 gradient reduction: within bf16 tolerance of fp32);
ZeRO-3 through ``deepspeed.initialize``. Trainers: ``PreferenceTrainer`` and
``RecommenderSFTTrainer`` on a model sharded by transformers' ``DistributedConfig`` (the FSDP2 path
the Hugging Face Trainer runs on CPU) and on ZeRO-3 through ``TrainingArguments(deepspeed=...)``.
"""

from __future__ import annotations

import datetime
import gc
import os
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from spawn_ranks import free_port, run_ranks
from torch import Tensor, nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
)

import napo_kernels as nk
from napo_kernels.heads import LMHead, causal_lm_of, lm_head_of
from napo_kernels.integrations.sharded import (
    full_parameters,
    run_as_forward,
    shard_model,
    sharding_of,
    with_gathered_head,
)
from napo_kernels.recommender import packing
from napo_kernels.recommender.data import RecPreferenceDataset, generate_world, train_bpe_tokenizer
from napo_kernels.recommender.packing import candidate_rows, layout_candidates
from napo_kernels.recommender.trainer import PreferenceTrainer, RecommenderSFTTrainer

try:
    import deepspeed
except ImportError:  # the ZeRO-3 cases are skipped without it
    deepspeed = None

SPAWNS = pytest.mark.slow
WORLD, STEPS, GLOBAL_BATCH, C = 2, 3, 4, 3
V, H = 96, 32  # the plain loop's model (the trainers' vocabulary comes from their tokenizer)
SPAWN_TIMEOUT_S = 300
TOL = dict(atol=1e-5, rtol=1e-5)
NEEDS_DEEPSPEED = pytest.mark.skipif(deepspeed is None, reason="deepspeed is not installed")
ZERO3 = {
    "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise; SGD must see the raw gradient
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # shard even tiny tensors
}


# ----------------------------------------------------------------------------------------------
# What every rank checks: the weight the loss saw, and what stays allocated after a step.
# ----------------------------------------------------------------------------------------------


def _seen(weight: Tensor) -> tuple[str, tuple[int, ...], torch.dtype, float]:
    return type(weight).__name__, tuple(weight.shape), weight.dtype, float(weight.detach().double().sum())


def _full_copies(shape: tuple[int, int], kept: list[dict] = ()) -> int:
    """Plain tensors of the head's full shape that hold storage, anywhere in this process, but for
    the gathered parameters of earlier cases (``kept``: the results of this rank so far)."""
    gc.collect()
    ours = {t.untyped_storage().data_ptr() for res in kept for t in res.get("params", {}).values()}
    return sum(
        issubclass(type(t), Tensor)  # type(), not isinstance: no deprecated object warns
        and type(t).__name__ != "DTensor"
        and tuple(t.shape) == shape
        and t.untyped_storage().nbytes() > 0
        and t.untyped_storage().data_ptr() not in ours
        for t in gc.get_objects()
    )


def _init(rank: int, port: int) -> None:
    # what torchrun exports; the Trainer (accelerate) joins the same gloo group
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))


def _save(out_dir: str, rank: int, run: Callable[[], dict]) -> None:
    try:
        results = run()
    except BaseException:
        results = {"crash": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The plain loop: the public loss inside run_as_forward / with_gathered_head.
# ----------------------------------------------------------------------------------------------

PLAIN = {
    "fsdp2-untied-lora-napo": dict(engine="fsdp2", tied=False, lora=True, objective="napo"),
    "fsdp2-tied-full-napo": dict(engine="fsdp2", tied=True, lora=False, objective="napo"),
    "fsdp2-tied-lora-sft": dict(engine="fsdp2", tied=True, lora=True, objective="sft"),
    "fsdp2-untied-full-sft-own-head-group": dict(engine="fsdp2", tied=False, lora=False, objective="sft",
                                                 separate_head=True),
    "fsdp2-untied-full-napo-cpu-offload": dict(engine="fsdp2", tied=False, lora=False, objective="napo",
                                               offload=True),
    "fsdp2-tied-full-napo-bf16": dict(engine="fsdp2", tied=True, lora=False, objective="napo", bf16=True),
    "zero3-untied-lora-napo": dict(engine="zero3", tied=False, lora=True, objective="napo"),
    "zero3-tied-full-sft": dict(engine="zero3", tied=True, lora=False, objective="sft"),
    "zero3-untied-full-napo": dict(engine="zero3", tied=False, lora=False, objective="napo"),
}  # fmt: skip


def _tiny(tied: bool, lora: bool) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if lora:  # init_lora_weights=False: non-zero B, so the adapters matter from the first step
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    return model


def _packed(step: int, lo: int, hi: int) -> dict[str, Tensor]:
    """Prompts ``lo:hi`` of step ``step``'s global batch (each prompt with C candidates), packed."""
    g = torch.Generator().manual_seed(100 + step)

    def ids(low: int, high: int) -> list[int]:
        return torch.randint(1, V, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    prompts = [ids(3, 7) for _ in range(GLOBAL_BATCH)]
    cands = [[ids(1, 4) for _ in range(C)] for _ in range(GLOBAL_BATCH)]
    return layout_candidates("packed", prompts[lo:hi], cands[lo:hi], 0)


def _plain_train(
    model: nn.Module, engine, lo: int, hi: int, group, objective: str, seen: list
) -> list[float]:
    """STEPS steps of the public loss on prompts lo:hi; the global-batch loss of every step."""
    world = 1 if group is None else dist.get_world_size(group)
    criterion = nk.PreferenceLoss("napo", process_group=group)  # NAPO's pool spans the ranks
    losses = []
    for step in range(STEPS):
        batch = _packed(step, lo, hi)
        b = hi - lo

        def loss_of(head: LMHead, rows: Tensor, batch: dict = batch, b: int = b) -> Tensor:
            seen.append(_seen(head.weight))
            kwargs = dict(sequence_ids=batch["score_sequence"], **head.loss_kwargs())
            if objective == "napo":
                out = criterion(rows, head.weight, batch["score_labels"], num_prompts=b, num_candidates=C,
                                candidate_mask=batch["candidate_mask"], **kwargs)  # fmt: skip
                return out.loss
            logps = nk.sequence_logprobs(rows, head.weight, batch["score_labels"], num_sequences=b * C,
                                         sequence_mask=batch["candidate_mask"], **kwargs)  # fmt: skip
            tokens = batch["candidate_lengths"][:, 0].sum()
            if group is not None:  # the global token mean: W * local sum / global count
                dist.all_reduce(tokens, group=group)
            return -logps.reshape(b, C)[:, 0].sum() * world / tokens

        def forward(batch: dict = batch, loss_of: Callable = loss_of) -> Tensor:  # runs as the forward
            rows = candidate_rows(causal_lm_of(model), batch)
            return with_gathered_head(model, loss_of, rows)

        loss = run_as_forward(model, forward)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        if group is not None:
            dist.all_reduce(mean, group=group)
        losses.append(float(mean) / world)
    return losses


class _Torch:
    """``backward`` / ``step`` of a plain model with SGD (momentum: optimizer state to offload)."""

    def __init__(self, model: nn.Module) -> None:
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
        self.model, self.grad_dtypes = model, set()

    def backward(self, loss: Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        self.grad_dtypes |= {p.grad.dtype for p in self.model.parameters() if p.grad is not None}

    def step(self) -> None:
        self.opt.step()


def _plain_case(case: dict, rank: int, kept: list[dict]) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    model = _tiny(case["tied"], case["lora"])
    initial = float(lm_head_of(model).weight.detach().double().sum())
    group = dist.group.WORLD
    if case["engine"] == "fsdp2":
        # bf16 parameters in the forward, fp32 gradient reduction into the fp32 shards
        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = shard_model(
            model,
            mp_policy=bf16 if case.get("bf16") else None,
            offload_policy=CPUOffloadPolicy(pin_memory=False) if case.get("offload") else None,
            separate_head=case.get("separate_head", False),
        )
        engine = _Torch(model)
        wrapper = model
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.2, momentum=0.9)
        wrapper, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ZERO3)
        engine = wrapper
    seen: list = []
    head = lm_head_of(model).module
    losses = _plain_train(wrapper, engine, rank * 2, rank * 2 + 2, group, case["objective"], seen)
    leftover = _full_copies((V, H), kept)
    placeholder = tuple(head.weight.shape) if case["engine"] == "zero3" else None
    return dict(
        engine=sharding_of(wrapper), losses=losses, seen=seen, initial=initial, leftover=leftover,
        placeholder=placeholder, grad_dtypes=getattr(engine, "grad_dtypes", set()),
        params={n: p.float() for n, p in full_parameters(model).items()},
    )  # fmt: skip


def _plain_reference(case: dict) -> dict:
    model = _tiny(case["tied"], case["lora"])
    engine = _Torch(model)
    losses = _plain_train(model, engine, 0, GLOBAL_BATCH, None, case["objective"], [])
    return dict(losses=losses, params={n: p.detach().clone() for n, p in model.named_parameters()},
                copies=_full_copies((V, H)))  # fmt: skip


def _plain_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    if deepspeed is not None:
        deepspeed.init_distributed(dist_backend="gloo")  # joins the group above

    def run() -> dict:
        results = {}
        for name, case in PLAIN.items():
            if case["engine"] == "zero3" and deepspeed is None:
                continue
            results[name] = _plain_case(case, rank, list(results.values()))
        # the single process (after the leftover checks: its unsharded head is a full copy)
        for name in results:
            results[name]["want"] = _plain_reference(PLAIN[name])
        return results

    _save(out_dir, rank, run)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_plain")
    return run_ranks(
        _plain_worker, WORLD, (free_port(), str(tmp)), tmp, SPAWN_TIMEOUT_S, "sharded plain loop"
    )


def _plain_ids() -> list:
    return [pytest.param(n, marks=NEEDS_DEEPSPEED) if PLAIN[n]["engine"] == "zero3" else n for n in PLAIN]


@SPAWNS
@pytest.mark.parametrize("name", _plain_ids())
def test_plain_loop_matches_one_process(plain, name):
    case = PLAIN[name]
    start = _tiny_params(case)
    for res in (r[name] for r in plain):
        assert res["engine"] == case["engine"]
        want = res["want"]
        assert res["params"].keys() == want["params"].keys()
        if case.get("bf16"):  # bf16 forward: the losses within bf16 rounding, the updates aligned
            assert res["losses"] == pytest.approx(want["losses"], rel=2e-2)
            got = torch.cat([(res["params"][n] - p).flatten() for n, p in start.items()])
            ref = torch.cat([(want["params"][n] - p).flatten() for n, p in start.items()])
            assert float(torch.nn.functional.cosine_similarity(got, ref, dim=0)) > 0.99
            continue
        assert res["losses"] == pytest.approx(want["losses"], rel=1e-5)
        for n, p in want["params"].items():
            torch.testing.assert_close(res["params"][n], p, **TOL, msg=lambda m, n=n: f"{n}: {m}")
        moved = max(float((res["params"][n] - p).abs().max()) for n, p in start.items())
        assert moved > 1e-3  # the steps trained something


def _tiny_params(case: dict) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in _tiny(case["tied"], case["lora"]).named_parameters() if p.requires_grad}


@SPAWNS
@pytest.mark.parametrize("name", _plain_ids())
def test_plain_loop_loss_sees_the_whole_head_and_frees_it(plain, name):
    case = PLAIN[name]
    dtype = torch.bfloat16 if case.get("bf16") else torch.float32
    for res in (r[name] for r in plain):
        assert len(res["seen"]) == STEPS
        for kind, shape, seen_dtype, _ in res["seen"]:
            assert kind != "DTensor" and shape == (V, H) and seen_dtype == dtype
        # the first step read the initial head itself (bf16: its rounding)
        assert res["seen"][0][3] == pytest.approx(res["initial"], rel=1e-2 if case.get("bf16") else 1e-6)
        assert res["leftover"] == 0  # no full [V, H] tensor survives the step on any rank
        assert res["want"]["copies"] >= 1  # ... where the unsharded model has one: the check can see it
        if case["engine"] == "zero3":
            assert res["placeholder"] == (0,)
    if case.get("bf16"):  # bf16 parameters in the forward, fp32 gradients reduced into the fp32 shards
        assert plain[0][name]["grad_dtypes"] == {torch.float32}


def test_reading_the_head_outside_the_forward_is_what_breaks(monkeypatch):
    """Single process, 1-rank group: what the loss would get without the redirection."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = shard_model(_tiny(False, False))
        weight = model.lm_head.weight
        assert type(weight).__name__ == "DTensor"  # what lm_head.weight is between forwards
        batch = _packed(0, 0, 2)

        def forward() -> Tensor:
            rows = candidate_rows(causal_lm_of(model), batch)
            return with_gathered_head(model, lambda head, r: (_seen(head.weight), r.sum()), rows)

        seen, _ = run_as_forward(model, forward)
        assert seen[0] != "DTensor" and seen[1] == (V, H)
        rows = torch.randn(len(batch["score_labels"]), H)
        with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):  # a shard, not the head
            nk.sequence_logprobs(rows, weight, batch["score_labels"])

        class Skips(nn.Module):  # a wrapper whose forward never reaches the model
            def __init__(self, module: nn.Module) -> None:
                super().__init__()
                self.module = module

            def forward(self) -> None:
                return None

        with pytest.raises(RuntimeError, match="ran it 0 times"):
            run_as_forward(Skips(_tiny(False, False)), lambda: None)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The trainers: FSDP2 from transformers' DistributedConfig, ZeRO-3 from TrainingArguments.
# ----------------------------------------------------------------------------------------------

TRAINER = {
    "napo-lora-untied": dict(method="napo", lora=True, tied=False),
    "napo-lora-tied": dict(method="napo", lora=True, tied=True),
    "napo-full-tied": dict(method="napo", lora=False, tied=True),  # a sharded reference model
    "sft-full-untied": dict(method="sft", lora=False, tied=False),
    "sft-full-tied": dict(method="sft", lora=False, tied=True),
    # transformers' FSDP2 mixed precision (bf16 parameters, fp32 reduction) against the fp32 run
    "napo-lora-untied-bf16": dict(method="napo", lora=True, tied=False, bf16=True, like="napo-lora-untied"),
}
ZERO3_TRAINER = ("napo-lora-untied", "napo-full-tied", "sft-full-tied")


def _world():
    return generate_world(num_items=40, num_genres=3, genre_words=3, common_words=10, num_candidates=6,
                          min_history=2, max_history=4, num_train=GLOBAL_BATCH * STEPS, num_val=2, num_test=2,
                          seed=7)  # fmt: skip


def _trainer_args(out_dir: str, world: int, engine: str | None) -> TrainingArguments:
    kw = dict(
        output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
        train_sampling_strategy="sequential", optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=engine != "zero3",
    )  # fmt: skip
    if engine == "zero3":
        # On a machine without GPUs accelerate gives DeepSpeed no process-group backend and then counts
        # one process (every rank would get the same batches): configure its state with gloo first.
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)  # the previous case's Accelerator
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        zero3 = ZERO3 | {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}
        kw.update(deepspeed=zero3, accelerator_config={"use_configured_state": True})
    return TrainingArguments(**kw)


def _load(path: str, engine: str | None, world: int, bf16: bool = False) -> LlamaForCausalLM:
    if engine == "fsdp2":
        from transformers.distributed import DistributedConfig

        config = DistributedConfig(fsdp_size=world, fsdp_mixed_precision=bf16)
        return LlamaForCausalLM.from_pretrained(path, distributed_config=config)
    return LlamaForCausalLM.from_pretrained(path)  # ZeRO-3: partitioned as it loads (zero.Init)


class _AfterLastStep(TrainerCallback):
    """What stays allocated once the last optimizer step is done."""

    def __init__(self, trainer, shape: tuple[int, int], engine: str | None, kept: list[dict]) -> None:
        self.trainer, self.shape, self.engine, self.kept = trainer, shape, engine, kept
        self.leftover: int | None = None
        self.placeholder: tuple[int, ...] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == STEPS:
            self.leftover = _full_copies(self.shape, self.kept)
            if self.engine == "zero3":
                self.placeholder = tuple(lm_head_of(self.trainer.model).module.weight.shape)


def _train_case(
    name: str,
    tok_dir: str,
    model_dirs: dict,
    out_dir: str,
    world: int,
    engine: str | None,
    kept: list[dict] = (),
) -> dict:
    case = TRAINER[name]
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    args = _trainer_args(out_dir, world, engine)  # first: it turns ZeRO-3 loading on
    path = model_dirs[case["tied"]]
    model = _load(path, engine, world, case.get("bf16", False))
    seen: list = []
    data = _world().train
    if case["method"] == "sft":
        ds = RecPreferenceDataset(data, num_negatives=0)
        trainer = RecommenderSFTTrainer(model, args, train_dataset=ds, processing_class=tok, layout="packed")
    else:
        options = {}
        if case["lora"]:
            torch.manual_seed(1)
            lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                              init_lora_weights=False)  # fmt: skip
            model = get_peft_model(model, lora)
        else:  # full fine-tuning: a reference loaded (and sharded) like the policy
            options["ref_model"] = _load(path, engine, world)
        ds = RecPreferenceDataset(data, num_negatives=2, seed=3)
        trainer = PreferenceTrainer(model, args, method="napo", train_dataset=ds, processing_class=tok,
                                    layout="packed", **options)  # fmt: skip
        trainer.criterion.register_forward_pre_hook(lambda _m, a: seen.append(_seen(a[1])))
    initial = full_parameters(model, trainable_only=True) if case.get("bf16") else None
    shape = tuple(getattr(lm_head_of(model).weight, "ds_shape", None) or lm_head_of(model).weight.shape)
    after = _AfterLastStep(trainer, shape, engine, kept)
    trainer.add_callback(after)
    original = packing.sequence_logprobs

    def spy(rows, weight, *a, **k):
        seen.append(_seen(weight))
        return original(rows, weight, *a, **k)

    packing.sequence_logprobs = spy
    try:
        trainer.train()
    finally:
        packing.sequence_logprobs = original
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return dict(
        engine=sharding_of(trainer.model_wrapped), losses=[h["loss"] for h in logs], seen=seen,
        leftover=after.leftover, placeholder=after.placeholder, shape=shape,
        params=full_parameters(trainer.model), wrapped=type(trainer.model_wrapped).__name__, initial=initial,
    )  # fmt: skip


def _trainer_worker(rank: int, port: int, tok_dir: str, model_dirs: dict, out_dir: str, engine: str) -> None:
    _init(rank, port)
    names = ZERO3_TRAINER if engine == "zero3" else tuple(TRAINER)

    def run() -> dict:
        results: dict = {}
        for n in names:
            out = os.path.join(out_dir, f"r{rank}")
            results[n] = _train_case(n, tok_dir, model_dirs, out, WORLD, engine, list(results.values()))
        return results

    _save(out_dir, rank, run)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tokenizer and a tiny Llama (untied and tied) saved once: every process loads the same weights."""
    tmp = tmp_path_factory.mktemp("sharded_trainer")
    data = _world()
    texts = [f"{' '.join(e.history)} | {' '.join(e.candidates)}" for e in data.train] + data.items
    tok = train_bpe_tokenizer(texts * 3, vocab_size=320)
    tok.save_pretrained(str(tmp / "tokenizer"))
    dirs = {}
    for tied in (False, True):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, tie_word_embeddings=tied)  # fmt: skip
        dirs[tied] = str(tmp / f"llama-tied{int(tied)}")
        LlamaForCausalLM(cfg).save_pretrained(dirs[tied])
    fp32 = [n for n in TRAINER if not TRAINER[n].get("bf16")]
    single = {n: _train_case(n, str(tmp / "tokenizer"), dirs, str(tmp / "single"), 1, None) for n in fp32}
    return tmp, str(tmp / "tokenizer"), dirs, single


def _spawn_trainers(checkpoints, engine: str) -> list[dict]:
    tmp, tok_dir, dirs, _ = checkpoints
    out = tmp / engine
    out.mkdir()
    args = (free_port(), tok_dir, dirs, str(out), engine)
    return run_ranks(_trainer_worker, WORLD, args, out, SPAWN_TIMEOUT_S, f"{engine} trainers")


@pytest.fixture(scope="module")
def fsdp2_trainers(checkpoints):
    return _spawn_trainers(checkpoints, "fsdp2")


@pytest.fixture(scope="module")
def zero3_trainers(checkpoints):
    if deepspeed is None:
        pytest.skip("deepspeed is not installed")
    return _spawn_trainers(checkpoints, "zero3")


def _check_trainer_run(ranks: list[dict], single: dict, name: str, engine: str) -> None:
    bf16 = TRAINER[name].get("bf16", False)
    want = single[TRAINER[name].get("like", name)]
    assert want["engine"] is None
    initial = want["seen"][0][3]
    for res in (r[name] for r in ranks):
        assert res["engine"] == engine
        assert len(res["losses"]) == STEPS
        assert res["params"].keys() == want["params"].keys()
        if bf16:  # bf16 forward: the losses within bf16 rounding, the updates aligned with fp32's
            assert res["losses"] == pytest.approx(want["losses"], rel=2e-2)
            start = res["initial"]
            got = torch.cat([(res["params"][n] - p).flatten() for n, p in start.items()])
            ref = torch.cat([(want["params"][n] - p).flatten() for n, p in start.items()])
            assert float(torch.nn.functional.cosine_similarity(got, ref, dim=0)) > 0.99
        else:
            assert res["losses"] == pytest.approx(want["losses"], rel=1e-5)
            for n, p in want["params"].items():
                torch.testing.assert_close(res["params"][n], p, **TOL, msg=lambda m, n=n: f"{n}: {m}")
        assert res["seen"], "the loss never ran"
        for kind, shape, dtype, _ in res["seen"]:
            assert kind != "DTensor" and shape == res["shape"]
            assert dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert res["seen"][0][3] == pytest.approx(initial, rel=1e-2 if bf16 else 1e-6)
        assert res["leftover"] == 0
        if engine == "zero3":
            assert res["placeholder"] == (0,)


@SPAWNS
@pytest.mark.parametrize("name", list(TRAINER))
def test_trainers_on_fsdp2_match_one_process(fsdp2_trainers, checkpoints, name):
    _check_trainer_run(fsdp2_trainers, checkpoints[3], name, "fsdp2")


@SPAWNS
@NEEDS_DEEPSPEED
@pytest.mark.parametrize("name", ZERO3_TRAINER)
def test_trainers_on_zero3_match_one_process(zero3_trainers, checkpoints, name):
    _check_trainer_run(zero3_trainers, checkpoints[3], name, "zero3")
    assert zero3_trainers[0][name]["wrapped"] == "DeepSpeedEngine"
