"""Item popularity from a training split, the basis of the popularity-bias metrics.

Definitions (used by :func:`napo_kernels.recommender.evaluation.popularity_metrics`):

* **count** ``c(i)``: interactions of item ``i`` in the training split: its occurrences in
  histories plus its occurrences as the true next item (``source="both"``, default), or only one
  of the two (``"history"``, ``"target"``).
* **catalogue**: every title seen in the training split (histories, candidate lists, targets),
  items never interacted with having ``c = 0``.
* **percentile** ``p(i)`` in ``[0, 1]``: the mid-rank of ``c(i)`` in the catalogue:
  ``(#{j: c(j) < c(i)} + 0.5 #{j: c(j) = c(i)}) / |catalogue|``. Unknown titles count as ``c = 0``.
* **head / long tail**: the head is the ``head_fraction`` (default 20%) most popular catalogue
  items (every item whose count reaches the count at that rank); all others are the long tail.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence

from .records import RecExample

POPULARITY_SOURCES = ("both", "history", "target")


class ItemPopularity:
    def __init__(
        self, counts: dict[str, int], catalogue: Sequence[str] | None = None, head_fraction: float = 0.2
    ):
        if not 0.0 < head_fraction < 1.0:
            raise ValueError(f"head_fraction must lie in (0, 1), got {head_fraction}")
        self.counts = dict(counts)
        for title in catalogue or ():
            self.counts.setdefault(title, 0)
        if not self.counts:
            raise ValueError("counts: the catalogue is empty")
        self.head_fraction = head_fraction
        self._sorted = sorted(self.counts.values())
        n = len(self._sorted)
        rank = max(1, round(head_fraction * n))
        self.head_threshold = max(1, self._sorted[n - rank])  # an item with no interaction is never head

    @classmethod
    def from_examples(
        cls, examples: Sequence[RecExample], source: str = "both", head_fraction: float = 0.2
    ) -> ItemPopularity:
        if source not in POPULARITY_SOURCES:
            raise ValueError(f"source must be one of {POPULARITY_SOURCES}, got {source!r}")
        counts: Counter[str] = Counter()
        catalogue = set()
        for e in examples:
            catalogue.update(e.candidates)
            catalogue.update(e.history)
            if source in ("both", "history"):
                counts.update(e.history)
            if source in ("both", "target"):
                counts[e.target] += 1
        return cls(dict(counts), sorted(catalogue), head_fraction)

    def __len__(self) -> int:
        return len(self.counts)

    def count(self, title: str) -> int:
        return self.counts.get(title, 0)

    def percentile(self, title: str) -> float:
        c = self.count(title)
        below = bisect.bisect_left(self._sorted, c)
        equal = bisect.bisect_right(self._sorted, c) - below
        return (below + 0.5 * equal) / len(self._sorted)

    def is_long_tail(self, title: str) -> bool:
        return self.count(title) < self.head_threshold
