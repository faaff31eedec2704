"""Shared test helpers: backend parameters, hypothesis strategies for stage-1 / stage-2 problems,
independent ground truths and the tolerance rules every comparison uses.

Random tensors come from a ``torch.Generator`` seeded by hypothesis (drawing every element through
hypothesis would be slow); hypothesis chooses the shapes, layouts, masks and options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor

import napo_kernels as nk
from napo_kernels import reference

IGNORE = reference.IGNORE_INDEX

# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------

# Examples per hypothesis test: the Triton interpreter costs ~1 ms per program instance.
MAX_EXAMPLES = {"torch": 25, "cpp": 25, "triton": 10, "cuda": 10}


def required_backends() -> set[str]:
    """Backends that must run (a missing one fails instead of skipping): ``NAPO_REQUIRE_BACKENDS``
    (comma separated), by default ``torch`` and, under CI (``CI`` set), also ``cpp``, which CI builds."""
    default = "torch,cpp" if os.environ.get("CI") else "torch"
    return {
        name.strip() for name in os.environ.get("NAPO_REQUIRE_BACKENDS", default).split(",") if name.strip()
    }


def backend_params() -> list:
    """One ``pytest.param`` per backend; a backend that cannot run CPU tensors here is a visible
    skip carrying the reason ``napo_kernels.backends()`` gives (a failure if it is required)."""
    params = []
    required = required_backends()
    for name, info in nk.backends().items():
        marks = [pytest.mark.triton] if name == "triton" else []
        problem = ""
        if not info.available:
            problem = f"backend {name!r} unavailable: {info.reason}"
        elif "cpu" not in info.devices:
            problem = f"backend {name!r} runs on {info.devices} only (no CPU)"
        if problem and name not in required:
            marks.append(pytest.mark.skip(reason=problem))
        params.append(pytest.param((name, problem), marks=marks, id=name))
    return params


def small(backend: str) -> bool:
    """Interpreted Triton gets the smallest shapes."""
    return backend == "triton"


def hyp(backend: str, scale: float = 1.0, **kwargs) -> settings:
    """Hypothesis settings for a test run on ``backend`` (examples scaled by ``scale``)."""
    n = max(2, int(MAX_EXAMPLES.get(backend, 10) * scale))
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# Tolerances
# ----------------------------------------------------------------------------------------------

# (rtol, atol relative to the largest |expected|) when a kernel in ``dtype`` is compared with the
# float64 ground truth; fp16/bf16 use the low-precision rule in ``assert_lowp_no_worse`` instead.
TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (2e-5, 2e-6)}


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``|a - e| <= atol * max(1, max|e|) + rtol * |e|`` elementwise, computed in float64."""
    rtol, atol = TOL[dtype]
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {list(a.shape)} != {list(e.shape)}"
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def max_err(x: Tensor, truth: Tensor) -> float:
    return float((x.detach().double() - truth.detach().double()).abs().max()) if truth.numel() else 0.0


def assert_lowp_no_worse(kernel: Tensor, lowp: Tensor, truth: Tensor, dtype: torch.dtype, what: str) -> None:
    """The low-precision rule (in the style of ml-cross-entropy): the kernel's largest error
    against the float64 ground truth is no worse than that of the plain PyTorch implementation run
    in the same low precision, plus a margin of one unit of ``dtype`` precision at the tensor's scale:

        max|kernel - truth| <= max|lowp - truth| + eps(dtype) * max(1, max|truth|)

    (Measured on the shapes of these tests the excess stays below 0.75 eps * scale: the weight
    gradient, accumulated over row chunks, is the closest.)
    """
    margin = torch.finfo(dtype).eps * max(1.0, float(truth.detach().abs().max()))
    k, r = max_err(kernel, truth), max_err(lowp, truth)
    assert k <= r + margin, f"{what}: kernel error {k:.3g} > plain low-precision error {r:.3g} + {margin:.3g}"


# ----------------------------------------------------------------------------------------------
# Stage 1 problems
# ----------------------------------------------------------------------------------------------

LABEL_PATTERNS = ("prefix", "random", "one", "all")


