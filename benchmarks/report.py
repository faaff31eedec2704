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


def make_rows(timed: dict[str, Timed], memory: dict[str, dict], napo: str | None) -> list[dict]:
    """One dict per contender: timing, memory and both ratios to the ``napo`` row (contender / napo)."""
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
            "memory_reason": mem.get("reason", ""),
        }
        rows.append(row)
    ref = next((r for r in rows if r["contender"] == napo and r["status"] == "ok"), None)
    for r in rows:
        r["time_ratio"] = _ratio(r["median_s"], ref and ref["median_s"])
        r["mem_ratio"] = _ratio(r["peak_bytes"], ref and ref["peak_bytes"])
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


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
    head = (
        f"{'contender':44s} {'time ms':>10s} {'spread':>6s} {'runs':>4s} {'1st s':>6s} {'x napo':>7s} "
        f"{'peak extra MiB':>14s} {'x napo':>7s} {'RSS MiB':>8s} {'check':>8s}"
    )
    lines = [f"== {title}", head, "-" * len(head)]
    bare = find(rows, "bare")
    ref = find(rows, napo) if napo else None
    for r in rows:
        name = r["label"] + (" *" if r["contender"] == napo else "")
        if r["status"] != "ok":
            lines.append(f"{name:44s} {r['status']}: {r['reason']}")
            continue
        if r["contender"] == "bare":
            limit = _fmt(_ratio(ref and ref["median_s"], r["median_s"]), "{:.2f}x")
            lines.append(
                f"{name:44s} {1e3 * r['median_s']:10.1f} {_spread(r['times_s']):>6s} {len(r['times_s']):4d} "
                f"{'':6s} napo-kernels / limit = {limit}  ({r['note']})"
            )
            continue
        err = max(r["check_rel_err"].values()) if r["check_rel_err"] else None
        check = "ref" if r["contender"] == "sliced" else _fmt(err, "{:.0e}")
        if err is not None and err > 2e-3:
            check = f"BAD {err:.0e}"
        mem = _fmt(r["peak_bytes"] and r["peak_bytes"] / MIB, "{:.1f}", r["memory_status"] or "-")
        rss = _fmt(r["rss_bytes"] and r["rss_bytes"] / MIB, "{:.0f}")
        lines.append(
            f"{name:44s} {1e3 * r['median_s']:10.1f} {_spread(r['times_s']):>6s} {len(r['times_s']):4d} "
            f"{r['warmup_s']:6.1f} {_fmt(r['time_ratio'], '{:.2f}x'):>7s} {mem:>14s} "
            f"{_fmt(r['mem_ratio'], '{:.1f}x'):>7s} {rss:>8s} "
            f"{check:>8s}"
        )
        if r["memory_status"] == "error":
            lines.append(f"{'':44s} memory probe: {r['memory_reason']}")
    if ref is not None:
        lines.append(f"* {ref['label']}: {ref['note']}")
    if bare is None:
        lines.append("(no bare-GEMM limit measured)")
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
