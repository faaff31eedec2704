"""``--busy-core``: the suite next to another process that keeps one core busy.

Training jobs share their cores (data loader workers, tokenisation, logging), so a kernel that
waits for all of its threads at every step of its work stops whenever the OS runs that other
process on one of them. The spinner here is a plain Python loop in a subprocess, started before
the first timing and stopped after the last; the machine's load average is recorded before and
after, since other jobs on a shared machine count too.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .bars import Bar, _at_most
from .report import find

# the bars with one core busy: the cpp kernels degrade no worse than the torch backend's
# ATen ops, and stay near the bare products
BUSY_BARS = {"torch backend": ("napo-torch", 1.1), "bare-GEMM limit": ("bare", 1.5)}


class BusyCore:
    """A subprocess spinning on one core for the duration of a ``with`` block."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> BusyCore:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def judge(tables: list[dict]) -> list[Bar]:
    """The bars of a ``--busy-core`` run on the rec case: napo-kernels' time over the torch
    backend's and over the bare products, both measured next to the same busy core."""
    bars = []
    for t in tables:
        if t["case"] != "rec" or not t["napo"]:
            continue
        napo = find(t["rows"], t["napo"])
        for what, (name, bar) in BUSY_BARS.items():
            label = f"rec {t['variant']}, one core busy: napo / {what}"
            bars.append(_at_most(label, napo, find(t["rows"], name), "median_s", bar, what))
    return bars
