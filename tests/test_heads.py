"""Reading the output head from a Hugging Face model (:mod:`napo_kernels.heads`).

For tiny randomly initialised models of every supported class (Gemma 2 with a soft-cap that
matters, Cohere with a logit scale above and below 1, Granite dividing by ``logits_scaling``, tied
GPT-2 / Qwen2 / Gemma heads, Phi's biased head): the trainers' packed path
(:func:`candidate_logps` on a packed batch) gives the model's own full-logits log-probs, and the
gradients of a step (full fine-tuning, the tied embedding included; LoRA) equal the plain model's.
Models whose logits it cannot vouch for raise :class:`UnsupportedHeadError`.
"""

from __future__ import annotations

import socket
from types import MethodType

import pytest
import torch
import transformers as hf
from torch import nn

from napo_kernels import preference_loss
from napo_kernels.heads import SUPPORTED_HEADS, LMHead, UnsupportedHeadError, lm_head_of, trust_lm_head
from napo_kernels.recommender.packing import (
    candidate_logps,
    causal_lm_parts,
    pack_candidates,
    resolve_layout,
)

VOCAB = 151
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)
NO_DROPOUT = dict(attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (config class, model class, config overrides, expected (softcap, logit_scale, tied, bias))
CASES = {
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM, {}, (None, 1.0, False, False)),
    "mistral": (hf.MistralConfig, hf.MistralForCausalLM, {}, (None, 1.0, False, False)),
    "qwen2_tied": (
        hf.Qwen2Config, hf.Qwen2ForCausalLM, dict(tie_word_embeddings=True), (None, 1.0, True, False),
    ),
    "qwen3": (hf.Qwen3Config, hf.Qwen3ForCausalLM, dict(head_dim=8), (None, 1.0, False, False)),
    "gemma": (hf.GemmaConfig, hf.GemmaForCausalLM, dict(head_dim=8), (None, 1.0, True, False)),
    "gemma2_cap30": (
        hf.Gemma2Config, hf.Gemma2ForCausalLM,
        dict(head_dim=8, final_logit_softcapping=30.0, initializer_range=3.0), (30.0, 1.0, True, False),
    ),
    "gemma2_cap2": (
        hf.Gemma2Config, hf.Gemma2ForCausalLM,
        dict(head_dim=8, final_logit_softcapping=2.0, initializer_range=0.5), (2.0, 1.0, True, False),
    ),
    "gemma2_nocap": (
        hf.Gemma2Config, hf.Gemma2ForCausalLM, dict(head_dim=8, final_logit_softcapping=None),
        (None, 1.0, True, False),
    ),
    "gemma3_cap2": (
        hf.Gemma3TextConfig, hf.Gemma3ForCausalLM,
        dict(head_dim=8, final_logit_softcapping=2.0, initializer_range=0.5), (2.0, 1.0, True, False),
    ),
    "cohere_0.0625": (
        hf.CohereConfig, hf.CohereForCausalLM, dict(logit_scale=0.0625), (None, 0.0625, True, False),
    ),
    "cohere_4": (hf.CohereConfig, hf.CohereForCausalLM, dict(logit_scale=4.0), (None, 4.0, True, False)),
    "cohere2_4": (hf.Cohere2Config, hf.Cohere2ForCausalLM, dict(logit_scale=4.0), (None, 4.0, True, False)),
    "granite_8": (
        hf.GraniteConfig, hf.GraniteForCausalLM, dict(logits_scaling=8.0), (None, 0.125, False, False),
    ),
    "phi_bias": (hf.PhiConfig, hf.PhiForCausalLM, {}, (None, 1.0, False, True)),
    "phi3": (hf.Phi3Config, hf.Phi3ForCausalLM, {}, (None, 1.0, False, False)),
    "opt_tied": (
        hf.OPTConfig, hf.OPTForCausalLM,
        dict(ffn_dim=48, word_embed_proj_dim=32, dropout=0.0), (None, 1.0, True, False),
    ),
    "gpt2_tied": (
        hf.GPT2Config, hf.GPT2LMHeadModel,
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0),
        (None, 1.0, True, False),
    ),
}  # fmt: skip
# models outside COMMON's vocabulary of argument names take only these from it
OWN_CONFIG = {"opt_tied": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "max_position_embeddings"), "gpt2_tied": ("vocab_size",)}  # fmt: skip

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
CANDIDATES = [[[20, 21], [22, 23, 24], [25]], [[26], [27, 28], [29, 30, 31, 32]], [[33, 34, 2], [35]]]
WEIGHTS = torch.tensor([[1.0, -0.5, 2.0], [0.3, -1.2, 0.7], [-0.4, 0.9, 0.0]])


