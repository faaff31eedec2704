"""Map-style torch datasets of *text* features; the collator in :mod:`napo_kernels.recommender.packing`
tokenizes them and builds the packed layout.

Every item is a dict ``{"index", "prompt", "candidates", "history"}`` where ``candidates[0]`` is
the positive answer text and ``candidates[1:]`` the sampled negatives.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from .records import PairExample, RecExample
from .sampling import NegativeSampler
from .templates import AlpacaTemplate, RecPromptTemplate


class RecPreferenceDataset(Dataset):
    """Next-item examples with ``num_negatives`` sampled negatives each (0: the SFT stage).

    Call :meth:`set_epoch` at each epoch to resample (the trainers in :mod:`napo_kernels.recommender.trainer`
    do it); with ``mode="fixed"`` the negatives never change.
    """

    def __init__(
        self,
        examples: Sequence[RecExample],
        template: RecPromptTemplate | None = None,
        num_negatives: int = 3,
        mode: str = "resample",
        seed: int = 0,
    ) -> None:
        self.examples = list(examples)
        self.template = template or RecPromptTemplate()
        self.sampler = NegativeSampler(num_negatives, mode, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        e = self.examples[index]
        negatives = self.sampler.sample(e.negatives(), index, self.epoch)
        t = self.template
        return {
            "index": index,
            "prompt": t.prompt(e.history, e.candidates),
            "candidates": [t.answer(e.target)] + [t.answer(n) for n in negatives],
            "history": [t.answer(h) for h in e.history],
        }


class PairPreferenceDataset(Dataset):
    """DMPO-style rows: each prompt with its chosen answer and (up to ``num_negatives``) rejected ones."""

    def __init__(
        self,
        pairs: Sequence[PairExample],
        template: AlpacaTemplate | None = None,
        num_negatives: int | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.template = template or AlpacaTemplate()
        self.num_negatives = num_negatives

    def set_epoch(self, epoch: int) -> None:  # nothing is sampled: rows fix their negatives
        pass

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        p = self.pairs[index]
        rejected = p.rejected if self.num_negatives is None else p.rejected[: self.num_negatives]
        t = self.template
        return {
            "index": index,
            "prompt": t.prompt(p.prompt),
            "candidates": [t.answer(p.chosen)] + [t.answer(r) for r in rejected],
            "history": [],
        }
