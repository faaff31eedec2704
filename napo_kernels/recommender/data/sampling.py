"""Per-example negative sampling: K of the non-target candidates, seeded and reproducible.

``mode="resample"`` draws a new set every epoch (seeded by ``(seed, epoch, index)``, so any
epoch can be replayed); ``mode="fixed"`` draws once per example (the papers' released code fixes
the negatives when it builds its dataset).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SAMPLING_MODES = ("resample", "fixed")


class NegativeSampler:
    """Draws ``k`` distinct negatives from a candidate list minus the target (all of them when the
    list has fewer than ``k``)."""

    def __init__(self, k: int, mode: str = "resample", seed: int = 0) -> None:
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k (number of negatives) must be a non-negative int, got {k!r}")
        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
        self.k, self.mode, self.seed = k, mode, seed

    def sample(self, pool: Sequence[str], index: int, epoch: int = 0) -> list[str]:
        """``k`` negatives for example ``index`` at ``epoch`` from ``pool`` (the non-target candidates)."""
        if self.k == 0 or not pool:
            return []
        rng = np.random.default_rng([self.seed, index, epoch if self.mode == "resample" else 0])
        take = min(self.k, len(pool))
        return [pool[j] for j in rng.choice(len(pool), size=take, replace=False)]