def build(name: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised model of case ``name`` (nothing is downloaded), in eval mode."""
    config_cls, model_cls, overrides, _ = CASES[name]
    keep = OWN_CONFIG.get(name)
    common = {k: v for k, v in COMMON.items() if keep is None or k in keep}
    torch.manual_seed(seed)
    return model_cls(config_cls(**(NO_DROPOUT | common | overrides))).eval()


MODELS = {name: build(name) for name in CASES}


def plain_scores(model: nn.Module, prompts=PROMPTS, candidates=CANDIDATES) -> torch.Tensor:
    """``[B, C]`` ground truth: ``model(prompt + candidate).logits``, ``log_softmax``, gather and sum
    over the answer tokens, one plain forward per candidate (0 where a candidate is absent)."""
    c_max = max(len(c) for c in candidates)
    out = torch.zeros(len(prompts), c_max)
    rows = []
    for p, cands in zip(prompts, candidates):
        row = []
        for ids in cands:
            logits = model(input_ids=torch.tensor([p + ids])).logits[0, len(p) - 1 : len(p) + len(ids) - 1]
            row.append(logits.float().log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum())
        rows.append(row)
    out = torch.stack([torch.stack(r + [torch.zeros(())] * (c_max - len(r))) for r in rows])
    return out


def packed_scores(model: nn.Module, **kwargs) -> torch.Tensor:
    return candidate_logps(model, pack_candidates(PROMPTS, CANDIDATES, 0), **kwargs)


def assert_scores_close(got: torch.Tensor, truth: torch.Tensor) -> None:
    err = (got - truth).abs()
    assert float((err / truth.abs().clamp(min=1.0)).max()) <= 1e-5, (got, truth)


def assert_grads_close(got: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> None:
    """Every parameter's gradient within 1e-5 relative: elementwise, with an absolute slack of 1e-5
    of that parameter's largest entry (plus 1e-8 of the model's largest, for gradients that are
    exactly zero in exact arithmetic, such as OPT's key-projection bias: round-off there is ~1e-11)."""
    assert got.keys() == truth.keys() and got
    scale = max(float(t.abs().max()) for t in truth.values())
    for name, t in truth.items():
        atol = 1e-5 * float(t.abs().max()) + 1e-8 * scale
        torch.testing.assert_close(got[name], t, rtol=1e-5, atol=atol, msg=name)


def grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    values = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: g for n, g in zip(params, values) if g is not None}


# ----------------------------------------------------------------------------- what is read


def test_every_supported_class_has_a_case():
    assert {cls.__name__ for _, cls, _, _ in CASES.values()} == set(SUPPORTED_HEADS)


@pytest.mark.parametrize("name", list(CASES))
def test_head_is_read_from_the_model(name):
    model = MODELS[name]
    softcap, scale, tied, has_bias = CASES[name][3]
    head = lm_head_of(model)
    assert isinstance(head, LMHead) and head.model_class == type(model).__name__
    assert head.softcap == softcap and head.logit_scale == pytest.approx(scale, rel=1e-12)
    assert head.tied is tied and (head.bias is not None) is has_bias
    assert (
        head.module is model.get_output_embeddings() and head.weight is model.get_output_embeddings().weight
    )
    if tied:
        assert head.weight is model.get_input_embeddings().weight
    # LMHead.logits is the model's own forward, from the body's hidden states
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(head.logits(head.body(ids)[0]), model(ids).logits, rtol=1e-6, atol=1e-6)


def test_the_soft_cap_and_scales_matter_in_these_models():
    """The cases are built so that a head read as plain would fail the equality tests."""
    for name in ("gemma2_cap2", "gemma3_cap2", "gemma2_cap30", "cohere_4", "cohere_0.0625", "granite_8"):
        model = MODELS[name]
        head = lm_head_of(model)
        ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
        with torch.no_grad():
            raw = nn.functional.linear(head.body(ids)[0], head.weight, head.bias)
            wrong = raw.log_softmax(-1)
            right = model(ids).logits.log_softmax(-1)
        assert float((wrong - right).abs().max()) > 0.1, name
        if head.softcap is not None:
            assert float(raw.abs().max()) > 1.5 * head.softcap, name  # the tanh saturates somewhere