@dataclass
class Stage1:
    """A stage-1 problem. Structured: ``hidden [*lead, T, H]`` and ``labels [*lead, T]``;
    packed: ``hidden [N, H]``, ``labels [N]`` and ``sequence_ids [N]`` for ``num_sequences``."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    reduction: str
    chunk_size: int | None
    sequence_ids: Tensor | None = None
    num_sequences: int | None = None
    info: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        out = dict(reduction=self.reduction, chunk_size=self.chunk_size)
        if self.sequence_ids is not None:
            out.update(sequence_ids=self.sequence_ids, num_sequences=self.num_sequences)
        return out


def make_labels(shape: tuple[int, ...], vocab: int, pattern: str, gen: torch.Generator) -> Tensor:
    """Labels ``[..., T]`` where every sequence has at least one scored token.

    ``prefix``: the prompt part is ignored, then a scored answer (the recommender layout);
    ``random``: an arbitrary ignore pattern; ``one``: exactly one scored token per sequence;
    ``all``: nothing ignored (the stage-1 rows are then a view of the hidden states, no gather).
    """
    *lead, t = shape
    labels = torch.randint(0, vocab, shape, generator=gen)
    flat = labels.reshape(-1, t)
    n = flat.shape[0]
    if pattern == "prefix":
        start = torch.randint(0, t, (n,), generator=gen)
        keep = torch.arange(t)[None, :] >= start[:, None]
    elif pattern == "random":
        keep = torch.rand(n, t, generator=gen) < 0.6
        keep[torch.arange(n), torch.randint(0, t, (n,), generator=gen)] = True
    elif pattern == "all":
        keep = torch.ones(n, t, dtype=torch.bool)
    elif pattern == "one":
        keep = torch.zeros(n, t, dtype=torch.bool)
        keep[torch.arange(n), torch.randint(0, t, (n,), generator=gen)] = True
    else:
        raise AssertionError(pattern)
    return flat.masked_fill(~keep, IGNORE).reshape(shape)


def make_params(
    h: int, v: int, dtype: torch.dtype, with_bias: bool, gen: torch.Generator, scale: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) * scale / h**0.5).to(dtype)
    bias = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.5).to(dtype) if with_bias else None
    return weight, bias


@st.composite
def stage1_problems(
    draw,
    dtypes=(torch.float64, torch.float32),
    tiny: bool = False,
    layouts=("structured", "packed"),
    reductions=("sum", "mean"),
) -> Stage1:
    """Odd sizes, every label pattern, both layouts and reductions, chunk sizes 1 / middle / auto /
    larger than the row count, with and without bias."""
    dtype = draw(st.sampled_from(dtypes))
    cap_v, cap_h, cap_t = (37, 12, 4) if tiny else (131, 40, 9)
    b = draw(st.integers(1, 2 if tiny else 3))
    c = draw(st.integers(1, 3 if tiny else 4))
    t = draw(st.integers(1, cap_t))
    h = draw(st.integers(1, cap_h))
    v = draw(st.integers(2, cap_v))
    pattern = draw(st.sampled_from(LABEL_PATTERNS))
    layout = draw(st.sampled_from(layouts))
    reduction = draw(st.sampled_from(reductions))
    with_bias = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weight, bias = make_params(h, v, dtype, with_bias, gen, scale=draw(st.sampled_from([1.0, 4.0])))
    labels = make_labels((b, c, t), v, pattern, gen)
    hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64).to(dtype)
    rows = int((labels != IGNORE).sum())
    chunk = draw(st.sampled_from(["auto", "one", "mid", "over"]))
    chunk_size = {"auto": None, "one": 1, "mid": max(1, rows // 3), "over": rows + 5}[chunk]
    info = dict(b=b, c=c, t=t, h=h, v=v, pattern=pattern, layout=layout, chunk=chunk)
    if layout == "structured":
        return Stage1(hidden, weight, bias, labels, reduction, chunk_size, info=info)
    # packed: keep each sequence's positions (scored and some ignored), shuffle rows across sequences
    seq = torch.arange(b * c).repeat_interleave(t)
    flat_h, flat_l = hidden.reshape(-1, h), labels.reshape(-1)
    keep = (flat_l != IGNORE) | (torch.rand(flat_l.shape, generator=gen) < 0.3)
    perm = torch.randperm(int(keep.sum()), generator=gen)
    return Stage1(
        flat_h[keep][perm].contiguous(), weight, bias, flat_l[keep][perm].contiguous(), reduction,
        chunk_size, sequence_ids=seq[keep][perm].contiguous(), num_sequences=b * c, info=info,
    )  # fmt: skip


def reference_stage1(p: Stage1, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Ground truth from ``reference.sequence_scores`` (packed rows are scored one by one and summed
    per sequence here)."""
    if p.sequence_ids is None:
        return reference.sequence_scores(hidden, weight, p.labels, bias, p.reduction)
    per_row = reference.sequence_scores(hidden[:, None, :], weight, p.labels[:, None], bias, "sum")
    scores = per_row.new_zeros(p.num_sequences).index_add(0, p.sequence_ids, per_row)
    if p.reduction == "mean":
        counts = torch.bincount(p.sequence_ids[p.labels != IGNORE], minlength=p.num_sequences)
        scores = scores / counts.to(scores.dtype)
    return scores


def leaf(x: Tensor | None, dtype: torch.dtype | None = None, grad: bool = True) -> Tensor | None:
    """A fresh leaf copy (optionally cast) with ``requires_grad``."""
    if x is None:
        return None
    y = x.detach().clone() if dtype is None else x.detach().to(dtype)
    return y.requires_grad_(grad)


def grads(loss: Tensor, tensors: list[Tensor | None]) -> list[Tensor | None]:
    """Gradients of ``loss`` for each tensor that requires grad (None elsewhere)."""
    live = [x for x in tensors if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad(loss, live, allow_unused=True))
    return [next(got) if x is not None and x.requires_grad else None for x in tensors]


# ----------------------------------------------------------------------------------------------
# Stage 2 problems
# ----------------------------------------------------------------------------------------------

