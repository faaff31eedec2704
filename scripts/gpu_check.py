#!/usr/bin/env python3
"""``make gpu-check``: what a GPU machine can tell about napo-kernels, in one command.

Assumes nothing can be downloaded there: a preinstalled CUDA torch (and triton, pytest,
hypothesis, nvcc; Liger-Kernel or Cut Cross-Entropy only if they were brought along). Runs with the
interpreter it is started with (the Makefile passes .venv/bin/python when there is one, else
``python3``), builds in the checkout, and writes every result and log into one folder
(``gpu-check-<time>/`` or ``--out``). Each step has a time budget; together they fit in 8 minutes
on one H100/H200, the build included:

    step        budget  what
    env          15 s   nvidia-smi, torch / CUDA / triton / nvcc versions
    build       150 s   the CUDA extension in place, MAX_JOBS = CPU count, the visible GPU's arch only
    tests       120 s   pytest tests/test_gpu.py (junit XML)
    bench        95 s   python -m benchmarks --device cuda --case rec,dense (no torch.compile
                        contender; Liger-Kernel / Cut Cross-Entropy where importable)
    keep         45 s   a trainable head's stage 1 (fwd + bwd, bf16) with its logits kept and
                        recomputed, triton and cuda, H = 1024 and 4096: where keeping pays (keep.json)
    memcheck     55 s   compute-sanitizer --tool memcheck on a small run of the cuda backend

A step past its budget is stopped and reported as such; the next steps still run in what is left
of the 8 minutes. Without a GPU the script says so, checks what it can (the CPU extension builds,
into the results folder; nvcc compiles the .cu files for sm_90 when nvcc exists; pytest collects
every test of tests/test_gpu.py) and exits 0. The exit status is 1 when a step fails.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF = str(Path(__file__).resolve())
TOTAL_S = 480
BUDGETS = {"env": 15, "build": 150, "tests": 120, "bench": 95, "keep": 45, "memcheck": 55}
# rows, H, V of the keep step: on either side of ops.linear_logprobs._TRITON_KEEP_MIN_HIDDEN
KEEP_SHAPES = ((2048, 1024, 32000), (2048, 4096, 32000))
CPU_BUDGETS = {"env": 15, "cpu-build": 300, "nvcc": 240, "collect": 120}


class Steps:
    """Runs commands with a budget each (and a deadline for all), logging into ``out``."""

    def __init__(self, out: Path, total_s: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + total_s
        self.results: list[dict] = []

    def run(self, name: str, cmd: list[str], budget_s: float, env: dict | None = None) -> dict:
        budget = min(budget_s, self.deadline - time.monotonic())
        log = self.out / f"{name}.log"
        entry = {"step": name, "command": " ".join(cmd), "budget_s": budget_s, "log": log.name}
        if budget <= 1:
            entry.update(status="skipped", reason="no time left of the total budget", seconds=0.0)
            return self._done(entry)
        start = time.monotonic()
        with open(log, "w") as f:
            f.write(f"$ {entry['command']}\n")
            f.flush()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, timeout=budget)  # fmt: skip
                entry["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                entry["status"] = f"stopped at its budget ({budget:.0f} s)"
            except OSError as exc:
                entry["status"] = f"failed ({exc})"
        entry["seconds"] = round(time.monotonic() - start, 1)
        return self._done(entry)

    def note(self, name: str, status: str, **extra) -> dict:
        return self._done({"step": name, "status": status, "seconds": 0.0, **extra})

    def _done(self, entry: dict) -> dict:
        self.results.append(entry)
        print(f"[gpu-check] {entry['step']:<10} {entry['status']} ({entry['seconds']:.0f} s)", flush=True)
        return entry

    @property
    def failed(self) -> bool:
        return any(
            r["status"] not in ("ok", "skipped") and not r["status"].startswith("n/a") for r in self.results
        )


def gpu_visible() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not importable: {exc}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return True, f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def arch_list() -> str:
    """The visible GPU's compute capability as TORCH_CUDA_ARCH_LIST wants it (one arch: a faster build)."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def env_step(steps: Steps) -> None:
    code = (
        "import platform, torch; print('python', platform.python_version()); "
        "print('torch', torch.__version__, 'cuda', torch.version.cuda); "
        "print('gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])\n"
        "for m in ('triton', 'transformers', 'peft', 'pytest', 'hypothesis', 'numpy', 'ninja', "
        "'liger_kernel', 'cut_cross_entropy'):\n"
        "    try: print(m, __import__(m).__version__)\n"
        "    except Exception as e: print(m, 'not importable:', type(e).__name__)"
    )
    steps.run("env", [sys.executable, "-c", code], BUDGETS["env"])
    with open(steps.out / "env.log", "a") as f:
        for cmd in (["nvidia-smi"], ["nvcc", "--version"], ["compute-sanitizer", "--version"]):
            f.write(f"\n$ {' '.join(cmd)}\n")
            if shutil.which(cmd[0]) is None:
                f.write("not found\n")
                continue
            try:
                f.write(subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout)
            except (OSError, subprocess.SubprocessError) as exc:
                f.write(f"failed: {exc}\n")