# ----------------------------------------------------------------------------- the bar


@pytest.mark.parametrize("name", list(CASES))
def test_packed_logps_equal_the_models_own(name):
    model = MODELS[name]
    assert resolve_layout(model) == "packed"
    with torch.no_grad():
        assert_scores_close(packed_scores(model), plain_scores(model))


@pytest.mark.parametrize("name", list(CASES))
def test_full_fine_tuning_gradients_equal_the_models_own(name):
    """Every parameter, the tied embedding included (the head's weight *is* the embedding's
    Parameter, so autograd adds the head's gradient to the embedding lookup's)."""
    model = MODELS[name]
    model.requires_grad_(True)
    fused = grads(model, (packed_scores(model) * WEIGHTS).sum())
    plain = grads(model, (plain_scores(model) * WEIGHTS).sum())
    assert_grads_close(fused, plain)
    head = lm_head_of(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    assert name_of[id(head.weight)] in fused  # the head trains (once, shared with the embedding if tied)


@pytest.mark.parametrize("name", ["llama", "gemma2_cap2", "cohere_4", "gpt2_tied"])
def test_lora_gradients_equal_the_models_own(name):
    """Frozen head (the backward does no vocabulary work, soft-cap or scale included)."""
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn"] if name.startswith("gpt2") else ["q_proj", "v_proj"]
    model = get_peft_model(
        build(name),
        LoraConfig(r=2, target_modules=targets, init_lora_weights=False, fan_in_fan_out=name == "gpt2_tied"),
    )
    assert not lm_head_of(model).weight.requires_grad
    with torch.no_grad():
        assert_scores_close(packed_scores(model), plain_scores(model))
    fused = grads(model, (packed_scores(model) * WEIGHTS).sum())
    plain = grads(model, (plain_scores(model) * WEIGHTS).sum())
    assert all("lora_" in n for n in fused)
    assert_grads_close(fused, plain)


@pytest.mark.parametrize("name", ["gemma2_cap2", "cohere_0.0625", "granite_8"])
def test_preference_trainer_step_equals_the_plain_models_loss(tmp_path, name):
    """PreferenceTrainer.compute_loss (full fine-tuning, reference-free S-DPO) passes the head's
    soft-cap / scale to the loss: its loss and every gradient equal those computed from the model's
    own logits."""
    from transformers import TrainingArguments

    from napo_kernels.recommender.trainer import PreferenceTrainer

    model = build(name)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = PreferenceTrainer(
        model, args, method="s_dpo", reference="none", data_collator=lambda features: features
    )
    batch = pack_candidates(PROMPTS, CANDIDATES, 0)
    loss = trainer.compute_loss(model, batch)
    scores = plain_scores(model)
    mask = batch["candidate_mask"]
    truth = preference_loss(scores[:, 0], scores[:, 1:], mask[:, 1:], method="s_dpo")
    torch.testing.assert_close(loss, truth, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model, loss), grads(model, truth))


# ----------------------------------------------------------------------------- wrappers


