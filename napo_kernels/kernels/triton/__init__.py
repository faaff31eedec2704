"""The ``triton`` backend: the five kernel functions of the contract in ``torch_chunked``.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow: for tests). Supports
float16, bfloat16, float32 and float64 inputs with float32 accumulation (float64 for float64).
``chunk_size`` is accepted and ignored: the kernels never materialise logits beyond register tiles.
Every reduction runs in a fixed order (no atomics), so results are deterministic run to run.
Target values are trusted, not checked (the public API validates labels; see ``torch_chunked``).

- stage 1 fused: :mod:`.linear_logprobs`
- stage 1 from logits: :mod:`.logits_logprobs`
- stage 2: :mod:`.preference`
"""

from __future__ import annotations

from .linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd
from .logits_logprobs import logits_logprobs_bwd, logits_logprobs_fwd
from .preference import preference_fwd

__all__ = [
    "linear_logprobs_bwd",
    "linear_logprobs_fwd",
    "logits_logprobs_bwd",
    "logits_logprobs_fwd",
    "preference_fwd",
]
