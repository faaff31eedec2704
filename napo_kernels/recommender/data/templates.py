"""Prompt templates: how a history and a candidate list become the text a causal LM reads.

The answer a model is trained to produce (and scored on) is ``answer_prefix + title``; the
collator appends the tokenizer's EOS so that a greedy generation stops after one title.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RecPromptTemplate:
    """A next-item prompt with ``{history}`` and ``{candidates}`` slots.

    ``domain`` only fills the wording (``"artist"``, ``"movie"``, ``"item"``). Keep prompts short
    for small models: every prompt token costs a forward position.
    """

    text: str = (
        "The user recently liked these {domain}s, oldest first: {history}.\n"
        "Candidates: {candidates}.\n"
        "The next {domain} the user will like, from the candidates:"
    )
    domain: str = "item"
    item_separator: str = ", "
    answer_prefix: str = " "

    def prompt(self, history: Sequence[str], candidates: Sequence[str]) -> str:
        return self.text.format(
            domain=self.domain,
            history=self.item_separator.join(history),
            candidates=self.item_separator.join(candidates),
        )

    def answer(self, title: str) -> str:
        return self.answer_prefix + title


@dataclass(frozen=True)
class AlpacaTemplate:
    """The instruction / response layout of DMPO's (alpaca-style) data."""

    text: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    answer_prefix: str = ""

    def prompt(self, instruction: str) -> str:
        return self.text.format(instruction=instruction)

    def answer(self, output: str) -> str:
        return self.answer_prefix + output


LASTFM_TEMPLATE = RecPromptTemplate(domain="artist")
SYNTHETIC_TEMPLATE = RecPromptTemplate(domain="item")
