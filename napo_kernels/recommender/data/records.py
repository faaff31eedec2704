"""Recommendation records and readers for the two on-disk formats the papers use.

* S-DPO / NAPO / DynamicPO JSON (LastFM, ...): a list of ``{"historyList": "A::B::C",
  "itemList": [20 titles], "trueSelection": "title"}`` (``historyList`` may also be a list).
* DMPO alpaca JSON (MovieLens-1M ranking): ``{"instruction", "input", "output"}`` where
  ``output`` is ``[chosen, rejected]`` (preference rows) or a string (SFT rows).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HISTORY_SEPARATOR = "::"


@dataclass(frozen=True)
class RecExample:
    """One next-item example: the user's history (oldest first), the candidate list and the true item."""

    history: tuple[str, ...]
    candidates: tuple[str, ...]
    target: str

    @property
    def target_index(self) -> int:
        return self.candidates.index(self.target)

    def negatives(self) -> list[str]:
        """Every candidate except the target, in list order."""
        return [c for c in self.candidates if c != self.target]


@dataclass(frozen=True)
class PairExample:
    """A prompt with a chosen answer and its rejected answers (DMPO format; one rejected per row)."""

    prompt: str
    chosen: str
    rejected: tuple[str, ...] = ()


def _open_json(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def parse_rec_records(records: Iterable[dict]) -> list[RecExample]:
    """Validate and convert S-DPO-format dicts; errors name the record index and the field."""
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise TypeError(f"record {i}: expected a JSON object, got {type(r).__name__}")
        for key in ("historyList", "itemList", "trueSelection"):
            if key not in r:
                raise ValueError(f"record {i}: missing field {key!r}")
        hist = r["historyList"]
        history = (
            tuple(h for h in hist.split(HISTORY_SEPARATOR) if h) if isinstance(hist, str) else tuple(hist)
        )
        candidates = tuple(r["itemList"])
        target = r["trueSelection"]
        if not candidates:
            raise ValueError(f"record {i}: itemList is empty")
        if target not in candidates:
            raise ValueError(f"record {i}: trueSelection {target!r} is not in itemList")
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"record {i}: itemList has duplicate titles")
        out.append(RecExample(history, candidates, target))
    return out


def read_rec_json(path: str | Path, limit: int | None = None) -> list[RecExample]:
    """Read an S-DPO/NAPO-format file (``.json`` or ``.json.gz``), optionally only the first ``limit``."""
    data = _open_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return parse_rec_records(data[:limit] if limit is not None else data)


def to_rec_records(examples: Sequence[RecExample]) -> list[dict]:
    """The inverse of :func:`parse_rec_records` (history joined with ``::`` as in the papers' files)."""
    return [
        {
            "historyList": HISTORY_SEPARATOR.join(e.history),
            "itemList": list(e.candidates),
            "trueSelection": e.target,
        }
        for e in examples
    ]


def write_rec_json(path: str | Path, examples: Sequence[RecExample]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        json.dump(to_rec_records(examples), f, ensure_ascii=False)


def read_id2name(path: str | Path) -> dict[int, str]:
    """``item_id::name`` lines (LastFM's ``id2name.txt``)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            key, sep, name = line.partition(HISTORY_SEPARATOR)
            if not sep or not key.strip().isdigit():
                raise ValueError(f"{path}:{n}: expected 'item_id::name', got {line!r}")
            out[int(key)] = name
    return out


RANKING_SEPARATOR = " ,  "


def reverse_ranking(answer: str) -> str:
    """``" A ,  B "`` to ``" B ,  A "``: the other ordering of a DMPO two-item ranking answer."""
    parts = answer.split(RANKING_SEPARATOR)
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"expected a two-item ranking 'A , B', got {answer!r}")
    return f" {parts[1].strip()}{RANKING_SEPARATOR}{parts[0].strip()} "


def read_alpaca_pairs(
    path: str | Path, limit: int | None = None, reverse_rankings: bool = False
) -> list[PairExample]:
    """Read DMPO's alpaca rows. The prompt is ``instruction`` (plus ``input`` on a new line when
    non-empty); ``output`` is ``[chosen, rejected, ...]`` or a single answer string (SFT rows, and
    ``eval_ranking.json`` whose answer is the correct ordering). With ``reverse_rankings`` a string
    answer ``" A ,  B "`` gets the reversed ordering as its rejected answer (the AUC protocol)."""
    data = _open_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    out = []
    for i, r in enumerate(data[:limit] if limit is not None else data):
        if "instruction" not in r or "output" not in r:
            raise ValueError(f"record {i}: needs 'instruction' and 'output'")
        prompt = r["instruction"] + (("\n" + r["input"]) if r.get("input") else "")
        answers = r["output"]
        if isinstance(answers, str):
            try:
                rejected = (reverse_ranking(answers),) if reverse_rankings else ()
            except ValueError as err:
                raise ValueError(f"record {i}: {err}") from None
            out.append(PairExample(prompt, answers, rejected))
        elif isinstance(answers, list) and len(answers) >= 2 and all(isinstance(a, str) for a in answers):
            out.append(PairExample(prompt, answers[0], tuple(answers[1:])))
        else:
            raise ValueError(f"record {i}: output must be a string or a list [chosen, rejected, ...]")
    return out
