"""Evaluation: metric definitions against brute-force versions, candidate scoring against plain
forwards, batched greedy generation against one-prompt decoding, AUC and popularity metrics."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_llama as build_tiny_llama
from transformers import LlamaForCausalLM

from napo_kernels import reference
from napo_kernels.recommender.data import (
    ItemPopularity,
    PairExample,
    RecExample,
    RecPromptTemplate,
    generate_world,
    train_bpe_tokenizer,
)
from napo_kernels.recommender.evaluation import (
    evaluate_recommender,
    generate_answers,
    generation_metrics,
    pairwise_auc,
    parse_generation,
    popularity_metrics,
    ranking_metrics,
    roc_auc,
    score_candidates,
    score_features,
)
from napo_kernels.recommender.packing import CandidateCollator

WORLD = generate_world(
    num_items=40,
    num_genres=3,
    genre_words=3,
    common_words=10,
    num_candidates=6,
    min_history=2,
    max_history=4,
    num_train=12,
    num_val=6,
    num_test=2,
    seed=2,
)
T = RecPromptTemplate()
TOK = train_bpe_tokenizer([T.prompt(e.history, e.candidates) for e in WORLD.train] * 3 + WORLD.items, 320)


def tiny_llama() -> LlamaForCausalLM:
    return build_tiny_llama(TOK, seed=1).eval()


MODEL = tiny_llama()


def brute_rank(scores, target):
    """1-based rank with ties against the model, by sorting."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j != target))
    worst = [j for j in order if scores[j] == scores[target]][-1]
    return order.index(worst) + 1


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.lists(st.integers(-3, 3).map(float), min_size=2, max_size=8).flatmap(
            lambda row: st.tuples(st.just(row), st.integers(0, len(row) - 1))
        ),
        min_size=1,
        max_size=6,
    )
)
def test_ranking_metrics_match_brute_force(data):
    width = max(len(r) for r, _ in data)
    scores = torch.full((len(data), width), float("-inf"))
    for i, (row, _) in enumerate(data):
        scores[i, : len(row)] = torch.tensor(row)
    target = [t for _, t in data]
    ranks = [brute_rank(row, t) for row, t in data]
    m = ranking_metrics(scores, target)
    assert m["HR@1"] == pytest.approx(sum(r == 1 for r in ranks) / len(ranks))
    assert m["MRR"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks))
    assert m["NDCG@5"] == pytest.approx(sum(1 / math.log2(r + 1) for r in ranks if r <= 5) / len(ranks))
    assert m["HR@10"] == pytest.approx(sum(r <= 10 for r in ranks) / len(ranks))


def test_ranking_metrics_ties_count_against_and_errors():
    assert ranking_metrics(torch.tensor([[1.0, 1.0, 0.0]]), [0])["HR@1"] == 0.0
    assert ranking_metrics(torch.tensor([[2.0, 1.0, 0.0]]), [0])["NDCG@5"] == 1.0
    with pytest.raises(ValueError, match="target_index"):
        ranking_metrics(torch.zeros(2, 3), [0, 3])
    with pytest.raises(ValueError, match="-inf"):
        ranking_metrics(torch.tensor([[0.0, float("-inf")]]), [1])


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(-4, 4), st.booleans()), min_size=2, max_size=30))
def test_roc_auc_matches_pair_counting(pairs):
    pos = [s for s, y in pairs if y]
    neg = [s for s, y in pairs if not y]
    if not pos or not neg:
        with pytest.raises(ValueError, match="positive and one negative"):
            roc_auc([s for s, _ in pairs], [int(y) for _, y in pairs])
        return
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert roc_auc([s for s, _ in pairs], [int(y) for _, y in pairs]) == pytest.approx(
        wins / (len(pos) * len(neg))
    )


def test_generation_protocol_valid_iff_exactly_one_title():
    cands = ("Rock Band", "Jazz Trio", "Rock")
    assert parse_generation(" Jazz Trio", cands) == "Jazz Trio"
    assert parse_generation(" Rock Band", cands) is None  # "Rock" is inside: two titles appear
    assert parse_generation("nothing", cands) is None
    ex = [RecExample(("a",), cands, "Jazz Trio"), RecExample(("b",), cands, "Jazz Trio")]
    m, picks = generation_metrics([" Jazz Trio</s>", "Rock Band"], ex)
    assert m == {"HR@1": 0.5, "ValidRatio": 0.5} and picks == ["Jazz Trio", None]


