"""The benchmark suite cannot rot: every contender computes the reference loss and gradients, the
memory counter counts, the bars judge what the rows say, and the CLI runs end to end on tiny
shapes (including the triton backend under the interpreter)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the suite lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

from benchmarks import bars  # noqa: E402
from benchmarks.cases import Shape, dense_shape, make_inputs, rec_shape  # noqa: E402
from benchmarks.contenders import NotApplicable, prepare  # noqa: E402
from benchmarks.measure import probe_one, relative_errors  # noqa: E402
from napo_kernels import reference  # noqa: E402

TINY_REC = Shape(prompts=3, negatives=2, prompt_len=5, answer_len=3, hidden=16, vocab=50)
TINY_DENSE = Shape(prompts=2, negatives=1, prompt_len=0, answer_len=6, hidden=16, vocab=50, method="dpo",
                   sharing="own")  # fmt: skip


def _reference(shape: Shape) -> dict[str, torch.Tensor]:
    """Loss and gradients by plain autograd on the reference math (independent of the contenders)."""
    x = make_inputs(shape)
    scores = reference.sequence_scores(x.hidden, x.weight, x.labels)
    loss, _ = reference.family_loss(scores[:, 0], scores[:, 1:], method=shape.method, sharing=shape.sharing)
    loss.backward()
    out = {"loss": loss.detach(), "hidden": x.hidden.grad}
    if shape.trainable:
        out["weight"] = x.weight.grad
    return out


def _contender_case(name: str) -> tuple[str, Shape]:
    if name == "liger":
        pytest.importorskip("liger_kernel", reason="optional benchmark dependency liger-kernel not installed")
        return name, TINY_DENSE
    if name == "cce":
        pytest.importorskip(
            "cut_cross_entropy", reason="optional benchmark dependency cut-cross-entropy not installed"
        )
    return name, TINY_REC


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("name", ["plain", "sliced", "compile", "cce", "liger", "napo-torch"])
def test_contender_matches_reference(name: str, trainable: bool) -> None:
    name, shape = _contender_case(name)
    shape = replace(shape, trainable=trainable)
    want = _reference(shape)
    prep = prepare(name, shape, make_inputs(shape))
    for _ in range(2):  # a second step must not accumulate into the first one's gradients
        prep.reset()
        loss = prep.run()
    got = {"loss": loss} | prep.grads()
    assert set(got) == set(want)
    errors = relative_errors(got, want)
    assert max(errors.values()) < 1e-4, errors


def test_liger_refuses_shared_pool() -> None:
    pytest.importorskip("liger_kernel", reason="optional benchmark dependency liger-kernel not installed")
    with pytest.raises(NotApplicable, match="shared multi-negative pool"):
        prepare("liger", TINY_REC, make_inputs(TINY_REC))


def test_bare_gemm_step_runs_the_counted_products() -> None:
    shape = replace(TINY_REC, trainable=True)
    prep = prepare("bare", shape, make_inputs(shape))
    prep.run()
    assert "3 GEMMs on 27 scored rows" in prep.note


def test_memory_counter_sees_the_logits() -> None:
    """Plain PyTorch materialises [S, T, V] logits and their log_softmax: the allocator-level peak
    must be at least both; napo-kernels keeps one chunk and must stay below one full logits tensor."""
    shape = replace(TINY_REC, vocab=4000)
    logits = shape.all_rows * shape.vocab * 4
    plain = probe_one(shape, "plain", "cpu")
    napo = probe_one(shape, "napo-torch", "cpu")
    assert plain["status"] == napo["status"] == "ok"
    assert plain["peak_bytes"] >= 2 * logits
    assert 0 < napo["peak_bytes"] < logits


def _row(name: str, median_s: float, peak: int) -> dict:
    return {"contender": name, "label": name, "status": "ok", "median_s": median_s, "peak_bytes": peak}


def test_bars_judge_the_rows() -> None:
    rows = [
        _row("plain", 10.0, 2000),
        _row("sliced", 1.0, 500),
        _row("bare", 0.8, 0),
        _row("napo-torch", 0.9, 50),
    ]
    table = {"case": "rec", "variant": "frozen", "napo": "napo-torch", "rows": rows}
    pool = {"variant": "frozen", "own": {"pool": 3, "row": _row("own", 1.0, 1)},
            "all": {"pool": 93, "row": _row("all", 1.06, 1)}}  # fmt: skip
    judged = {b.name: b for b in bars.judge([table], pool)}
    mem = judged["rec frozen: plain / napo peak extra memory"]
    assert mem.passed and mem.measured == pytest.approx(40.0)
    assert judged["rec frozen: plain / napo time"].passed  # 11.1x >= 5x
    assert judged["rec frozen: napo / sliced time"].passed  # 0.9 <= 1.0
    assert judged["rec frozen: sliced / napo peak extra memory"].passed  # 10x >= 5x
    limit = judged["rec frozen: napo / bare-GEMM limit"]
    assert limit.measured == pytest.approx(0.9 / 0.8) and limit.passed is False  # > 1.05
    fastest = judged["rec frozen: napo / fastest other contender time"]
    assert fastest.passed and fastest.measured == pytest.approx(0.9) and fastest.detail == "fastest: sliced"
    assert judged["pool 3 -> 93 negatives/prompt (frozen): time all / own"].passed is False  # 1.06 > 1.05
    rows[1]["status"] = "error"  # a contender that did not run is never passed
    judged = {b.name: b for b in bars.judge([table], None)}
    assert judged["rec frozen: napo / sliced time"].passed is None


def test_memory_bars_fall_back_only_when_the_gradients_exceed_the_budget() -> None:
    def row(name: str, peak: int, beyond: int) -> dict:
        return {**_row(name, 1.0, peak), "beyond_grads_bytes": beyond}

    # trainable: 1000 bytes of gradients; sliced 1200 / 5 = 240 < 1000: judged beyond the gradients
    rows = [row("sliced", 1200, 200), row("napo-cpp", 1010, 10), row("plain", 30000, 29000)]
    table = {"case": "rec", "variant": "trainable", "napo": "napo-cpp", "rows": rows}
    judged = {b.name: b for b in bars.judge([table], None)}
    beyond = judged["rec trainable: sliced / napo memory beyond returned grads"]
    assert beyond.passed and beyond.measured == pytest.approx(20.0) and "exceed the budget" in beyond.detail
    # plain 30000 / 20 = 1500 >= 1000: feasible, so judged on the total (29.7x)
    assert judged["rec trainable: plain / napo peak extra memory"].measured == pytest.approx(30000 / 1010)
    # an implementation far above the floor still misses on the fallback
    rows[1].update(peak_bytes=1100, beyond_grads_bytes=100)
    judged = {b.name: b for b in bars.judge([table], None)}
    assert judged["rec trainable: sliced / napo memory beyond returned grads"].passed is False  # 2x < 5x


def test_busy_core_bars_and_spinner() -> None:
    """``--busy-core``: the spinner runs only inside the block; its bars compare napo-kernels with
    the torch backend and the bare products of the same (busy) run."""
    from benchmarks import contention

    with contention.BusyCore() as busy:
        assert busy.proc.poll() is None  # spinning
    assert busy.proc is None
    rows = [_row("bare", 1.0, 0), _row("napo-torch", 1.2, 0), _row("napo-cpp", 1.4, 0)]
    table = {"case": "rec", "variant": "frozen", "napo": "napo-cpp", "rows": rows}
    dense = {**table, "case": "dense"}
    judged = {b.name: b for b in contention.judge([table, dense])}
    assert set(judged) == {"rec frozen, one core busy: napo / torch backend",
                           "rec frozen, one core busy: napo / bare-GEMM limit"}  # fmt: skip
    torch_bar = judged["rec frozen, one core busy: napo / torch backend"]
    assert torch_bar.passed is False and torch_bar.measured == pytest.approx(1.4 / 1.2)  # > 1.1
    assert judged["rec frozen, one core busy: napo / bare-GEMM limit"].passed  # 1.4 <= 1.5


def test_quick_shapes_are_small() -> None:
    for shape in (rec_shape(True), dense_shape(True)):
        assert shape.all_rows * shape.vocab < 100_000


@pytest.mark.slow  # the whole CLI on the quick suite (about a minute)
def test_cli_quick_end_to_end(tmp_path: Path) -> None:
    """``python -m benchmarks --quick`` on tiny shapes, with the triton backend under the interpreter."""
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--case", "rec,scaling", "--sweeps", "pool",
           "--contenders", "plain,sliced,bare", "--backends", "torch,triton", "--repeats", "1",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acceptance bars" in proc.stdout and "core issue (rec)" in proc.stdout
    (result,) = tmp_path.glob("bench-*.json")
    payload = json.loads(result.read_text())
    triton_ready = importlib.util.find_spec("napo_kernels.kernels.triton") is not None
    assert [(t["case"], t["variant"]) for t in payload["tables"]] == [("rec", "frozen"), ("rec", "trainable")]
    for table in payload["tables"]:
        rows = {r["contender"]: r for r in table["rows"]}
        for name in ("plain", "sliced", "napo-torch") + (("napo-triton",) if triton_ready else ()):
            r = rows[name]
            assert r["status"] == "ok", r
            assert r["median_s"] > 0 and r["peak_bytes"] > 0, r
            if name != "sliced":
                assert max(r["check_rel_err"].values()) < 1e-4, r
        if not triton_ready:
            assert rows["napo-triton"]["status"] == "n/a" and "triton" in rows["napo-triton"]["reason"]
        assert rows["plain"]["peak_bytes"] > rows["napo-torch"]["peak_bytes"]
        assert rows["bare"]["status"] == "ok"
        assert table["napo"] == "napo-torch" and "chunk" in table["napo_strategy"]
    (sweep,) = payload["scaling"]
    assert sweep["sweep"] == "pool" and len(sweep["points"]) == 2
    png = Path(sweep["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    from benchmarks.cli import main

    assert main(["--replot", str(result)]) == 0  # the plots can be redrawn from the saved JSON alone
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [b["name"] for b in payload["bars"]]
    assert "rec frozen: plain / napo peak extra memory" in names and any(n.startswith("pool ") for n in names)
    assert payload["pool"]["all"]["row"]["status"] == "ok"


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.cli import main, parse_args

    for bad in (
        ["--case", "nope"],
        ["--contenders", "plain,nope"],
        ["--variants", "both"],
        ["--sweeps", "x"],
        ["--busy-core", "1"],
    ):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2
    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--quick"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