class Holder(nn.Module):
    """What DDP / FSDP / DataParallel look like to the reader: the model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_peft_and_ddp_wrappers_are_read_through():
    from peft import LoraConfig, get_peft_model

    model = build("gemma2_cap2")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    for wrapped in (peft_model, Holder(model), Holder(peft_model), Holder(Holder(peft_model))):
        head = lm_head_of(wrapped)
        assert head.weight is model.lm_head.weight and head.body is model.model
        assert head.softcap == 2.0 and head.tied and head.model_class == "Gemma2ForCausalLM"
    assert causal_lm_parts(Holder(peft_model)) == (model.model, model.lm_head)
    compiled = torch.compile(peft_model)  # built lazily: reading it compiles nothing
    assert lm_head_of(Holder(compiled)).weight is model.lm_head.weight


def test_loss_kwargs_leave_out_a_plain_heads_defaults():
    assert set(lm_head_of(MODELS["llama"]).loss_kwargs()) == {"bias"}
    assert lm_head_of(MODELS["gemma2_cap2"]).loss_kwargs() == {"bias": None, "softcap": 2.0}
    assert lm_head_of(MODELS["granite_8"]).loss_kwargs() == {"bias": None, "logit_scale": 0.125}
    phi = lm_head_of(MODELS["phi_bias"])
    assert phi.loss_kwargs()["bias"] is MODELS["phi_bias"].lm_head.bias


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_ddp_wrapper_single_process_gloo():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = build("cohere_4")
        ddp = DistributedDataParallel(model)
        head = lm_head_of(ddp)
        assert head.weight is model.lm_head.weight and head.logit_scale == 4.0
        with torch.no_grad():
            assert_scores_close(packed_scores(ddp), plain_scores(model))
    finally:
        dist.destroy_process_group()


def test_peft_modules_to_save_head_follows_the_active_copy():
    from peft import LoraConfig, get_peft_model

    model = build("llama")
    original = model.lm_head
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    trained = lm_head_of(peft_model)
    assert trained.module is not original and trained.weight.requires_grad
    with torch.no_grad():
        trained.weight.add_(0.05 * torch.randn_like(trained.weight))  # the copy now differs
        assert_scores_close(packed_scores(peft_model), plain_scores(peft_model))
        with peft_model.disable_adapter():
            assert lm_head_of(peft_model).module is original
            assert_scores_close(packed_scores(peft_model), plain_scores(peft_model))


def test_accelerate_mixed_precision_forward_is_accepted():
    """accelerate's ``prepare`` wraps ``model.forward`` on the instance (autocast, fp32 outputs),
    keeping the original as ``_original_forward``: still the class's forward."""
    from accelerate.utils import convert_outputs_to_fp32

    model = build("gemma2_cap2")
    model._original_forward = model.forward
    model.forward = MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__), model)
    model.forward = MethodType(convert_outputs_to_fp32(model.forward.__func__), model)
    assert lm_head_of(model).softcap == 2.0


def test_accelerate_device_hooks_are_accepted():
    """``device_map`` loading adds accelerate hooks: ``forward`` replaced on the instance around
    ``_old_forward`` (the original), on the model and on the head."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = build("cohere_4")
    add_hook_to_module(model, ModelHook())
    add_hook_to_module(model.lm_head, ModelHook())
    assert "forward" in vars(model) and "forward" in vars(model.lm_head)
    assert lm_head_of(model).logit_scale == 4.0


# ----------------------------------------------------------------------------- refusals


class DoubledLlama(hf.LlamaForCausalLM):
    """A subclass whose forward post-processes the logits."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2.0 * out.logits
        return out


class KeepsForwardLlama(hf.LlamaForCausalLM):
    """A subclass that leaves forward alone."""


