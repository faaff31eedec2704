"""``make gpu-check`` (scripts/gpu_check.py): its budgets fit the 8 minutes it promises, it knows
every GPU test, and on a machine without a GPU it checks what it can and exits 0."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_budgets_fit_eight_minutes():
    assert sum(gpu_check.BUDGETS.values()) <= gpu_check.TOTAL_S == 8 * 60
    for step, budget in gpu_check.BUDGETS.items():  # the docstring's table states each budget
        assert any(line.split()[:2] == [step, f"{budget}"] for line in gpu_check.__doc__.splitlines()), step


def test_knows_every_gpu_test():
    tree = ast.parse((ROOT / "tests" / "test_gpu.py").read_text())
    tests = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    assert gpu_check.test_names() == tests and len(tests) >= 5


def test_make_target_calls_the_script():
    out = subprocess.run(["make", "-n", "gpu-check", "GPU_CHECK_ARGS=--out x"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "scripts/gpu_check.py --out x" in out


@pytest.mark.slow  # links the CPU extension again and compiles the .cu files when nvcc exists
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-machine path: this machine has a GPU")
def test_without_a_gpu_checks_what_it_can(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU here" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["cpu-build"] == status["collect"] == "ok" and status["gpu"].startswith("n/a")
    assert status["nvcc"] in ("ok", "n/a: no nvcc on the PATH")
    assert list((tmp_path / "cpu-build" / "napo_kernels").glob("_C*.so"))
    assert (tmp_path / "summary.md").read_text().count("|") > 10


def test_keep_timing_times_both_ways(tmp_path):
    """The keep step's payload, run on CPU tensors (cpp, and triton under the interpreter): both
    ways timed, the logits kept in one and recomputed in the other, the JSON written."""
    import napo_kernels as nk

    backends = tuple(b for b in ("cpp", "triton") if nk.backends()[b].available)
    assert backends, "neither the cpp nor the triton backend runs here"
    out = tmp_path / "keep.json"
    rows = gpu_check.keep_timing(out, "cpu", ((8, 16, 50),), torch.float32, repeats=1, backends=backends)
    assert json.loads(out.read_text()) == rows and len(rows) == len(backends)
    for row in rows:
        assert row["kept"] and not row["recomputed"] and row["default_keeps"], row
        assert row["kept_s"] > 0 and row["recomputed_s"] > 0
