"""PNG plots of the scaling sweeps: time and peak extra memory against the swept variable."""

from __future__ import annotations

import os

from .contenders import label

MIB = 2**20
# one colour per contender in every plot, so the same line reads the same across sweeps
COLORS = {"sliced": "C0", "plain": "C1", "napo-torch": "C2", "napo-cpp": "C3", "compile": "C4", "liger": "C5",
          "cce": "C6", "bare": "grey", "napo-cuda": "C8", "napo-triton": "C9"}  # fmt: skip


def plot_sweep(sweep: dict, path: str) -> str | None:
    """One PNG per sweep: two panels (median step time, peak extra memory), one line per contender.
    Returns the path written, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [p["x"] for p in sweep["points"]]
    names: list[str] = []
    for p in sweep["points"]:
        names += [r["contender"] for r in p["rows"] if r["contender"] not in names]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in names:
        t_pts, m_pts = [], []
        for x, p in zip(xs, sweep["points"]):
            r = next((r for r in p["rows"] if r["contender"] == name and r["status"] == "ok"), None)
            if r is None:
                continue
            t_pts.append((x, 1e3 * r["median_s"]))
            if r.get("peak_bytes") is not None:
                m_pts.append((x, max(r["peak_bytes"], 1) / MIB))
        style = {"color": COLORS.get(name, "black"), "linewidth": 2.5 if name.startswith("napo-") else 1.5}
        if name == "bare":
            style["linestyle"] = "--"
        if t_pts:
            ax_t.plot(*zip(*t_pts), marker="o", label=label(name), **style)
        if m_pts:
            ax_m.plot(*zip(*m_pts), marker="o", label=label(name), **style)
    floor = [(x, p["rows"][0]["grad_bytes"] / MIB) for x, p in zip(xs, sweep["points"]) if p["rows"]]
    if floor:  # the gradients every contender returns: no contender can use less
        ax_m.plot(*zip(*floor), linestyle=":", color="black", label="returned gradients (floor)")
    ax_m.legend(fontsize=8)
    log_x = sweep["sweep"] in ("vocab", "tokens", "chunk")
    for ax, ylabel in ((ax_t, "median fwd+bwd step time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xlabel(sweep["label"])
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"scaling: {sweep['sweep']} ({sweep['variant']} lm_head) around {sweep['base']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
