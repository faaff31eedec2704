"""How it is measured: time in this process (round-robin, median after warm-up) and peak extra memory
in a fresh process per contender (``python -m benchmarks.probe``).

Time: every contender runs its warm-up first (which also compiles what compiles), then the
contenders take turns, one step each per round, so that load from other processes on a shared
machine hits all of them alike; the figure is the median step. Slow contenders get fewer rounds
(at least ``min_repeats``) so a run stays within its time budget.

Memory: a child process builds the same seeded inputs, prepares the contender, runs one warm-up
step, drops the gradients, then measures one more step. On CPU the figure is allocator-level: the
peak of the running sum of every tensor allocation and free that ``torch.profiler`` (with
``profile_memory=True``) records during the step, counted from the state before the step, so
it includes the gradients the step returns and nothing the inputs already held. The peak RSS
growth of the child (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, glibc told to
return large blocks at once) is recorded beside it as a cross-check that also sees non-tensor
buffers. On CUDA it is ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cases import Shape, make_inputs
from .contenders import NotApplicable, Prepared, prepare

PROBE_MARK = "NAPO_BENCH_PROBE "


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class Timed:
    """The timing of one contender on one shape."""

    name: str
    status: str = "ok"  # ok | n/a | error
    reason: str = ""
    note: str = ""
    warmup_s: float = 0.0  # first step, including any compilation
    times_s: list[float] = field(default_factory=list)
    check: dict[str, float] = field(default_factory=dict)  # relative error vs the check reference
    loss: float | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


def _step(prep: Prepared, device: str) -> float:
    prep.reset()
    sync(device)
    start = time.perf_counter()
    prep.run()
    sync(device)
    return time.perf_counter() - start


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """``max |got - want| / max |want|`` per tensor (the loss included)."""
    out = {}
    for key, ref in want.items():
        if key not in got or got[key] is None or ref is None:
            continue
        ref64 = ref.detach().double()
        diff = (got[key].detach().double().reshape(ref64.shape) - ref64).abs().max()
        out[key] = float(diff / ref64.abs().max().clamp(min=1e-30))
    return out


def time_contenders(
    entries: list[tuple[str, str, Shape]],
    device: str,
    *,
    repeats: int,
    min_repeats: int = 3,
    budget_s: float = 15.0,
    check_against: str | None = "sliced",
    skip: Callable[[str, Shape], str | None] = lambda name, shape: None,
    progress: Callable[[str], None] = lambda desc: None,
) -> dict[str, Timed]:
    """Time every ``(key, contender, shape)`` entry, round-robin after warm-up, on the same inputs
    (built from the first shape: every shape must describe the same tensors).

    The warm-up step's loss and gradients are compared with those of the entry keyed
    ``check_against`` (when it runs) so a contender that computes something else is caught.
    ``skip(name, shape)`` may give a reason not to run an entry; ``progress`` is called per step.
    """
    inputs = make_inputs(entries[0][2], device)
    results: dict[str, Timed] = {}
    preps: dict[str, Prepared] = {}
    want: dict[str, torch.Tensor] | None = None
    estimate: dict[str, float] = {}
    for key, name, shape in sorted(entries, key=lambda e: e[0] != check_against):  # reference first
        res = results[key] = Timed(name)
        reason = skip(name, shape)
        if reason:
            res.status, res.reason = "n/a", reason
            continue
        try:
            prep = prepare(name, shape, inputs)
            res.note = prep.note
            progress(f"{key} warm-up")
            prep.reset()
            sync(device)
            start = time.perf_counter()
            loss = prep.run()
            sync(device)
            res.warmup_s = time.perf_counter() - start
            res.loss = float(loss)
            if name != "bare":
                got = {"loss": loss} | prep.grads()
                if key == check_against:
                    want = {k: v.detach().clone() for k, v in got.items()}
                elif want is not None:
                    res.check = relative_errors(got, want)
            estimate[key] = res.warmup_s
            if name in ("compile", "liger", "cce"):
                # a second warm-up: the first one compiled; this one says what a step costs
                estimate[key] = _step(prep, device)
            prep.reset()
            preps[key] = prep
        except NotApplicable as exc:
            res.status, res.reason = "n/a", str(exc)
        except Exception as exc:  # a broken contender must not stop the others
            res.status, res.reason = "error", first_line(exc)
        gc.collect()
    want = None
    reps = {k: max(min_repeats, min(repeats, int(budget_s / max(estimate[k], 1e-6)))) for k in preps}
    for round_ in range(max(reps.values(), default=0)):
        for key, prep in preps.items():
            if round_ < reps[key]:
                progress(f"{key} run {round_ + 1}/{reps[key]}")
                try:
                    results[key].times_s.append(_step(prep, device))
                except Exception as exc:
                    results[key].status, results[key].reason = "error", first_line(exc)
                    reps[key] = 0
        gc.collect()
    for prep in preps.values():
        prep.reset()
    return results


def time_stage2(shapes: list[Shape], backend: str, device: str, reps: int = 40) -> list[float]:
    """Median time of stage 2 alone (napo-kernels' preference loss, forward + backward, on random
    sequence scores) for each shape, interleaved: what a bigger shared pool adds to a step."""
    import napo_kernels

    gen = torch.Generator().manual_seed(0)
    steps = []
    for shape in shapes:
        chosen = torch.randn(shape.prompts, generator=gen).to(device).requires_grad_()
        rejected = torch.randn(shape.prompts, shape.negatives, generator=gen).to(device).requires_grad_()

        def step(shape=shape, chosen=chosen, rejected=rejected) -> None:
            margin = napo_kernels.DynamicMargin(1.0) if shape.method == "napo" else None
            loss = napo_kernels.preference_loss(chosen, rejected, method=shape.method, sharing=shape.sharing,
                                                margin_state=margin, backend=backend)  # fmt: skip
            loss.backward()
            sync(device)

        step()
        steps.append(step)
    times: list[list[float]] = [[] for _ in shapes]
    for _ in range(reps):
        for k, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


# ----------------------------------------------------------------------------------------------
# Memory: the child side (runs in ``python -m benchmarks.probe``) and the parent side.
# ----------------------------------------------------------------------------------------------


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _profiled_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of tensor allocations (+) and frees (-) recorded while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            current += e.nbytes()
            peak = max(peak, current)
    return peak


def probe_one(shape: Shape, name: str, device: str) -> dict:
    """Peak extra memory of one fwd + bwd step of contender ``name`` (in the calling process)."""
    inputs = make_inputs(shape, device)
    try:
        prep = prepare(name, shape, inputs)
    except NotApplicable as exc:
        return {"status": "n/a", "reason": str(exc)}
    # warm-up, under the profiler too: lazy initialisation (of the step, its compilation and the
    # profiler itself) is not the step's memory
    if device.startswith("cuda"):
        prep.run()
    else:
        _profiled_peak_bytes(prep.run)
    prep.reset()
    gc.collect()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        prep.run()
        sync(device)
        return {
            "status": "ok",
            "peak_bytes": torch.cuda.max_memory_allocated() - base,
            "counter": "torch.cuda.max_memory_allocated",
        }
    rss_ok = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    peak = _profiled_peak_bytes(prep.run)
    hwm = _proc_status_kib("VmHWM")
    rss = (hwm - rss_before) * 1024 if rss_ok and hwm is not None and rss_before is not None else None
    return {
        "status": "ok",
        "peak_bytes": peak,
        "rss_bytes": rss,
        "counter": "torch.profiler allocator events",
    }


def probe_main() -> int:
    """Child entry: a JSON job list on stdin, one JSON result line per job on stdout."""
    spec = json.loads(sys.stdin.read())
    for job in spec["jobs"]:
        try:
            out = probe_one(Shape.from_dict(job["shape"]), spec["contender"], spec["device"])
        except Exception as exc:
            out = {"status": "error", "reason": first_line(exc)}
        gc.collect()
        print(PROBE_MARK + json.dumps(out), flush=True)
    return 0


def probe_memory(name: str, shapes: list[Shape], device: str, timeout_s: float = 900.0) -> list[dict]:
    """Measure ``name`` on every shape in ONE fresh process (fresh per contender, not per shape)."""
    env = dict(os.environ)
    # glibc: serve every block above 128 KiB with its own mmap and give it back on free, so the
    # RSS cross-check follows the live memory instead of what malloc kept from the warm-up
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    spec = {"contender": name, "device": device, "jobs": [{"shape": s.to_dict()} for s in shapes]}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.probe"],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    except subprocess.TimeoutExpired:
        return [{"status": "error", "reason": f"memory probe timed out after {timeout_s:.0f} s"}] * len(
            shapes
        )
    results = [
        json.loads(line[len(PROBE_MARK) :])
        for line in proc.stdout.splitlines()
        if line.startswith(PROBE_MARK)
    ]
    if len(results) < len(shapes):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        missing = {"status": "error", "reason": f"memory probe exited with {proc.returncode}: {tail}"}
        results += [missing] * (len(shapes) - len(results))
    return results