def test_popularity_metrics_by_hand():
    pop = ItemPopularity({"hit": 10, "mid": 3, "rare": 1, "rarer": 1, "none": 0})  # head: "hit"
    m = popularity_metrics(["hit", "hit", None], ["rare", "mid"], pop)
    assert m["top1_percentile"] == pytest.approx(pop.percentile("hit"))
    assert m["true_percentile"] == pytest.approx((pop.percentile("rare") + pop.percentile("mid")) / 2)
    assert m["count_ratio"] == pytest.approx(10 / 2)
    assert m["long_tail_share"] == 0.0 and m["true_long_tail_share"] == 1.0


def test_candidate_scores_equal_plain_forwards():
    examples = WORLD.val[:3]
    scores = score_candidates(MODEL, TOK, examples, T, batch_size=2, progress=False)
    col = CandidateCollator(TOK)
    for i, e in enumerate(examples):
        p = col.prompt_ids(T.prompt(e.history, e.candidates))
        for j, c in enumerate(e.candidates):
            ids = col.answer_ids(T.answer(c))
            with torch.no_grad():
                logits = MODEL(torch.tensor([p + ids])).logits[0, len(p) - 1 : len(p) + len(ids) - 1]
            truth = float(reference.sequence_scores_from_logits(logits, torch.tensor(ids)))
            assert float(scores[i, j]) == pytest.approx(truth, abs=1e-4)
    ragged = score_features(
        MODEL,
        TOK,
        [{"prompt": "x", "candidates": [" a", " b"]}, {"prompt": "y", "candidates": [" c"]}],
        progress=False,
    )
    assert ragged.shape == (2, 2) and ragged[1, 1] == float("-inf") and torch.isfinite(ragged[0]).all()


def test_batched_generation_equals_one_prompt_greedy_decoding():
    prompts = [T.prompt(e.history, e.candidates) for e in WORLD.val[:3]]  # different lengths: left padding
    batched = generate_answers(MODEL, TOK, prompts, max_new_tokens=6, batch_size=3, progress=False)
    col = CandidateCollator(TOK)
    for prompt, out in zip(prompts, batched):
        ids = torch.tensor([col.prompt_ids(prompt)])
        for _ in range(6):  # greedy decoding by hand
            with torch.no_grad():
                nxt = MODEL(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if int(nxt) == TOK.eos_token_id:
                break
        assert out == TOK.decode(ids[0, len(col.prompt_ids(prompt)) :], skip_special_tokens=True)


def test_pairwise_auc_follows_the_seeded_protocol():
    pairs = [PairExample(f"rank {i}", f" good {i}", (f" bad {i}",)) for i in range(12)]
    auc = pairwise_auc(MODEL, TOK, pairs, progress=False)
    features = [
        {
            "prompt": f"### Instruction:\n{p.prompt}\n\n### Response:\n",
            "candidates": [p.chosen, p.rejected[0]],
        }
        for p in pairs
    ]
    scores = score_features(MODEL, TOK, features, reduction="mean", progress=False)
    rng = random.Random(42)
    labels = [1 if rng.random() < 0.5 else 0 for _ in pairs]
    assert auc == pytest.approx(
        roc_auc([float(scores[i, 0 if y else 1]) for i, y in enumerate(labels)], labels)
    )
    with pytest.raises(ValueError, match="rejected"):
        pairwise_auc(MODEL, TOK, [PairExample("p", "a")], progress=False)


def test_evaluate_recommender_reports_every_protocol():
    pop = ItemPopularity.from_examples(WORLD.train)
    res = evaluate_recommender(
        MODEL, TOK, WORLD.val, T, popularity=pop, max_new_tokens=4, batch_size=4, progress=False
    )
    for key in (
        "rank/HR@1",
        "rank/NDCG@5",
        "rank/NDCG@10",
        "rank/MRR",
        "gen/HR@1",
        "gen/ValidRatio",
        "rank/pop/top1_percentile",
        "rank/pop/long_tail_share",
        "gen/pop/true_percentile",
    ):
        assert key in res, key
    assert 0.0 <= res["rank/HR@1"] <= res["rank/HR@5"] <= 1.0
    assert MODEL.training is False