def build(build_lib: str | None) -> int:
    """Builds the extension as setup.py defines it (in place, or linked into ``build_lib``) without
    setuptools reading pyproject.toml: a preinstalled setuptools older than 77 rejects its license
    field, and nothing newer can be installed there."""
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from setuptools import Distribution

    import setup as napo_setup

    ext_modules, cmdclass = napo_setup.extensions()
    dist = Distribution({"name": "napo-kernels", "ext_modules": ext_modules, "cmdclass": cmdclass})
    dist.script_args = ["build_ext"] + (["--build-lib", build_lib] if build_lib else ["--inplace"])
    dist.parse_command_line()
    dist.run_commands()
    return 0


def test_names() -> set[str]:
    """The test functions of tests/test_gpu.py (read with ast: nothing imported)."""
    tree = ast.parse((ROOT / "tests" / "test_gpu.py").read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def collect_step(steps: Steps) -> None:
    """pytest must collect every test of tests/test_gpu.py (they skip at run time without a GPU)."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_gpu.py"]
    entry = steps.run("collect", cmd, CPU_BUDGETS["collect"])
    if entry["status"] != "ok":
        return
    text = (steps.out / "collect.log").read_text()
    collected = {line.split("::")[1].split("[")[0] for line in text.splitlines() if "::" in line}
    missing = sorted(test_names() - collected)
    entry["collected"] = sum("::" in line for line in text.splitlines())
    if missing:
        entry["status"] = f"failed: not collected: {', '.join(missing)}"


def nvcc_step(steps: Steps) -> None:
    """Every .cu file compiles for sm_90 (warnings as errors), as `make check-cuda` does."""
    if shutil.which("nvcc") is None:
        steps.note("nvcc", "n/a: no nvcc on the PATH")
        return
    sources = " ".join(sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
    cmd = (f"set -e; for f in {sources}; do echo nvcc sm_90 $f; nvcc -std=c++17 -O3 -arch=sm_90 -Icsrc "
           f"-Xcompiler -Wall,-Wextra --Werror all-warnings -c $f -o /dev/null; done")  # fmt: skip
    steps.run("nvcc", ["bash", "-c", cmd], CPU_BUDGETS["nvcc"])


def cpu_only(steps: Steps, reason: str) -> int:
    print(f"[gpu-check] no GPU here ({reason}): checking what a CPU machine can", flush=True)
    steps.note("gpu", f"n/a: {reason}")
    env_step(steps)
    # the CPU extension, linked into the results folder (the checkout's own build is left alone;
    # build/ keeps the objects, so an unchanged tree relinks in seconds)
    lib = steps.out / "cpu-build"
    steps.run("cpu-build", [sys.executable, SELF, "--build", str(lib)], CPU_BUDGETS["cpu-build"],
              env={"MAX_JOBS": str(os.cpu_count() or 1), "NAPO_KERNELS_BUILD_CUDA": "0"})  # fmt: skip
    nvcc_step(steps)
    collect_step(steps)
    return 0


def smoke() -> int:
    """A small run of the cuda backend for compute-sanitizer: both stage-1 entry points (frozen and
    trainable heads, chunked and kept, with a bias, a soft cap, three dtypes, a vocabulary that is
    not a multiple of any block) and stage 2, forward and backward."""
    sys.path.insert(0, str(ROOT))
    import torch

    import napo_kernels as nk

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, c, t, h, v = 2, 3, 5, 64, 1003
    labels = torch.randint(0, v, (b, c, t), device="cuda", generator=gen)
    labels[..., :2] = -100
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for frozen in (True, False):
            for softcap in (None, 30.0):
                hidden = torch.randn(
                    b, c, t, h, device="cuda", dtype=dtype, generator=gen, requires_grad=True
                )
                weight = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).to(dtype)
                bias = torch.randn(v, device="cuda", generator=gen).to(dtype)
                weight.requires_grad_(not frozen)
                # chunks of 4 rows, and (trainable) one chunk of all rows: the kept probabilities
                for chunk in (4, None):
                    loss = nk.napo_loss(hidden, weight, labels, bias=bias, backend="cuda", method="s_dpo",
                                        softcap=softcap, chunk_size=chunk)  # fmt: skip
                    loss.backward()
        logits = torch.randn(b, c, t, v, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
        nk.sequence_logprobs_from_logits(logits, labels, backend="cuda").sum().backward()
    torch.cuda.synchronize()
    print("smoke: ok")
    return 0


def keep_timing(out: Path | None, device: str = "cuda", shapes=KEEP_SHAPES, dtype=None, repeats: int = 10,
                backends: tuple[str, ...] | None = None) -> list[dict]:  # fmt: skip
    """Median seconds of a trainable head's stage 1, forward and backward (``hidden`` and ``weight``
    gradients), with its logits kept (``NAPO_KERNELS_KEEP_LOGITS=1``) and recomputed (``=0``), for
    each backend and ``(rows, H, V)``; written to ``out`` as JSON when given. What the default
    decides (``keeps_logits`` with the variable unset) is in ``default_keeps``. Backends: triton
    and cuda, where available."""
    sys.path.insert(0, str(ROOT))
    import torch

    import napo_kernels as nk
    from napo_kernels.ops.linear_logprobs import keeps_logits, linear_logprobs

    if backends is None:
        backends = tuple(b for b in ("triton", "cuda") if nk.backends()[b].available)
    before = os.environ.get("NAPO_KERNELS_KEEP_LOGITS")

    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    rows_out = []
    for backend in backends:
        for r, h, v in shapes:
            hidden = torch.randn(r, h, device=device, generator=gen).to(dtype).requires_grad_()
            weight = (torch.randn(v, h, device=device, generator=gen) / h**0.5).to(dtype).requires_grad_()
            targets = torch.randint(0, v, (r,), device=device, generator=gen)
            os.environ.pop("NAPO_KERNELS_KEEP_LOGITS", None)
            row = {"backend": backend, "rows": r, "hidden": h, "vocab": v, "dtype": str(dtype)[6:],
                   "default_keeps": keeps_logits(backend, r, weight, r)}  # fmt: skip
            for flag, name in (("1", "kept_s"), ("0", "recomputed_s")):
                os.environ["NAPO_KERNELS_KEEP_LOGITS"] = flag
                keep = keeps_logits(backend, r, weight, r)
                times = []
                for i in range(repeats + 2):  # two warm-up runs (autotune, compilation)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    logp = linear_logprobs(hidden, weight, None, targets, r, True, backend, None, 1.0, keep)[
                        0
                    ]
                    torch.autograd.grad(logp.sum(), (hidden, weight))
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if i >= 2:
                        times.append(time.perf_counter() - start)
                row[name] = sorted(times)[len(times) // 2]
                row["kept" if flag == "1" else "recomputed"] = keep
            os.environ.pop("NAPO_KERNELS_KEEP_LOGITS", None)
            row["kept_over_recomputed"] = row["kept_s"] / row["recomputed_s"]
            print(f"{backend:<7} R={r} H={h} V={v} {row['dtype']}: kept {row['kept_s'] * 1e3:.2f} ms, "
                  f"recomputed {row['recomputed_s'] * 1e3:.2f} ms ({row['kept_over_recomputed']:.2f}x); "
                  f"default keeps: {row['default_keeps']}", flush=True)  # fmt: skip
            rows_out.append(row)
    if before is not None:
        os.environ["NAPO_KERNELS_KEEP_LOGITS"] = before
    if out is not None:
        out.write_text(json.dumps(rows_out, indent=1))
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="results folder (default gpu-check-<time>)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the memcheck payload
    parser.add_argument("--build", metavar="LIB", default=None, help=argparse.SUPPRESS)  # "": in place
    parser.add_argument("--keep-timing", metavar="JSON", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke()
    if args.keep_timing:
        keep_timing(Path(args.keep_timing))
        return 0
    if args.build is not None:
        return build(args.build or None)
    out = Path(args.out or ROOT / time.strftime("gpu-check-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out, TOTAL_S)
    start = time.monotonic()
    has_gpu, what = gpu_visible()
    if not has_gpu:
        code = cpu_only(steps, what)
        code = 1 if steps.failed else code
    else:
        print(f"[gpu-check] {what}; results in {out}", flush=True)
        env_step(steps)
        build_env = {"MAX_JOBS": str(os.cpu_count() or 1), "TORCH_CUDA_ARCH_LIST": arch_list(),
                     "NAPO_KERNELS_BUILD_CUDA": "1"}  # fmt: skip
        built = steps.run("build", [sys.executable, SELF, "--build", ""], BUDGETS["build"], env=build_env)
        if built["status"] != "ok":
            for name in ("tests", "bench", "keep", "memcheck"):
                steps.note(name, "skipped", reason="the build failed")
        else:
            steps.run("tests", [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_gpu.py",
                                f"--junitxml={out / 'tests.xml'}"], BUDGETS["tests"])  # fmt: skip
            steps.run("bench", [sys.executable, "-m", "benchmarks", "--device", "cuda", "--case", "rec,dense",
                                "--contenders", "plain,sliced,liger,cce,bare", "--no-plots",
                                "--out", str(out / "bench")], BUDGETS["bench"])  # fmt: skip
            steps.run(
                "keep", [sys.executable, SELF, "--keep-timing", str(out / "keep.json")], BUDGETS["keep"]
            )
            if shutil.which("compute-sanitizer") is None:
                steps.note("memcheck", "n/a: no compute-sanitizer on the PATH")
            else:
                # no caching allocator: every tensor its own allocation, so an access past one is seen
                steps.run("memcheck", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                                       sys.executable, SELF, "--smoke"],
                          BUDGETS["memcheck"], env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})  # fmt: skip
        code = 1 if steps.failed else 0
    summary = {
        "gpu": what if has_gpu else None,
        "no_gpu_reason": None if has_gpu else what,
        "seconds": round(time.monotonic() - start, 1),
        "total_budget_s": TOTAL_S,
        "steps": steps.results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# gpu-check {time.strftime('%Y-%m-%d %H:%M')}", "", f"machine: {what}", "",
             "| step | status | seconds | budget | log |", "|---|---|---|---|---|"]  # fmt: skip
    for r in steps.results:
        cells = (r["step"], r["status"], r["seconds"], r.get("budget_s", "-"), r.get("log", "-"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(
        f"[gpu-check] {'FAILED' if code else 'done'} in {summary['seconds']:.0f} s; results: {out}",
        flush=True,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
