"""The issue's acceptance bars, each judged PASS/MISS on the figures of this run.

Every figure is a ratio between contenders measured in the same run on the same inputs. A bar
whose contenders did not run is reported ``n/a`` with the reason, never passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .report import find


@dataclass
class Bar:
    name: str
    target: str
    measured: float | None
    passed: bool | None  # None: could not be judged
    detail: str = ""

    def line(self) -> str:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[self.passed]
        fig = "-" if self.measured is None else f"{self.measured:.2f}x"
        detail = f"  {self.detail}" if self.detail else ""
        return f"{verdict}  {self.name:58s} {fig:>9s}  (bar: {self.target}){detail}"


def _at_least(name: str, num: dict | None, den: dict | None, key: str, bar: float, what: str) -> Bar:
    """``num[key] / den[key] >= bar``."""
    if num is None or den is None or num.get(key) is None or not den.get(key):
        missing = [r for r, v in (("contender", num), ("napo-kernels", den)) if v is None]
        return Bar(name, f">= {bar:g}x {what}", None, None, f"not measured ({', '.join(missing) or key})")
    value = num[key] / den[key]
    return Bar(name, f">= {bar:g}x {what}", value, value >= bar)


def _at_most(name: str, num: dict | None, den: dict | None, key: str, bar: float, what: str) -> Bar:
    """``num[key] / den[key] <= bar``."""
    if num is None or den is None or num.get(key) is None or not den.get(key):
        return Bar(name, f"<= {bar:g}x {what}", None, None, "not measured")
    value = num[key] / den[key]
    return Bar(name, f"<= {bar:g}x {what}", value, value <= bar)


def _memory(tag: str, who: str, num: dict | None, napo: dict | None, bar: float) -> list[Bar]:
    """A memory bar, judged on the peak extra memory (gradients included) unless no implementation
    could meet it there: when the budget ``peak(who) / bar`` is below the gradients every contender
    must return (with a trainable ``lm_head``, its ``[V, H]`` gradient alone), the bar is judged on
    the memory beyond those gradients, the part a loss implementation controls, and says so."""
    total = _at_least(f"{tag} {who} / napo peak extra memory", num, napo, "peak_bytes", bar, "less memory")
    if (
        total.measured is None
        or napo.get("beyond_grads_bytes") is None
        or num.get("beyond_grads_bytes") is None
    ):
        return [total]
    grads = napo["peak_bytes"] - napo["beyond_grads_bytes"]
    budget = num["peak_bytes"] / bar
    if budget >= grads:
        return [total]
    name = f"{tag} {who} / napo memory beyond returned grads"
    beyond = _at_least(name, num, napo, "beyond_grads_bytes", bar, "less memory")
    beyond.detail = (
        f"with grads {total.measured:.2f}x: the returned gradients alone ({grads / 2**20:.0f} MiB) exceed "
        f"the budget ({budget / 2**20:.0f} MiB)"
    )
    return [beyond]


# napo-kernels' time over the bare matrix products' (forward + backward GEMMs alone), per step
BARE_LIMIT = {
    ("rec", "frozen"): 1.05,
    ("rec", "trainable"): 1.2,
    ("dense", "frozen"): 1.05,
    ("dense", "trainable"): 1.25,
}


def judge(tables: list[dict], pool: dict | None, trl: list[dict] | None = None) -> list[Bar]:
    """``tables``: the rec/dense results (``case``, ``variant``, ``napo``, ``rows``); ``pool``: the
    pool-sharing measurement (``own`` and ``all`` rows) or None; ``trl``: the trl case's entries
    (``shape``, ``rows``: stock TRL then the drop-in) or None."""
    bars: list[Bar] = []
    for t in tables:
        rows, v, case = t["rows"], t["variant"], t["case"]
        napo = find(rows, t["napo"]) if t["napo"] else None
        plain, sliced, bare = find(rows, "plain"), find(rows, "sliced"), find(rows, "bare")
        tag = f"{case} {v}:"
        others = [r for r in rows if r["status"] == "ok" and r["contender"] != "bare"
                  and not r["contender"].startswith("napo-")]  # fmt: skip
        fastest = min(others, key=lambda r: r["median_s"], default=None)
        # issue 14: at most the fastest other contender's time, and within LIMIT of the bare products
        b = _at_most(f"{tag} napo / fastest other contender time", napo, fastest, "median_s", 1.0, "fastest")
        if fastest is not None:
            b.detail = f"fastest: {fastest['label']}"
        bars.append(b)
        limit = BARE_LIMIT[case, v]
        bars.append(_at_most(f"{tag} napo / bare-GEMM limit", napo, bare, "median_s", limit, "the limit"))
        if case == "rec":
            bars += _memory(tag, "plain", plain, napo, 20)
            bars.append(_at_least(f"{tag} plain / napo time", plain, napo, "median_s", 5, "less time"))
            slack = 1.0 if v == "frozen" else 1.4
            bars.append(_at_most(f"{tag} napo / sliced time", napo, sliced, "median_s", slack, "sliced time"))
            bars += _memory(tag, "sliced", sliced, napo, 5)
        elif case == "dense":
            bars += _memory(tag, "Liger", find(rows, "liger"), napo, 4)
            bars += _memory(tag, "plain", plain, napo, 10)
    if pool is not None:
        own, all_ = pool["own"], pool["all"]
        name = f"pool {own['pool']} -> {all_['pool']} negatives/prompt ({pool['variant']}): time all / own"
        b = _at_most(name, all_["row"], own["row"], "median_s", 1.05, "own-pool time")
        if pool.get("paired_ratio") is not None and b.measured is not None:
            # judged on the paired per-round ratio (robust to load drifts); the ratio of medians is shown
            b.detail = f"ratio of medians {b.measured:.3f}x"
            b.measured, b.passed = pool["paired_ratio"], pool["paired_ratio"] <= 1.05
        if pool.get("stage2_ms"):
            s2 = pool["stage2_ms"]
            b.detail += f"; stage 2 alone: {s2['own']:.2f} -> {s2['all']:.2f} ms"
        bars.append(b)
    for entry in trl or []:
        stock, fused = entry["rows"]
        k = entry["shape"]["negatives"]
        tag = f"trl K={k}: stock TRL{'' if k == 1 else ' (expanded pairs)'} / fused"
        bar = 2.5 if k == 1 else 4
        b = _at_least(f"{tag} time", stock, fused, "median_s", bar, "less time")
        if entry.get("time_ratio") is not None and b.measured is not None:
            # judged on the paired per-round ratio (robust to load drifts); the ratio of medians is shown
            b.detail = f"ratio of medians {b.measured:.2f}x"
            b.measured, b.passed = entry["time_ratio"], entry["time_ratio"] >= bar
        bars.append(b)
        if k == 1:
            bars.append(_at_least(f"{tag} peak memory", stock, fused, "peak_bytes", 4, "less memory"))
    return bars


def as_dicts(bars: list[Bar]) -> list[dict]:
    return [asdict(b) for b in bars]
