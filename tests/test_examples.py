"""The examples: train_recommender.py's options (help, defaults, errors before any training), the
folders it writes, and a run interrupted and resumed from its checkpoints equals the whole run;
quickstart.py prints the same losses on every run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import runpy
import shutil
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPT = EXAMPLES / "train_recommender.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_recommender", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_option_has_help_that_gives_its_default(script):
    parser = script.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        assert action.help, action.option_strings
        assert "default" in formatter._get_help_string(action), action.option_strings
    text = parser.format_help()
    assert "(default: 16)" in text and "(default: sft napo)" in text and "(default: None)" not in text


def test_negatives_default_per_method_unless_given(script):
    args = script.parse_args([])
    assert [script.negatives(m, args) for m in ("dpo", "s_dpo", "dmpo", "napo", "dynamicpo")] == [
        1,
        3,
        3,
        3,
        5,
    ]
    args = script.parse_args(["--num-negatives", "2", "--methods", "napo"])
    assert script.negatives("napo", args) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-negatives", "0"], "argument --num-negatives: must be >= 1, got 0"),
        (
            ["--methods", "dpo", "napo", "--num-negatives", "3"],
            "--num-negatives 3: dpo compares each",
        ),
        (["--beta", "0"], "--beta 0.0 with --methods napo: beta must be a finite number > 0"),
        (["--beta", "nan"], "--beta nan with --methods napo: beta must be a finite number, got nan"),
        (["--pref-lr", "-1"], "argument --pref-lr: must be > 0.0, got -1"),
        (["--pref-steps", "x"], "argument --pref-steps: expected an integer, got 'x'"),
        (["--vocab-size", "100"], "argument --vocab-size: must be >= 300, got 100"),
        (["--hidden", "160"], "--hidden 160: 5 attention heads cannot split it or share 2 key-value heads"),
        (
            ["--data", "/nonexistent"],
            "--data /nonexistent: expected train.json (or",
        ),
        (["--save-total-limit", "2"], "--save-total-limit needs --checkpoint-dir"),
        (
            ["--resume-from-checkpoint"],
            "without a path resumes from --checkpoint-dir",
        ),
        (
            ["--methods", "s_dpo", "napo", "--resume-from-checkpoint", "ck"],
            "belongs to one preference method",
        ),
        (
            ["--methods", "napo", "--resume-from-checkpoint", "/"],
            "/: not a checkpoint (no trainer_",
        ),
        (["--fsdp"], "--fsdp shards the model across processes: run under torchrun"),
        (["--fsdp", "--zero3"], "argument --zero3: not allowed with argument --fsdp"),
    ],
)
def test_bad_arguments_stop_before_any_training(script, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(script, "run", lambda args: pytest.fail("training started"))
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


TINY = [
    *("--max-train 16 --max-eval 4 --hidden 32 --layers 1 --vocab-size 300 --sft-epochs 1".split()),
    *("--pref-steps 4 --batch-size 4 --logging-steps 1 --no-generation --quiet --threads 0".split()),
    *("--methods sft napo".split()),
]


def _comparable(results: dict) -> dict:
    """Every figure of the runs but the timings and where they resumed from."""
    skip = {"eval_seconds", "train_seconds", "resumed_from"}
    return {run: {k: v for k, v in res.items() if k not in skip} for run, res in results["runs"].items()}


def test_checkpoints_only_where_asked_and_a_resumed_run_equals_the_whole_one(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script.main([*TINY, "--out", "out/plain.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no runs/ nor Trainer folders

    whole = script.main([*TINY, "--checkpoint-dir", "ck", "--save-steps", "2", "--out", "out/whole.json"])
    assert _comparable(whole) == _comparable(json.loads(Path("out/plain.json").read_text()))
    assert sorted(p.name for p in Path("ck").iterdir()) == ["napo", "sft", "sft-model"]
    assert sorted(p.name for p in Path("ck/napo").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    # interrupted in both stages after step 2: the SFT model was not saved yet, nor either step 4
    for path in ("ck/sft-model", "ck/sft/checkpoint-4", "ck/napo/checkpoint-4"):
        shutil.rmtree(path)
    argv = [*TINY, "--checkpoint-dir", "ck", "--save-steps", "2", "--out", "out/resumed.json"]
    resumed = script.main([*argv, "--resume-from-checkpoint"])
    assert resumed["runs"]["sft"]["resumed_from"] == "ck/sft/checkpoint-2"
    assert resumed["runs"]["napo"]["resumed_from"] == "ck/napo/checkpoint-2"
    expected = _comparable(whole)
    assert _comparable(resumed) == expected  # bit for bit: the last log's loss, margin, grad norm
    assert resumed["runs"]["napo"]["last_log"]["step"] == 4

    # one method from one checkpoint, on the saved SFT model
    argv = [*TINY, "--methods", "napo", "--sft-checkpoint", "ck/sft-model", "--out", "out/one.json"]
    one = script.main([*argv, "--resume-from-checkpoint", "ck/napo/checkpoint-2"])
    assert _comparable(one) == {"napo": expected["napo"]}


def test_quickstart_is_seeded(capsys):
    runs = []
    for _ in range(2):
        runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and runs[0].count("loss") == 8
