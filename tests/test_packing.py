"""Packed candidates: one forward per prompt must give every candidate the score (and the
gradients) of a separate forward, on tiny Llama and GPT-2 models with eager and SDPA attention."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from napo_kernels import reference
from napo_kernels.recommender.packing import (
    CandidateCollator,
    candidate_logps,
    candidate_rows,
    causal_lm_parts,
    pack_candidates,
    packing_supported,
    resolve_layout,
    separate_candidates,
)

VOCAB = 61


def tiny_model(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            attn_implementation=attn,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            attn_implementation=attn,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    return model.eval()


MODELS = {(a, i): tiny_model(a, i) for a in ("llama", "gpt2") for i in ("eager", "sdpa")}
CASES = list(MODELS)


def full_logits_scores(model, prompts, candidates) -> list[list[float]]:
    """Ground truth: a plain ``model(prompt + candidate).logits`` forward per candidate."""
    out = []
    for p, cands in zip(prompts, candidates):
        row = []
        for c in cands:
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1]
            row.append(float(reference.sequence_scores_from_logits(logits, torch.tensor(c))))
        out.append(row)
    return out


problems = st.integers(1, 3).flatmap(
    lambda b: st.tuples(
        st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12), min_size=b, max_size=b),
        st.lists(
            st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=5), min_size=1, max_size=4),
            min_size=b,
            max_size=b,
        ),
    )
)


@pytest.mark.parametrize("arch, attn", CASES)
@settings(max_examples=8, deadline=None)
@given(problem=problems)
def test_packed_scores_equal_separate_forwards(arch, attn, problem):
    prompts, candidates = problem
    model = MODELS[(arch, attn)]
    with torch.no_grad():
        packed = candidate_logps(model, pack_candidates(prompts, candidates, 0))
        separate = candidate_logps(model, separate_candidates(prompts, candidates, 0))
        truth = full_logits_scores(model, prompts, candidates)
    for b, row in enumerate(truth):
        for c, s in enumerate(row):
            assert abs(float(packed[b, c]) - s) <= 1e-5 * max(1.0, abs(s)), (b, c)
            assert abs(float(separate[b, c]) - s) <= 1e-5 * max(1.0, abs(s)), (b, c)
        assert bool((packed[b, len(row) :] == 0).all())  # absent candidates score 0


@pytest.mark.parametrize("arch, attn", [("llama", "sdpa"), ("gpt2", "eager")])
def test_packed_gradients_equal_separate(arch, attn):
    model = MODELS[(arch, attn)]
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    candidates = [[[20, 21], [22, 23, 24], [25]], [[26], [27, 28]]]
    weights = torch.tensor([[1.0, -0.5, 2.0], [0.3, -1.2, 0.0]])
    grads = []
    for layout in (pack_candidates, separate_candidates):
        model.zero_grad()
        (candidate_logps(model, layout(prompts, candidates, 0)) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


def test_packed_layout_structure():
    batch = pack_candidates([[1, 2, 3]], [[[7, 8], [9]]], pad_token_id=0, num_candidates=3)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]  # restart after the prompt
    allowed = batch["attention_mask"][0, 0]
    assert allowed.shape == (6, 6)
    assert allowed[4].tolist() == [True, True, True, True, True, False]  # cand 0 sees prompt + itself
    assert allowed[5].tolist() == [True, True, True, False, False, True]  # cand 1 never sees cand 0
    assert allowed[1].tolist() == [True, True, False, False, False, False]  # the prompt stays causal
    # first token of each candidate predicted from the last prompt position (index 2), then in-candidate
    assert batch["score_index"].tolist() == [2, 3, 2]
    assert batch["score_labels"].tolist() == [7, 8, 9]
    assert batch["score_sequence"].tolist() == [0, 0, 1]
    assert batch["candidate_mask"].tolist() == [[True, True, False]]
    assert batch["candidate_lengths"].tolist() == [[2, 1, 0]]


def test_padding_rows_attend_only_to_themselves():
    batch = pack_candidates([[1, 2], [3]], [[[4]], [[5]]], pad_token_id=0)
    allowed = batch["attention_mask"][1, 0]  # second prompt: [3, 5, pad]
    assert allowed[2].tolist() == [False, False, True]
    assert not allowed[:2, 2].any()


@pytest.mark.parametrize(
    "prompts, candidates, message",
    [
        ([[1], []], [[[2]], [[3]]], "prompt 1 has no tokens"),
        ([[1], [2]], [[[2]], []], "prompt 1 has no candidate"),
        ([[1]], [[[2], []]], "candidate 1 of prompt 0 has no tokens"),
        ([[1]], [[[2]], [[3]]], "one entry per prompt"),
    ],
)
def test_layout_errors(prompts, candidates, message):
    for layout in (pack_candidates, separate_candidates):
        with pytest.raises(ValueError, match=message):
            layout(prompts, candidates, 0)
    with pytest.raises(ValueError, match="num_candidates=1"):
        pack_candidates([[1]], [[[2], [3]]], 0, num_candidates=1)


def test_collator_tokenizes_and_weights_history():
    from napo_kernels.recommender.data import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["alpha beta gamma delta", " alpha beta", " gamma"] * 10, vocab_size=300)
    features = [
        {
            "index": 7,
            "prompt": "alpha beta",
            "candidates": [" gamma", " alpha beta"],
            "history": [" alpha", " gamma"],
        },
        {"index": 9, "prompt": "delta", "candidates": [" beta"], "history": []},
    ]
    for layout in ("packed", "separate"):
        batch = CandidateCollator(tok, layout)(features)
        assert batch["example_index"].tolist() == [7, 9]
        assert batch["candidate_mask"].tolist() == [[True, True], [True, False]]
        eos = tok.eos_token_id
        assert batch["score_labels"].tolist().count(eos) == 3  # every answer ends with EOS
        w = batch["history_weights"]
        assert w[0].sum().item() == pytest.approx(1.0) and w[1].sum().item() == 0.0
    col = CandidateCollator(tok, max_prompt_length=2)
    assert len(col.prompt_ids("alpha beta gamma delta")) == 2
    with pytest.raises(ValueError, match="feature 0"):
        col([{"prompt": "x"}])
    with pytest.raises(ValueError, match="layout"):
        CandidateCollator(tok, layout="diagonal")


def test_model_parts_and_rows():
    from peft import LoraConfig, get_peft_model

    model = MODELS[("llama", "sdpa")]
    body, head = causal_lm_parts(model)
    assert head is model.lm_head and body is model.model
    peft_model = get_peft_model(tiny_model("llama", "sdpa"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert causal_lm_parts(peft_model)[1].weight.shape == (VOCAB, 32)
    batch = pack_candidates([[3, 4, 5]], [[[6, 7], [8]]], 0)
    assert candidate_rows(model, batch).shape == (3, 32)
    with pytest.raises(TypeError, match="ForCausalLM"):
        causal_lm_parts(torch.nn.Linear(2, 2))


def test_supported_models_pack_and_mask_rejecting_models_fall_back():
    for model in MODELS.values():
        assert packing_supported(model) and resolve_layout(model) == "packed"
    model = tiny_model("llama", "sdpa")
    forward = model.model.forward

    def rejects_4d(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("custom 4-D masks are not supported")
        return forward(*args, attention_mask=attention_mask, **kwargs)

    model.model.forward = rejects_4d
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_layout(model) == "separate"
    assert any("falling back to one sequence per candidate" in str(w.message) for w in caught)
    assert resolve_layout(model, "packed") == "packed"  # an explicit request is obeyed
    with pytest.raises(ValueError, match="layout"):
        resolve_layout(model, "zigzag")