def _llama_as(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls(hf.LlamaConfig(**COMMON)).eval()


def test_subclass_that_changes_the_logits_raises():
    model = _llama_as(DoubledLlama)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        plain = hf.LlamaForCausalLM.forward(model, ids).logits
        assert not torch.allclose(model(ids).logits, plain)  # the subclass really scores differently
    for call in (lm_head_of, causal_lm_parts, packed_scores, resolve_layout):
        with pytest.raises(UnsupportedHeadError, match="DoubledLlama .*overrides LlamaForCausalLM.forward"):
            call(model)
    assert issubclass(UnsupportedHeadError, TypeError)
    # escape hatches: trust_forward reads it as a Llama; trust_lm_head declares the real head
    assert lm_head_of(model, trust_forward=True).logit_scale == 1.0
    trust_lm_head(model, logit_scale=2.0)
    with torch.no_grad():
        assert_scores_close(packed_scores(model), plain_scores(model))
    assert lm_head_of(_llama_as(KeepsForwardLlama)).model_class == "KeepsForwardLlama"


def test_forward_replaced_on_the_instance_or_hooked_raises():
    model = _llama_as(hf.LlamaForCausalLM)
    model.forward = lambda *args, **kwargs: None
    with pytest.raises(UnsupportedHeadError, match="LlamaForCausalLM .*replaces forward on the instance"):
        lm_head_of(model)
    model = _llama_as(hf.LlamaForCausalLM)
    model.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(UnsupportedHeadError, match="LlamaForCausalLM .*forward hooks"):
        lm_head_of(model)
    assert lm_head_of(model, trust_forward=True).model_class == "LlamaForCausalLM"


class ScaledHead(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear, self.weight = linear, linear.weight

    def forward(self, x):
        return 3.0 * self.linear(x)


class ClampedLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x).clamp(-1, 1)


def test_heads_that_are_not_plain_linear_layers_raise():
    from peft import LoraConfig, get_peft_model

    model = _llama_as(hf.LlamaForCausalLM)
    model.lm_head = ScaledHead(model.lm_head)
    with pytest.raises(UnsupportedHeadError, match=r"LlamaForCausalLM .*ScaledHead .*not a torch.nn.Linear"):
        lm_head_of(model)
    model = _llama_as(hf.LlamaForCausalLM)
    clamped = ClampedLinear(32, VOCAB, bias=False)
    model.lm_head = clamped
    with pytest.raises(UnsupportedHeadError, match="ClampedLinear .*overrides nn.Linear.forward"):
        lm_head_of(model)
    model = _llama_as(hf.LlamaForCausalLM)
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(UnsupportedHeadError, match="forward hooks"):
        lm_head_of(model)
    handle.remove()
    lm_head_of(model)
    lora_head = get_peft_model(_llama_as(hf.LlamaForCausalLM), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(UnsupportedHeadError, match="adapter on the output head"):
        lm_head_of(lora_head)


def test_unknown_classes_raise_unless_trusted():
    class TinyLM(nn.Module):
        """Not a Hugging Face model at all."""

    with pytest.raises(UnsupportedHeadError, match="TinyLM .*not a supported causal LM.*LlamaForCausalLM"):
        lm_head_of(TinyLM())
    with pytest.raises(TypeError, match="ForCausalLM"):
        causal_lm_parts(nn.Linear(2, 2))

    torch.manual_seed(0)
    mixtral = hf.MixtralForCausalLM(hf.MixtralConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(UnsupportedHeadError, match="MixtralForCausalLM .*not a supported"):
        lm_head_of(mixtral)
    head = lm_head_of(mixtral, trust_forward=True)  # read as a plain head
    assert head.softcap is None and head.logit_scale == 1.0 and head.body is mixtral.model

    mixtral.config.final_logit_softcapping = 30.0  # an unknown class whose config suggests a cap
    with pytest.raises(UnsupportedHeadError, match="final_logit_softcapping=30.0"):
        lm_head_of(mixtral, trust_forward=True)
    trust_lm_head(mixtral, softcap=30.0)
    assert lm_head_of(mixtral).softcap == 30.0


@pytest.mark.parametrize(
    "name, attribute, value",
    [
        ("gemma2_cap2", "final_logit_softcapping", 0.0),
        ("gemma2_cap2", "final_logit_softcapping", -5.0),
        ("granite_8", "logits_scaling", 0.0),
        ("granite_8", "logits_scaling", float("inf")),
    ],
)
def test_invalid_constants_raise(name, attribute, value):
    model = build(name)
    setattr(model.config, attribute, value)
    with pytest.raises(UnsupportedHeadError, match=f"{type(model).__name__}.*positive finite"):
        lm_head_of(model)


def test_trust_lm_head_validates_its_constants():
    model = _llama_as(hf.LlamaForCausalLM)
    for kwargs in (dict(softcap=0.0), dict(logit_scale=-1.0), dict(logit_scale=float("nan"))):
        with pytest.raises(UnsupportedHeadError, match="positive finite"):
            trust_lm_head(model, **kwargs)


def test_peft_prompt_learning_raises():
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(
        _llama_as(hf.LlamaForCausalLM), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with pytest.raises(UnsupportedHeadError, match="prompt-learning"):
        lm_head_of(model)


@pytest.mark.parametrize("name", ["gemma2_cap2", "cohere_0.0625"])
def test_every_backend_gives_the_models_own_scores_and_gradients(backend, name):
    """The same bar on each kernel backend (``backend`` fixture: torch, cpp, Triton under the
    interpreter, CUDA where present): full fine-tuning (trainable head) and LoRA (frozen head)."""
    from peft import LoraConfig, get_peft_model

    model = build(name)
    lora_model = get_peft_model(
        build(name), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    for m in (model, lora_model):
        with torch.no_grad():
            assert_scores_close(packed_scores(m, backend=backend), plain_scores(m))
        fused = grads(m, (packed_scores(m, backend=backend) * WEIGHTS).sum())
        assert_grads_close(fused, grads(m, (plain_scores(m) * WEIGHTS).sum()))
