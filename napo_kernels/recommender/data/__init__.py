"""Recommendation data: readers of the papers' formats, prompt templates, negative sampling,
the synthetic world used by demos and tests, and item popularity for the bias metrics."""

from .datasets import PairPreferenceDataset, RecPreferenceDataset
from .popularity import ItemPopularity
from .records import (
    PairExample,
    RecExample,
    parse_rec_records,
    read_alpaca_pairs,
    read_id2name,
    read_rec_json,
    reverse_ranking,
    write_rec_json,
)
from .sampling import NegativeSampler
from .synthetic import SyntheticWorld, WorldConfig, generate_world
from .templates import LASTFM_TEMPLATE, SYNTHETIC_TEMPLATE, AlpacaTemplate, RecPromptTemplate
from .tokenizer import train_bpe_tokenizer

__all__ = [
    "LASTFM_TEMPLATE",
    "SYNTHETIC_TEMPLATE",
    "AlpacaTemplate",
    "ItemPopularity",
    "NegativeSampler",
    "PairExample",
    "PairPreferenceDataset",
    "RecExample",
    "RecPreferenceDataset",
    "RecPromptTemplate",
    "SyntheticWorld",
    "WorldConfig",
    "generate_world",
    "parse_rec_records",
    "read_alpaca_pairs",
    "read_id2name",
    "read_rec_json",
    "reverse_ranking",
    "train_bpe_tokenizer",
    "write_rec_json",
]
