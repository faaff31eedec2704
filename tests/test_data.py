"""Data layer: readers of the papers' formats, negative sampling, the synthetic world, popularity."""

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napo_kernels.recommender.data import (
    ItemPopularity,
    NegativeSampler,
    PairPreferenceDataset,
    RecExample,
    RecPreferenceDataset,
    RecPromptTemplate,
    generate_world,
    parse_rec_records,
    read_alpaca_pairs,
    read_id2name,
    read_rec_json,
    reverse_ranking,
    train_bpe_tokenizer,
    write_rec_json,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real data not found at {SHARED} (../shared/data)"
)

RECORDS = [
    {"historyList": "A::B::C", "itemList": ["X", "A2", "Y"], "trueSelection": "Y"},
    {"historyList": ["D"], "itemList": ["Z", "W"], "trueSelection": "Z"},
]


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_rec_json_round_trip(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(path, "wt") as f:
        json.dump(RECORDS, f)
    ex = read_rec_json(path)
    assert ex[0] == RecExample(("A", "B", "C"), ("X", "A2", "Y"), "Y")
    assert ex[0].target_index == 2 and ex[0].negatives() == ["X", "A2"]
    assert ex[1].history == ("D",)
    write_rec_json(tmp_path / f"copy{suffix}", ex)
    assert read_rec_json(tmp_path / f"copy{suffix}") == ex
    assert read_rec_json(path, limit=1) == ex[:1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"historyList": "A", "itemList": ["X"]}, "record 1: missing field 'trueSelection'"),
        ({"historyList": "A", "itemList": ["X", "Y"], "trueSelection": "Q"}, "record 1: trueSelection 'Q'"),
        (
            {"historyList": "A", "itemList": ["X", "X"], "trueSelection": "X"},
            "record 1: itemList has duplicate",
        ),
        ({"historyList": "A", "itemList": [], "trueSelection": "X"}, "record 1: itemList is empty"),
    ],
)
def test_rec_records_errors_name_the_record(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_rec_records([RECORDS[0], bad])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rec_json(tmp_path / "nope.json")


def test_alpaca_and_id2name(tmp_path):
    rows = [
        {"instruction": "rank A B", "input": "", "output": ["A, B", "B, A"]},
        {"instruction": "rank C D", "input": "ctx", "output": "C, D"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pairs = read_alpaca_pairs(tmp_path / "a.json")
    assert pairs[0].prompt == "rank A B" and pairs[0].chosen == "A, B" and pairs[0].rejected == ("B, A",)
    assert pairs[1].prompt == "rank C D\nctx" and pairs[1].rejected == ()
    assert read_alpaca_pairs(tmp_path / "a.json", reverse_rankings=False)[1].rejected == ()
    rows[1]["output"] = " <Title:C > ,  <Title:D > "
    (tmp_path / "r.json").write_text(json.dumps(rows))
    assert read_alpaca_pairs(tmp_path / "r.json", reverse_rankings=True)[1].rejected == (
        " <Title:D > ,  <Title:C > ",
    )
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "x", "output": ["only one"]}]))
    with pytest.raises(ValueError, match="record 0: output"):
        read_alpaca_pairs(tmp_path / "b.json")
    (tmp_path / "id2name.txt").write_text("0::Morcheeba\n1::A::B\n")
    assert read_id2name(tmp_path / "id2name.txt") == {0: "Morcheeba", 1: "A::B"}
    (tmp_path / "bad.txt").write_text("x::y\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_id2name(tmp_path / "bad.txt")


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(0, 6),
    pool_size=st.integers(0, 8),
    index=st.integers(0, 1000),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["resample", "fixed"]),
)
def test_negative_sampler(k, pool_size, index, seed, mode):
    pool = [f"item{i}" for i in range(pool_size)]
    s = NegativeSampler(k, mode, seed)
    a = s.sample(pool, index, epoch=0)
    assert len(a) == min(k, pool_size) and len(set(a)) == len(a) and set(a) <= set(pool)
    assert a == NegativeSampler(k, mode, seed).sample(pool, index, epoch=0)  # reproducible
    if mode == "fixed":
        assert s.sample(pool, index, epoch=5) == a


def test_resampling_changes_negatives_across_epochs():
    pool = [f"item{i}" for i in range(19)]
    s = NegativeSampler(3, "resample", seed=1)
    draws = {tuple(s.sample(pool, 7, epoch=e)) for e in range(10)}
    assert len(draws) > 5
    # every item is drawn eventually: uniform over the pool, not a fixed prefix
    counts = Counter(x for e in range(400) for x in s.sample(pool, 3, epoch=e))
    assert set(counts) == set(pool) and max(counts.values()) < 2.0 * min(counts.values())


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        NegativeSampler(-1)
    with pytest.raises(ValueError, match="mode"):
        NegativeSampler(2, mode="sometimes")


