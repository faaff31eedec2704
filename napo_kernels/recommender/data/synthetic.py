"""A synthetic recommendation world in the S-DPO/NAPO format: the default data of demos, tests
and benchmarks (no download, seeded, a few milliseconds to build).

How it is generated:

* **items** belong to one of ``num_genres`` genres. A title is ``"<genre word> <common word>"``:
  the first word comes from a small genre-specific vocabulary, so a title reveals its genre,
  which is what a model can learn to match against a history.
* **popularity** is long-tailed: item ``i`` (in a random order) has weight
  ``1 / (rank + 1) ** zipf_exponent``.
* **users** have latent tastes ``theta ~ Dirichlet(taste_concentration)`` over genres (small
  concentrations give users one or two favourite genres).
* a user's **sequence** draws ``history_length + 1`` distinct items with probability
  proportional to ``(theta[genre] + taste_floor) * popularity``; the last one is the target.
* the **candidate list** is the target plus ``num_candidates - 1`` items drawn uniformly from
  those not in the history (as in the LastFM files), shuffled.

So the best a recommender can do is to prefer candidates of the history's genres, then popular
ones; an untrained model scores about ``1 / num_candidates`` HR@1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .records import RecExample, write_rec_json

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr", "br")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "n", "r", "l", "s", "x", "m")


@dataclass(frozen=True)
class WorldConfig:
    num_items: int = 240
    num_genres: int = 6
    genre_words: int = 5
    common_words: int = 48
    num_candidates: int = 20
    min_history: int = 3
    max_history: int = 10
    zipf_exponent: float = 0.8
    taste_concentration: float = 0.15
    taste_floor: float = 0.02
    num_train: int = 2000
    num_val: int = 300
    num_test: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be at least 2, got {self.num_candidates}")
        if not 1 <= self.min_history <= self.max_history:
            raise ValueError(
                f"need 1 <= min_history <= max_history, got {self.min_history}, {self.max_history}"
            )
        if self.num_items < self.max_history + self.num_candidates:
            raise ValueError(
                f"num_items={self.num_items} is too small for max_history + num_candidates = "
                f"{self.max_history + self.num_candidates}"
            )
        if self.num_genres < 1 or self.genre_words < 1 or self.common_words < 1:
            raise ValueError("num_genres, genre_words and common_words must be positive")
        if self.num_genres * self.genre_words * self.common_words < self.num_items:
            raise ValueError(
                "num_genres * genre_words * common_words must be at least num_items (unique titles)"
            )


@dataclass
class SyntheticWorld:
    config: WorldConfig
    items: list[str]  # titles, index = item id
    genre: np.ndarray  # [num_items] genre of each item
    weight: np.ndarray  # [num_items] popularity weight (sums to 1)
    train: list[RecExample] = field(default_factory=list)
    val: list[RecExample] = field(default_factory=list)
    test: list[RecExample] = field(default_factory=list)

    def save(self, directory: str | Path) -> Path:
        """Write ``train.json``, ``val.json``, ``test.json`` and ``id2name.txt`` (the LastFM layout)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name in ("train", "val", "test"):
            write_rec_json(d / f"{name}.json", getattr(self, name))
        (d / "id2name.txt").write_text(
            "".join(f"{i}::{t}\n" for i, t in enumerate(self.items)), encoding="utf-8"
        )
        (d / "config.txt").write_text(repr(asdict(self.config)) + "\n", encoding="utf-8")
        return d


def _words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        syllables = rng.integers(1, 3)
        w = "".join(
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(syllables - 1)
        )
        w += (
            _ONSETS[rng.integers(len(_ONSETS))]
            + _VOWELS[rng.integers(len(_VOWELS))]
            + _CODAS[rng.integers(len(_CODAS))]
        )
        if w not in taken:
            taken.add(w)
            out.append(w.capitalize())
    return out


def generate_world(config: WorldConfig | None = None, **overrides) -> SyntheticWorld:
    """Build a world from ``config`` (or ``WorldConfig(**overrides)``); the same seed gives the same world."""
    cfg = config or WorldConfig(**overrides)
    rng = np.random.default_rng(cfg.seed)
    taken: set[str] = set()
    genre_vocab = [_words(rng, cfg.genre_words, taken) for _ in range(cfg.num_genres)]
    common = _words(rng, cfg.common_words, taken)

    genre = np.arange(cfg.num_items) % cfg.num_genres
    rng.shuffle(genre)
    titles, seen = [], set()
    for g in genre:
        while True:
            t = f"{genre_vocab[g][rng.integers(cfg.genre_words)]} {common[rng.integers(cfg.common_words)]}"
            if t not in seen:
                seen.add(t)
                titles.append(t)
                break
    rank = rng.permutation(cfg.num_items)
    weight = 1.0 / (rank + 1.0) ** cfg.zipf_exponent
    weight /= weight.sum()
    world = SyntheticWorld(cfg, titles, genre, weight)

    def user_example() -> RecExample:
        taste = rng.dirichlet(np.full(cfg.num_genres, cfg.taste_concentration))
        p = (taste[genre] + cfg.taste_floor) * weight
        length = int(rng.integers(cfg.min_history, cfg.max_history + 1))
        seq = rng.choice(cfg.num_items, size=length + 1, replace=False, p=p / p.sum())
        history, target = seq[:-1], int(seq[-1])
        others = np.setdiff1d(np.arange(cfg.num_items), seq)
        negatives = rng.choice(others, size=cfg.num_candidates - 1, replace=False)
        candidates = np.concatenate([[target], negatives])
        rng.shuffle(candidates)
        return RecExample(
            tuple(titles[i] for i in history), tuple(titles[i] for i in candidates), titles[target]
        )

    world.train = [user_example() for _ in range(cfg.num_train)]
    world.val = [user_example() for _ in range(cfg.num_val)]
    world.test = [user_example() for _ in range(cfg.num_test)]
    return world
