"""napo-kernels: fused multi-negative preference losses for LLM recommenders.

Stage 1 (:func:`sequence_logprobs`) turns last hidden states and the ``lm_head`` weight into one
log-probability per candidate sequence without materialising the logits; stage 2
(:func:`preference_loss`) turns those scores into DPO / S-DPO / DMPO / NAPO / DynamicPO losses over
a (shared) negative pool; :func:`napo_loss` does both.
"""

from .config import METHODS, LossConfig
from .dispatch import BackendInfo, backends
from .heads import LMHead, UnsupportedHeadError, lm_head_of, trust_lm_head
from .logprobs import choose_chunk_size, sequence_logprobs, sequence_logprobs_from_logits
from .losses import PreferenceLoss, napo_loss, preference_loss
from .margin import DynamicMargin
from .pipeline import PreferenceOutput

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BackendInfo",
    "DynamicMargin",
    "LMHead",
    "LossConfig",
    "PreferenceLoss",
    "PreferenceOutput",
    "UnsupportedHeadError",
    "backends",
    "choose_chunk_size",
    "lm_head_of",
    "napo_loss",
    "preference_loss",
    "sequence_logprobs",
    "sequence_logprobs_from_logits",
    "trust_lm_head",
]
