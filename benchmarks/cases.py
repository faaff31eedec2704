"""What is measured: the benchmark shapes (one :class:`Shape` per measured point) and their inputs.

A shape describes one training step of a multi-negative preference loss on top of a policy's last
hidden states: ``B`` prompts with ``C = K + 1`` candidates each (candidate 0 is the positive), every
candidate a sequence of ``prompt_len`` unscored tokens followed by ``answer_len`` scored tokens.
The inputs are synthetic and seeded, so a fresh process (the memory probe) rebuilds exactly the
same tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from napo_kernels.constants import IGNORE_INDEX

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
VARIANTS = ("frozen", "trainable")


@dataclass(frozen=True)
class Shape:
    """One measured configuration. ``trainable`` says whether ``lm_head`` gets a gradient."""

    prompts: int  # B
    negatives: int  # K own negatives per prompt
    prompt_len: int  # unscored tokens per candidate
    answer_len: int  # scored tokens per candidate
    hidden: int  # H
    vocab: int  # V
    method: str = "napo"
    sharing: str = "all"
    dtype: str = "float32"
    trainable: bool = False
    chunk_size: int | None = None  # napo-kernels' rows per chunk (None: its own choice)
    seed: int = 0

    @property
    def candidates(self) -> int:
        return self.negatives + 1

    @property
    def sequences(self) -> int:
        return self.prompts * self.candidates

    @property
    def tokens(self) -> int:
        return self.prompt_len + self.answer_len

    @property
    def scored_rows(self) -> int:
        return self.sequences * self.answer_len

    @property
    def all_rows(self) -> int:
        return self.sequences * self.tokens

    @property
    def pool_per_prompt(self) -> int:
        return self.prompts * self.negatives if self.sharing == "all" else self.negatives

    @property
    def variant(self) -> str:
        return "trainable" if self.trainable else "frozen"

    @property
    def grad_bytes(self) -> int:
        """Bytes of the gradients a step hands back (``hidden``, and ``weight`` when trainable): the
        floor of every contender's peak extra memory."""
        size = torch.empty(0, dtype=DTYPES[self.dtype]).element_size()
        return size * (self.all_rows * self.hidden + (self.vocab * self.hidden if self.trainable else 0))

    def with_variant(self, variant: str) -> Shape:
        return replace(self, trainable=variant == "trainable")

    def describe(self) -> str:
        pool = f"pool {self.pool_per_prompt}/prompt ({self.sharing})"
        return (
            f"{self.method} B={self.prompts} K={self.negatives} {pool} T={self.prompt_len}+{self.answer_len} "
            f"H={self.hidden} V={self.vocab} {self.dtype}, {self.variant} lm_head"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Shape:
        return Shape(**d)


@dataclass
class Inputs:
    """The canonical inputs every contender starts from: ``hidden [B, C, T, H]`` (a leaf that
    requires grad, standing in for the model body's output), ``weight [V, H]`` (``lm_head``) and
    ``labels [B, C, T]`` with ``IGNORE_INDEX`` on the prompt positions."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor


def make_inputs(shape: Shape, device: str | torch.device = "cpu") -> Inputs:
    gen = torch.Generator().manual_seed(shape.seed)
    b, c, t, h, v = shape.prompts, shape.candidates, shape.tokens, shape.hidden, shape.vocab
    dtype = DTYPES[shape.dtype]
    hidden = torch.randn(b, c, t, h, generator=gen).to(device=device, dtype=dtype)
    # logits with a standard deviation of about 1.6: a softmax that is neither flat nor one-hot
    weight = (torch.randn(v, h, generator=gen) * (1.6 / h**0.5)).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (b, c, t), generator=gen)
    labels[..., : shape.prompt_len] = IGNORE_INDEX
    return Inputs(hidden.requires_grad_(), weight.requires_grad_(shape.trainable), labels.to(device))


# ----------------------------------------------------------------------------------------------
# The cases. Full shapes follow the issue; --quick shapes are tiny (a smoke run, seconds).
# ----------------------------------------------------------------------------------------------


def rec_shape(quick: bool) -> Shape:
    """LLM recommender step: B = 8 prompts, K = 3 own negatives shared across the batch (NAPO),
    128 prompt + 8 answer tokens per candidate, only the answer scored."""
    if quick:
        return Shape(prompts=2, negatives=2, prompt_len=8, answer_len=4, hidden=32, vocab=256)
    return Shape(prompts=8, negatives=3, prompt_len=128, answer_len=8, hidden=1024, vocab=32000)


def dense_shape(quick: bool) -> Shape:
    """Pairwise DPO with every one of T = 256 tokens scored (chat-style DPO, no sharing)."""
    dims = dict(prompts=2, answer_len=8, hidden=32, vocab=256) if quick else \
        dict(prompts=2, answer_len=256, hidden=1024, vocab=32000)  # fmt: skip
    return Shape(negatives=1, prompt_len=0, method="dpo", sharing="own", **dims)


def pool_bar_shapes(quick: bool) -> tuple[Shape, Shape]:
    """Same forward work, pool of 3 own negatives per prompt vs 93 shared ones (B = 31, K = 3)."""
    base = rec_shape(quick)
    own = replace(base, prompts=5 if quick else 31, negatives=3, sharing="own")
    return own, replace(own, sharing="all")


@dataclass(frozen=True)
class Sweep:
    """A scaling sweep: one variable changed over ``points`` around the rec shape."""

    name: str
    label: str  # x-axis label
    points: tuple[tuple[int, Shape], ...]
    napo_only: bool = False  # the variable only exists for napo-kernels (its chunk size)


def scaling_sweeps(quick: bool) -> list[Sweep]:
    base = rec_shape(quick)
    if quick:
        ks, vocabs, prompts, chunks = (1, 2), (128, 256), (4, 8), (8, 16)
    else:
        ks, vocabs = (1, 3, 7, 11, 19), (8192, 16384, 32000, 65536, 131072)
        prompts, chunks = (32, 128, 512), (16, 32, 64, 128, 256, 512)
    return [
        Sweep("pool", "own negatives K per prompt (shared pool = B*K)",
              tuple((k, replace(base, negatives=k)) for k in ks)),
        Sweep("vocab", "vocabulary size V", tuple((v, replace(base, vocab=v)) for v in vocabs)),
        Sweep("tokens", f"prompt tokens per candidate (unscored; {base.answer_len} answer tokens scored)",
              tuple((p, replace(base, prompt_len=p)) for p in prompts)),
        Sweep("chunk", "napo-kernels chunk size (rows of V per block)",
              tuple((c, replace(base, chunk_size=c)) for c in chunks), napo_only=True),
    ]  # fmt: skip
