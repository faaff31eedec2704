"""examples/study.py: the reward accuracy, the mean and standard error, the gain over the control in
standard errors, the option checks, and a tiny end-to-end study (table, plot, cache, the same
numbers whether its runs share one process or not)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from napo_kernels.recommender.data import RecExample

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "study.py"


@pytest.fixture(scope="module")
def study() -> ModuleType:
    spec = importlib.util.spec_from_file_location("study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # the worker processes import it by this name
    spec.loader.exec_module(module)
    return module


def _examples(targets: list[int], c: int = 4) -> list[RecExample]:
    cands = tuple(f"item {i}" for i in range(c))
    return [RecExample(("h",), cands, cands[t]) for t in targets]


def test_reward_accuracy_counts_pairs_with_ties_as_half(study):
    ex = _examples([0, 2])
    ref = torch.zeros(2, 4)
    assert study.reward_accuracy(ref.clone(), ref, ex) == 0.5  # the reference itself
    policy = torch.tensor([[3.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # prompt 0: 3 wins; prompt 1: 3 ties -> (3 + 1.5) / 6
    assert study.reward_accuracy(policy, ref, ex) == pytest.approx(4.5 / 6)
    # the reward is relative to the reference: a higher policy score on an item the reference
    # already liked more is not a win
    ref2 = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert study.reward_accuracy(policy, ref2, ex) == pytest.approx(1.5 / 6)
    # absent candidates (-inf) are not pairs
    policy[0, 3] = ref[0, 3] = float("-inf")
    assert study.reward_accuracy(policy, ref, ex) == pytest.approx((2 + 1.5) / 5)


def test_mean_and_standard_error(study):
    m, se = study.mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))
    assert math.isnan(study.mean_se([4.0])[1])


def test_gain_over_control_in_standard_errors_of_the_difference(study):
    def run(arm, hr):
        return {"arm": arm, "metrics": {key: hr for key, _ in study.COLUMNS}}

    runs = [run("control", v) for v in (0.10, 0.12, 0.14)] + [run("napo", v) for v in (0.20, 0.21, 0.22)]
    stats = study.summarise(runs, ["control", "napo"])
    se_c, se_n = 0.02 / math.sqrt(3), 0.01 / math.sqrt(3)
    gain, z = stats["napo"]["gain"]
    assert gain == pytest.approx(0.09) and z == pytest.approx(0.09 / math.hypot(se_c, se_n))
    assert "gain" not in stats["control"]
    assert all(math.isnan(v) for v in stats["napo"]["paired"])  # no per-prompt hits in these runs


def test_paired_gain_over_the_prompts(study):
    control = [{"val_hits": [0, 0, 1, 1]}, {"val_hits": [0, 0, 1, 1]}]
    arm = [{"val_hits": [1, 0, 1, 1]}, {"val_hits": [1, 0, 1, 1]}]
    # per-prompt differences [1, 0, 0, 0]: mean 0.25, standard error 0.5 / 2
    assert study.paired_gain(arm, control) == pytest.approx((0.25, 1.0))
    arm[1]["val_hits"] = [0, 0, 1, 1]  # seeds average per prompt first: [0.5, 0, 0, 0]
    assert study.paired_gain(arm, control) == pytest.approx((0.125, 1.0))


def test_recipe_and_grid_checks(study):
    assert study.Recipe().negatives_of("dpo") == 1 and study.Recipe().negatives_of("dynamicpo") == 5
    assert study.Recipe(k=7).negatives_of("napo") == 7 and study.Recipe(k=7).negatives_of("dpo") == 1
    assert study.Recipe().negatives_of("control") == 0
    assert study.parse_grid(["lr=1e-3,3e-3", "k=2", "tuning=full"]) == {
        "lr": [1e-3, 3e-3],
        "k": [2],
        "tuning": ["full"],
    }
    with pytest.raises(ValueError, match="KEY one of"):
        study.parse_grid(["rate=1"])
    with pytest.raises(ValueError, match="not a number"):
        study.parse_grid(["steps=many"])
    with pytest.raises(ValueError, match="tuning='half'"):
        study.Recipe(tuning="half")
    assert (
        study.Recipe(lr=3e-3).name(study.Recipe()) == "lr=0.003"
        and study.Recipe().name(study.Recipe()) == "base"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "tuning=half"], "tuning='half'"),
        (["--grid", "x=1"], "KEY one of"),
        (["--seeds", "0"], ">= 1"),
    ],
)
def test_bad_options_stop_before_any_training(study, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        study.main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_every_option_has_help_that_gives_its_default(study):
    parser = study.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        assert action.help and "default" in formatter._get_help_string(action), action.option_strings


TINY = [
    "--arms", "control", "napo", "--seeds", "2", "--steps", "3", "--max-train", "48", "--world-val", "24",
    "--hidden", "32", "--layers", "1", "--vocab-size", "300", "--sft-epochs", "0.5", "--batch-size", "8",
    "--curve-every", "1", "--curve-prompts", "8", "--train-acc-prompts", "8", "--quiet",
]  # fmt: skip


@pytest.mark.slow
def test_tiny_study_end_to_end(study, tmp_path, capsys):
    report = study.main([*TINY, "--jobs", "1", "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "2 run(s) to train" not in out and "4 run(s) to train" in out
    (name,) = report
    stats = report[name]["stats"]
    assert set(stats) == {"control", "napo"} and "gain" in stats["napo"]
    text = (tmp_path / "a" / "tables.md").read_text()
    assert "SFT continued (control)" in text and "±" in text and "over 2 seeds" in text
    assert (tmp_path / "a" / report[name]["plot"]).stat().st_size > 10_000
    assert "| steps=3 sft_epochs=0.5 | 2 | 2 | NAPO |" in (tmp_path / "a" / "sweep.md").read_text()
    runs = sorted((tmp_path / "a" / "runs").glob("*.json"))
    assert len(runs) == 4
    for path in runs:
        res = json.loads(path.read_text())
        assert [p["step"] for p in res["curve"]] == [0, 1, 2, 3]
        assert 0.0 <= res["metrics"]["reward_acc/val"] <= 1.0
        assert sum(res["val_hits"]) / 24 == pytest.approx(res["metrics"]["rank/HR@1"])
    # the preference runs move the rewards away from the SFT model's 0.5; the seeds differ
    napo = [json.loads(p.read_text()) for p in runs if json.loads(p.read_text())["arm"] == "napo"]
    assert all(r["metrics"]["reward_acc/train"] != 0.5 for r in napo)
    assert napo[0]["curve"][-1] != napo[1]["curve"][-1]

    # rerun: everything comes from the cache
    study.main([*TINY, "--jobs", "1", "--out", str(tmp_path / "a")])
    assert "to train" not in capsys.readouterr().out
    # a recipe that changes only the preference loss shares the control's runs
    study.main([*TINY, "--jobs", "1", "--beta", "0.5", "--out", str(tmp_path / "a")])
    assert "2 run(s) to train (2 cached)" in capsys.readouterr().out
    sweep = (tmp_path / "a" / "sweep.md").read_text()
    assert (
        "| steps=3 beta=0.5 sft_epochs=0.5 | 2 | 2 | NAPO |" in sweep and "2 configuration(s) tried" in sweep
    )

    # two worker processes give the same numbers as one process
    study.main([*TINY, "--jobs", "2", "--out", str(tmp_path / "b")])
    for path in runs:
        other = json.loads((tmp_path / "b" / "runs" / path.name).read_text())
        assert other["metrics"] == json.loads(path.read_text())["metrics"]