def test_rec_dataset_positive_first_and_epochs():
    world = generate_world(num_train=20, num_val=2, num_test=2)
    t = RecPromptTemplate(domain="song")
    ds = RecPreferenceDataset(world.train, t, num_negatives=3, seed=0)
    item = ds[4]
    e = world.train[4]
    assert item["candidates"][0] == t.answer(e.target) and len(item["candidates"]) == 4
    assert all(c.strip() in e.candidates and c.strip() != e.target for c in item["candidates"][1:])
    assert "song" in item["prompt"] and all(title in item["prompt"] for title in e.candidates)
    assert item["history"] == [t.answer(h) for h in e.history]
    before = [ds[i]["candidates"] for i in range(len(ds))]
    ds.set_epoch(1)
    assert [ds[i]["candidates"] for i in range(len(ds))] != before
    assert len(RecPreferenceDataset(world.train, t, num_negatives=0)[0]["candidates"]) == 1


def test_pair_dataset():
    from napo_kernels.recommender.data import PairExample

    ds = PairPreferenceDataset([PairExample("p", "good", ("bad1", "bad2"))], num_negatives=1)
    assert ds[0]["candidates"] == ["good", "bad1"] and "p" in ds[0]["prompt"]


def test_synthetic_world_is_seeded_and_well_formed(tmp_path):
    w = generate_world(num_train=300, num_val=50, num_test=50, seed=3)
    assert generate_world(num_train=300, num_val=50, num_test=50, seed=3).train == w.train
    assert generate_world(num_train=300, num_val=50, num_test=50, seed=4).train != w.train
    assert len(set(w.items)) == len(w.items) == w.config.num_items
    for e in w.train + w.val:
        assert len(e.candidates) == 20 and len(set(e.candidates)) == 20 and e.target in e.candidates
        assert 3 <= len(e.history) <= 10 and not set(e.history) & set(e.candidates)
    # the learnable signal: the target's genre is the history's majority genre far above chance
    genre = dict(zip(w.items, w.genre))
    majority = [Counter(genre[h] for h in e.history).most_common(1)[0][0] == genre[e.target] for e in w.train]
    assert sum(majority) / len(majority) > 2.0 / w.config.num_genres
    # long-tailed popularity: the top 20% of items take far more than 20% of the interactions
    pop = ItemPopularity.from_examples(w.train)
    counts = sorted(pop.counts.values(), reverse=True)
    assert sum(counts[: len(counts) // 5]) > 0.4 * sum(counts)
    d = w.save(tmp_path / "world")
    assert read_rec_json(d / "val.json") == w.val
    assert len(read_id2name(d / "id2name.txt")) == w.config.num_items


def test_world_config_validation():
    with pytest.raises(ValueError, match="num_candidates"):
        generate_world(num_candidates=1)
    with pytest.raises(ValueError, match="num_items"):
        generate_world(num_items=20)


def test_popularity_percentiles_and_long_tail():
    pop = ItemPopularity({"a": 10, "b": 5, "c": 5, "d": 1}, catalogue=["e"], head_fraction=0.2)
    # sorted counts 0 1 5 5 10: mid-ranks
    assert pop.percentile("a") == pytest.approx(4.5 / 5)
    assert pop.percentile("b") == pytest.approx((2 + 1.0) / 5)
    assert pop.percentile("e") == pytest.approx(0.5 / 5) == pop.percentile("unknown")
    assert pop.head_threshold == 10 and not pop.is_long_tail("a") and pop.is_long_tail("b")
    ex = [RecExample(("a", "b"), ("c", "a"), "c"), RecExample(("a",), ("c", "d"), "d")]
    both = ItemPopularity.from_examples(ex)
    assert both.counts == {"a": 2, "b": 1, "c": 1, "d": 1}
    assert ItemPopularity.from_examples(ex, source="target").counts == {"a": 0, "b": 0, "c": 1, "d": 1}
    with pytest.raises(ValueError, match="source"):
        ItemPopularity.from_examples(ex, source="clicks")
    with pytest.raises(ValueError, match="head_fraction"):
        ItemPopularity({"a": 1}, head_fraction=1.5)


def test_bpe_tokenizer_prompts_get_bos_answers_do_not():
    tok = train_bpe_tokenizer(["the velvet moons", "kaisha troubux"] * 20, vocab_size=320)
    p = tok("the velvet moons")["input_ids"]
    a = tok(" kaisha troubux", add_special_tokens=False)["input_ids"]
    assert p[0] == tok.bos_token_id and tok.bos_token_id not in a
    assert (
        tok.decode(a) == " kaisha troubux" and tok.pad_token_id is not None and tok.eos_token_id is not None
    )


@needs_shared
def test_real_lastfm_and_dmpo_files_parse():
    val = read_rec_json(SHARED / "lastfm-cans20" / "val.json")
    assert len(val) == 2767 and all(len(e.candidates) == 20 for e in val)
    assert len(read_id2name(SHARED / "lastfm-cans20" / "id2name.txt")) > 4000
    pairs = read_alpaca_pairs(SHARED / "dmpo-ml1m" / "eval_ranking.json", reverse_rankings=True)
    assert len(pairs) == 1000 and all(len(p.rejected) == 1 for p in pairs)
    rows = read_alpaca_pairs(SHARED / "dmpo-ml1m" / "dpo_ranking_1.json")
    assert all(reverse_ranking(p.chosen) == p.rejected[0] for p in rows)  # the same convention
    sft = read_alpaca_pairs(SHARED / "dmpo-ml1m" / "sft_ranking.json")
    assert len(sft) == 100 and all(p.rejected == () for p in sft)
