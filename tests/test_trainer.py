"""Trainers: the SFT and preference losses equal the reference math computed from full logits of
separate forwards (values and LoRA gradients), training runs with peft and full fine-tuning, and
NAPO's margin state survives a checkpoint."""

import copy
import os
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_llama as build_tiny_llama
from transformers import LlamaForCausalLM, TrainingArguments

from napo_kernels import reference
from napo_kernels.recommender.data import RecPreferenceDataset, generate_world, train_bpe_tokenizer
from napo_kernels.recommender.packing import CandidateCollator
from napo_kernels.recommender.trainer import LOSS_STATE_NAME, PreferenceTrainer, RecommenderSFTTrainer

WORLD = generate_world(
    num_items=40,
    num_genres=3,
    genre_words=3,
    common_words=10,
    num_candidates=6,
    min_history=2,
    max_history=4,
    num_train=12,
    num_val=4,
    num_test=4,
    seed=5,
)
TEMPLATE_TEXT = [f"{' '.join(e.history)} | {' '.join(e.candidates)}" for e in WORLD.train] + WORLD.items
TOK = train_bpe_tokenizer(TEMPLATE_TEXT * 3, vocab_size=320)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return build_tiny_llama(TOK, seed)


def lora(model, random_b: bool = True):
    # init_lora_weights=False: non-zero B, so the policy differs from the reference (adapters off)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=not random_b
    )
    return get_peft_model(model, cfg)


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        learning_rate=1e-2,
        max_steps=2,
    )
    return TrainingArguments(**(base | kw))