SHARINGS = ("own", "all", "matrix", "similarity")


@dataclass
class Stage2:
    """A stage-2 problem with the options both ``preference_loss`` implementations take."""

    chosen: Tensor  # [B]
    rejected: Tensor  # [B, K]
    mask: Tensor | None  # [B, K]
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    options: dict  # method, beta, gamma, sharing, user_embeddings, rho, margin_mode, alpha, mu, tau, ...
    confidence: Tensor | None = None  # [B, K]


def make_sharing(kind: str, b: int, gen: torch.Generator) -> tuple[str | Tensor, Tensor | None]:
    """``(sharing, user_embeddings)`` for a sharing kind; ``matrix`` is a random ``[B, B]`` bool
    with the (required) True diagonal."""
    if kind == "matrix":
        return (torch.rand(b, b, generator=gen) < 0.5) | torch.eye(b, dtype=torch.bool), None
    if kind == "similarity":
        return "similarity", torch.randn(b, 3, generator=gen, dtype=torch.float64)
    return kind, None


def make_mask(b: int, k: int, sharing: str | Tensor, user_embeddings, rho: float, gen) -> Tensor:
    """A random ``[B, K]`` validity mask (variable K per prompt) in which every prompt's pool is
    non-empty; a prompt may lose all its own negatives if sharing gives it others."""
    mask = torch.rand(b, k, generator=gen) < 0.7
    pool = reference.pool_mask(mask, sharing, user_embeddings, rho)
    for i in torch.nonzero(~pool.any(1)).flatten().tolist():
        mask[i, 0] = True
    return mask


def draw_options(
    draw, method: str, b: int, k: int, kind: str, gen: torch.Generator
) -> tuple[dict, Tensor | None]:
    """Loss options for ``method`` (sharing ``kind``) and a ``[B, K]`` validity mask (or None)."""
    rho = draw(st.sampled_from([0.3, 0.5, 0.7, 1.0]))
    sharing, user = make_sharing(kind, b, gen)
    mask = None if method == "dpo" or draw(st.booleans()) else make_mask(b, k, sharing, user, rho, gen)
    margin = draw(st.sampled_from([0.0, 0.5, 1.0]))
    options = dict(
        method=method,
        beta=draw(st.sampled_from([0.1, 1.0, 2.5])),
        sharing=sharing,
        user_embeddings=user,
        rho=rho,
        tau=draw(st.sampled_from([2.0, 0.5])),
        detach_negatives=draw(
            st.sampled_from(["none", "shared", "all"] if kind != "own" else ["none", "all"])
        ),
    )
    if method == "napo":
        options.update(
            gamma0=margin,
            margin_mode=draw(st.sampled_from(["batch", "per_negative", "none"])),
            alpha=draw(st.sampled_from([0.3, 0.7])),
            mu=draw(st.sampled_from([0.0, 0.9])),
        )
    elif method != "dynamicpo":
        options.update(gamma=margin)
    return options, mask


@st.composite
def stage2_problems(
    draw,
    methods=nk.METHODS,
    sharings=SHARINGS,
    dtypes=(torch.float64, torch.float32),
    max_b: int = 6,
    max_k: int = 4,
) -> Stage2:
    """Every method, sharing mode, margin mode, caller / default confidence, reference-free or not,
    variable K, ``detach_negatives``; scores continuous or on a coarse grid (exact ties)."""
    method = draw(st.sampled_from(methods))
    dtype = draw(st.sampled_from(dtypes))
    b = draw(st.integers(1, max_b))
    k, kind = (
        (1, "own") if method == "dpo" else (draw(st.integers(1, max_k)), draw(st.sampled_from(sharings)))
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    grid = draw(st.booleans())

    def scores(*shape: int) -> Tensor:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 - 8
        return (x.round() if grid else x).to(dtype)

    options, mask = draw_options(draw, method, b, k, kind, gen)
    ref_c, ref_r = (scores(b), scores(b, k)) if draw(st.booleans()) else (None, None)
    confidence = torch.rand(b, k, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None
    return Stage2(scores(b), scores(b, k), mask, ref_c, ref_r, options, confidence)


def reference_stage2(p: Stage2, chosen: Tensor, rejected: Tensor, ema: float = 0.0) -> tuple[Tensor, dict]:
    """``reference.family_loss`` with the problem's options."""
    conf = None if p.confidence is None else p.confidence.reshape(-1)
    return reference.family_loss(
        chosen, rejected, p.mask, p.ref_chosen, p.ref_rejected, confidence=conf, ema=ema, **p.options
    )


def api_stage2(p: Stage2, chosen: Tensor, rejected: Tensor, backend: str, **extra) -> nk.PreferenceOutput:
    """``napo_kernels.preference_loss`` with the problem's options."""
    return nk.preference_loss(
        chosen, rejected, p.mask, p.ref_chosen, p.ref_rejected, **api_options(p), backend=backend,
        return_outputs=True, **extra,
    )  # fmt: skip


def api_options(p: Stage2) -> dict:
    o = dict(p.options)
    o["confidence"] = p.confidence
    return o
