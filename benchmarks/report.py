"""What is reported: result rows with ratios to napo-kernels, the terminal tables, and the JSON file."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata

import torch

from .contenders import label
from .measure import Timed

MIB = 2**20


def make_rows(
    timed: dict[str, Timed], memory: dict[str, dict], napo: str | None, grad_bytes: int
) -> list[dict]:
    """One dict per contender: timing, memory and the ratios to the ``napo`` row (contender / napo).

    ``beyond_grads_bytes`` is the peak extra memory minus ``grad_bytes``, the gradients every
    contender hands back: what a contender allocates on top of its unavoidable output."""
    rows = []
    for name, t in timed.items():
        mem = memory.get(name, {})
        row = {
            "contender": name,
            "label": label(name),
            "status": t.status,
            "reason": t.reason,
            "note": t.note,
            "warmup_s": t.warmup_s,
            "times_s": t.times_s,
            "median_s": t.median_s,
            "loss": t.loss,
            "check_rel_err": t.check,
            "peak_bytes": mem.get("peak_bytes"),
            "rss_bytes": mem.get("rss_bytes"),
            "memory_status": mem.get("status"),
            "grad_bytes": grad_bytes,
            "memory_reason": mem.get("reason", ""),
        }
        rows.append(row)
    ref = next((r for r in rows if r["contender"] == napo and r["status"] == "ok"), None)
    for r in rows:
        r["time_ratio"] = _ratio(r["median_s"], ref and ref["median_s"])
        r["mem_ratio"] = _ratio(r["peak_bytes"], ref and ref["peak_bytes"])
        r["beyond_grads_bytes"] = None if r["peak_bytes"] is None else r["peak_bytes"] - grad_bytes
        ref_beyond = None if ref is None or ref["peak_bytes"] is None else ref["peak_bytes"] - grad_bytes
        r["beyond_ratio"] = _ratio(r["beyond_grads_bytes"], ref_beyond)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def pick_napo(timed: dict[str, Timed], preferred: str) -> str | None:
    """The napo-kernels row the ratios refer to: the ``auto`` backend when it ran, else the first that did."""
    ok = [n for n, t in timed.items() if n.startswith("napo-") and t.status == "ok"]
    return preferred if preferred in ok else (ok[0] if ok else None)


def find(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["contender"] == name and r["status"] == "ok"), None)


# ----------------------------------------------------------------------------------------------
# Terminal tables
# ----------------------------------------------------------------------------------------------


def _spread(times: list[float]) -> str:
    if len(times) < 2:
        return ""
    med = sorted(times)[len(times) // 2]
    return f"±{100 * (max(times) - min(times)) / 2 / med:.0f}%"


def _fmt(x: float | None, pattern: str, missing: str = "-") -> str:
    return missing if x is None else pattern.format(x)


def format_table(title: str, rows: list[dict], napo: str | None) -> str:
    """The terminal table of one case; ratio columns are contender / the ``napo`` row (marked *)."""
    head = (
        f"{'contender':40s} {'time ms':>9s} {'spread':>6s} {'runs':>4s} {'1st s':>6s} {'x napo':>7s} "
        f"{'peak MiB':>9s} {'x napo':>7s} {'-grads MiB':>10s} {'x napo':>7s} {'RSS MiB':>8s} {'check':>8s}"
    )
    lines = [f"== {title}", head, "-" * len(head)]
    ref = find(rows, napo) if napo else None
    for r in rows:
        name = r["label"] + (" *" if r["contender"] == napo else "")
        if r["status"] != "ok":
            lines.append(f"{name:40s} {r['status']}: {r['reason']}")
            continue
        timing = f"{name:40s} {1e3 * r['median_s']:9.1f} {_spread(r['times_s']):>6s} {len(r['times_s']):4d}"
        if r["contender"] == "bare":
            limit = _fmt(_ratio(ref and ref["median_s"], r["median_s"]), "{:.2f}x")
            lines.append(f"{timing} {'':6s} napo-kernels / limit = {limit}  ({r['note']})")
            continue
        err = max(r["check_rel_err"].values()) if r["check_rel_err"] else None
        check = "ref" if r["contender"] == "sliced" else _fmt(err, "{:.0e}")
        if err is not None and err > 2e-3:
            check = f"BAD {err:.0e}"
        missing = r["memory_status"] or "-"
        mem = _fmt(r["peak_bytes"] and r["peak_bytes"] / MIB, "{:.1f}", missing)
        beyond = _fmt(r["beyond_grads_bytes"] and r["beyond_grads_bytes"] / MIB, "{:.1f}", missing)
        rss = _fmt(r["rss_bytes"] and r["rss_bytes"] / MIB, "{:.0f}")
        lines.append(
            f"{timing} {r['warmup_s']:6.1f} {_fmt(r['time_ratio'], '{:.2f}x'):>7s} {mem:>9s} "
            f"{_fmt(r['mem_ratio'], '{:.1f}x'):>7s} {beyond:>10s} {_fmt(r['beyond_ratio'], '{:.1f}x'):>7s} "
            f"{rss:>8s} {check:>8s}"
        )
        if r["memory_status"] == "error":
            lines.append(f"{'':40s} memory probe: {r['memory_reason']}")
    grads = next((r["grad_bytes"] for r in rows if r.get("grad_bytes")), None)
    if grads:
        lines.append(
            f"peak: peak extra memory of one fwd+bwd step; -grads: peak minus the {grads / MIB:.1f} MiB of "
            "gradients every contender returns; check: max relative error vs the sliced baseline"
        )
    if ref is not None:
        lines.append(f"* {ref['label']}: {ref['note']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "napo-kernels", "triton", "liger-kernel", "cut-cross-entropy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