def full_logits_scores(model, batch_features, collator) -> torch.Tensor:
    """[B, C] scores from plain ``model(prompt + answer).logits`` forwards (the ground truth)."""
    rows = []
    for f in batch_features:
        p = collator.prompt_ids(f["prompt"])
        row = []
        for a in f["candidates"]:
            ids = collator.answer_ids(a)
            logits = model(input_ids=torch.tensor([p + ids])).logits[0, len(p) - 1 : len(p) + len(ids) - 1]
            row.append(reference.sequence_scores_from_logits(logits, torch.tensor(ids)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_sft_loss_is_token_mean_nll_of_the_positive(tmp_path):
    model = tiny_llama()
    ds = RecPreferenceDataset(WORLD.train, num_negatives=0)
    trainer = RecommenderSFTTrainer(model, targs(tmp_path), train_dataset=ds, processing_class=TOK)
    features = [ds[i] for i in range(4)]
    batch = trainer.data_collator(features)
    loss = trainer.compute_loss(model, batch)
    collator = trainer.data_collator
    truth = full_logits_scores(model, features, collator)[:, 0]
    tokens = sum(len(collator.answer_ids(f["candidates"][0])) for f in features)
    torch.testing.assert_close(loss, -truth.sum() / tokens, atol=1e-5, rtol=1e-5)
    assert trainer.layout == "packed"


def test_sft_training_lowers_the_loss(tmp_path):
    model = tiny_llama()
    ds = RecPreferenceDataset(WORLD.train[:4], num_negatives=0)
    trainer = RecommenderSFTTrainer(
        model, targs(tmp_path, max_steps=8, learning_rate=2e-2), train_dataset=ds, processing_class=TOK
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    assert "sft/nll_per_token" in trainer.state.log_history[0]


def _reference_loss(method, policy, ref, k, users):
    kw = dict(method=method, beta=1.0)
    if method == "napo":
        kw |= dict(gamma0=1.0, sharing="similarity", user_embeddings=users, rho=0.7, ema=0.0)
    loss, _ = reference.family_loss(policy[:, 0], policy[:, 1:], None, ref[:, 0], ref[:, 1:], **kw)
    return loss


@pytest.mark.parametrize("method", ["dpo", "s_dpo", "dmpo", "napo", "dynamicpo"])
def test_preference_loss_and_lora_gradients_match_reference(tmp_path, method):
    k = 1 if method == "dpo" else 3
    model = lora(tiny_llama())
    ds = RecPreferenceDataset(WORLD.train, num_negatives=k, seed=1)
    trainer = PreferenceTrainer(model, targs(tmp_path), method=method, train_dataset=ds, processing_class=TOK)
    assert trainer.reference == "adapters"
    features = [ds[i] for i in range(4)]
    batch = trainer.data_collator(features)
    model.train()
    loss = trainer.compute_loss(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)

    collator = trainer.data_collator
    policy = full_logits_scores(model, features, collator)
    with torch.no_grad(), model.disable_adapter():
        ref = full_logits_scores(model, features, collator)
    users = trainer.user_embeddings(model, batch)
    truth = _reference_loss(method, policy, ref, k, users)
    truth_grads = torch.autograd.grad(truth, params)
    torch.testing.assert_close(loss, truth, atol=1e-5, rtol=1e-5)
    for g, t in zip(grads, truth_grads):
        torch.testing.assert_close(g, t, atol=1e-5, rtol=1e-4)
    assert float((policy - ref).detach().abs().max()) > 1e-3  # the reference really differs from the policy


def test_user_embeddings_are_mean_item_embeddings(tmp_path):
    model = lora(tiny_llama())
    ds = RecPreferenceDataset(WORLD.train, num_negatives=2)
    trainer = PreferenceTrainer(model, targs(tmp_path), method="napo", train_dataset=ds, processing_class=TOK)
    batch = trainer.data_collator([ds[0]])
    emb = model.get_input_embeddings().weight
    items = [torch.tensor(trainer.data_collator.answer_ids(h, eos=False)) for h in ds[0]["history"]]
    expected = torch.stack([emb[ids].mean(0) for ids in items]).mean(0)
    torch.testing.assert_close(trainer.user_embeddings(model, batch)[0], expected, atol=1e-6, rtol=1e-5)
    other = PreferenceTrainer(model, targs(tmp_path), method="s_dpo", train_dataset=ds, processing_class=TOK)
    assert other.user_embeddings(model, batch) is None  # only NAPO shares by similarity


@pytest.mark.slow  # trains through the whole Trainer loop
def test_lora_training_logs_metrics_and_moves_only_adapters(tmp_path):
    model = lora(tiny_llama(), random_b=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ds = RecPreferenceDataset(WORLD.train, num_negatives=3)
    trainer = PreferenceTrainer(
        model,
        targs(tmp_path, max_steps=3, num_train_epochs=2),
        method="napo",
        train_dataset=ds,
        processing_class=TOK,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    for key in ("rewards/accuracies", "rewards/margins", "margin/gamma", "pool/size", "loss/preference"):
        assert key in logs[-1], key
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at start: policy == reference
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    assert float(trainer.criterion.margin.ema) != 0.0 and int(trainer.criterion.margin.steps) == 3
    ema = float(trainer.criterion.margin.ema)
    metrics = trainer.evaluate(RecPreferenceDataset(WORLD.val, num_negatives=3))
    assert "eval_loss" in metrics and "eval_rewards/accuracies" in metrics
    assert float(trainer.criterion.margin.ema) == ema  # evaluation does not move the EMA


def test_negatives_are_resampled_each_epoch(tmp_path):
    model = lora(tiny_llama())
    ds = RecPreferenceDataset(WORLD.train[:8], num_negatives=2)
    trainer = PreferenceTrainer(
        model,
        targs(tmp_path, max_steps=-1, num_train_epochs=2),
        method="s_dpo",
        train_dataset=ds,
        processing_class=TOK,
    )
    trainer.train()
    assert ds.epoch == 1


def test_margin_state_is_saved_and_restored(tmp_path):
    ds = RecPreferenceDataset(WORLD.train, num_negatives=3)
    model = lora(tiny_llama(), random_b=False)
    args = targs(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    trainer = PreferenceTrainer(model, args, method="napo", train_dataset=ds, processing_class=TOK)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    saved = torch.load(ckpt / LOSS_STATE_NAME, weights_only=True)
    assert float(saved["margin.ema"]) == float(trainer.criterion.margin.ema) != 0.0
    fresh = PreferenceTrainer(
        lora(tiny_llama(), random_b=False), args, method="napo", train_dataset=ds, processing_class=TOK
    )
    assert float(fresh.criterion.margin.ema) == 0.0
    fresh._load_from_checkpoint(str(ckpt))
    assert float(fresh.criterion.margin.ema) == float(saved["margin.ema"])
    # a resumed run continues the EMA: its step counter matches the global step, not the steps of this call
    fresh.train(resume_from_checkpoint=str(ckpt))
    assert int(fresh.criterion.margin.steps) == fresh.state.global_step >= 2
    assert not fresh.load_loss_state(str(tmp_path / "nowhere"))


def test_resuming_from_a_checkpoint_without_the_loss_state_warns(tmp_path):
    ds = RecPreferenceDataset(WORLD.train, num_negatives=3)
    args = targs(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)

    def trainer(method: str) -> PreferenceTrainer:
        model = lora(tiny_llama(), random_b=False)
        return PreferenceTrainer(model, args, method=method, train_dataset=ds, processing_class=TOK)

    trainer("napo").train()
    ckpt = tmp_path / "checkpoint-2"
    (ckpt / LOSS_STATE_NAME).unlink()  # as a checkpoint of a plain Trainer
    afresh = f"has no {LOSS_STATE_NAME}: the loss state \\(margin.ema, margin.steps\\) starts afresh"
    with pytest.warns(UserWarning, match=afresh):
        trainer("napo").train(resume_from_checkpoint=str(ckpt))
    with warnings.catch_warnings(record=True) as caught:  # a stateless loss loses nothing
        warnings.simplefilter("always")
        trainer("s_dpo").train(resume_from_checkpoint=str(ckpt))
    assert not [w for w in caught if LOSS_STATE_NAME in str(w.message)]


def test_full_finetuning_uses_a_frozen_copy_and_reference_free_mode(tmp_path):
    ds = RecPreferenceDataset(WORLD.train, num_negatives=2)
    model = tiny_llama()
    trainer = PreferenceTrainer(
        model, targs(tmp_path), method="s_dpo", train_dataset=ds, processing_class=TOK
    )
    assert trainer.reference == "model" and trainer.ref_model is not model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    batch = trainer.data_collator([ds[i] for i in range(4)])
    out = trainer.compute_loss(model, batch, return_outputs=True)[1]
    assert float(out.metrics["rewards/chosen"]) == pytest.approx(0.0, abs=1e-6)
    free = PreferenceTrainer(
        copy.deepcopy(model),
        targs(tmp_path),
        method="s_dpo",
        reference="none",
        train_dataset=ds,
        processing_class=TOK,
    )
    out = free.compute_loss(free.model, batch, return_outputs=True)[1]
    assert float(out.metrics["rewards/chosen"]) == pytest.approx(float(out.metrics["logps/chosen"]), rel=1e-5)


def test_sft_weight_adds_the_positive_nll(tmp_path):
    ds = RecPreferenceDataset(WORLD.train, num_negatives=2)
    model = lora(tiny_llama())
    plain = PreferenceTrainer(model, targs(tmp_path), method="dmpo", train_dataset=ds, processing_class=TOK)
    mixed = PreferenceTrainer(
        model, targs(tmp_path), method="dmpo", sft_weight=0.5, train_dataset=ds, processing_class=TOK
    )
    batch = plain.data_collator([ds[i] for i in range(3)])
    with torch.no_grad():
        a = plain.compute_loss(model, batch)
        b = mixed.compute_loss(model, batch)
    nll = mixed._buffered["train" if model.training else "eval"]["sft/nll_per_token"][-1]
    assert float(b - a) == pytest.approx(0.5 * nll, rel=1e-5)


def test_bad_configurations_are_rejected(tmp_path):
    ds = RecPreferenceDataset(WORLD.train, num_negatives=0)
    with pytest.raises(ValueError, match="method"):
        PreferenceTrainer(tiny_llama(), targs(tmp_path), method="ppo", train_dataset=ds, processing_class=TOK)
    with pytest.raises(ValueError, match="adapters"):
        PreferenceTrainer(
            tiny_llama(), targs(tmp_path), reference="adapters", train_dataset=ds, processing_class=TOK
        )
    with pytest.raises(ValueError, match="processing_class"):
        PreferenceTrainer(tiny_llama(), targs(tmp_path), train_dataset=ds)
    trainer = PreferenceTrainer(lora(tiny_llama()), targs(tmp_path), train_dataset=ds, processing_class=TOK)
    with pytest.raises(ValueError, match="num_negatives >= 1"):
        trainer.compute_loss(trainer.model, trainer.data_collator([ds[0], ds[1]]))
    assert isinstance(trainer.data_collator, CandidateCollator)
    assert os.path.isdir(tmp_path)
