"""GPU-only checks: the ``triton`` and ``cuda`` backends on CUDA tensors, at realistic sizes.

Skipped on machines without a CUDA device (every development and CI machine of this project so
far); ready for the day one exists. What only a GPU can show: compiled (not interpreted) Triton with
its autotuned launch configurations, bfloat16 tensor-core ``tl.dot``, the vocabulary split that
fills the SMs when few rows are scored, bitwise determinism on real hardware, and ``torch.compile``
over a training step that calls :func:`napo_kernels.napo_loss`.

Ground truth is ``napo_kernels/reference.py`` in float64 on the same (rounded) inputs. float32 must
match it closely; float16/bfloat16 must be no worse than the ``torch`` backend run in the same dtype
plus two units of that dtype's precision.
"""

from __future__ import annotations

import pytest
import torch

import napo_kernels as nk
from napo_kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none here"),
    pytest.mark.filterwarnings("ignore:napo. no margin_state:UserWarning"),
]

DEVICE = "cuda"
GPU_BACKENDS = ("triton", "cuda")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A Llama-sized head over a recommendation batch: 8 prompts x 4 candidates x 24 positions, of which
# the answer (the last 8) is scored; odd vocabularies, so the edge tiles are partial.
STAGE1 = dict(b=8, c=4, t=24, answer=8, h=2048, v=32003)
LOGITS = dict(b=4, c=2, t=16, answer=8, v=32003)
SPLIT = dict(rows=96, h=1024, v=50001)  # few rows, large vocabulary: the forward splits the vocabulary
COMPILE = dict(b=4, c=4, t=12, answer=6, h=256, v=4099)


def require(backend: str) -> None:
    if backend == "torch":
        return
    info = nk.backends()[backend]
    if not info.available or DEVICE not in info.devices:
        pytest.skip(f"backend {backend!r} unavailable on this machine: {info.reason}")


def err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.detach().double() - truth.detach().double()).abs().max())


def check(got, truth, lowp, dtype: torch.dtype, what: str) -> None:
    """float32: close to the float64 truth; float16/bfloat16: no worse than ``lowp`` + margin."""
    scale = max(1.0, float(truth.detach().abs().max()))
    if dtype == torch.float32:
        assert err(got, truth) <= 5e-5 * scale, f"{what}: error {err(got, truth):.3g} at scale {scale:.3g}"
        return
    margin = 2 * torch.finfo(dtype).eps * scale
    mine, bar = err(got, truth), err(lowp, truth)
    assert mine <= bar + margin, f"{what}: error {mine:.3g} > torch backend's {bar:.3g} + {margin:.3g}"


def upstream(scores: torch.Tensor) -> torch.Tensor:
    """A fixed, sign-changing upstream gradient, so per-sequence scaling is checked too."""
    u = torch.linspace(-1, 1, scores.numel(), device=scores.device, dtype=scores.dtype)
    return u.reshape(scores.shape)


def labels_for(shape: dict, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, shape["v"], (shape["b"], shape["c"], shape["t"]), generator=gen)
    labels[..., : shape["t"] - shape["answer"]] = reference.IGNORE_INDEX  # the prompt is not scored
    return labels.to(DEVICE)


def stage1_problem(dtype: torch.dtype, seed: int = 0):
    """``(hidden [B, C, T, H], weight [V, H], bias [V], labels [B, C, T])``."""
    gen = torch.Generator().manual_seed(seed)
    s = STAGE1
    hidden = torch.randn(s["b"], s["c"], s["t"], s["h"], generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(s["v"], s["h"], generator=gen) * 2 / s["h"] ** 0.5).to(DEVICE, dtype)
    bias = (torch.randn(s["v"], generator=gen) * 0.5).to(DEVICE, dtype)
    return hidden, weight, bias, labels_for(s, gen)


def stage1_run(
    impl: str, hidden, weight, bias, labels, cast: torch.dtype, frozen: bool, softcap=None, logit_scale=1.0
) -> list:
    """Scores and the gradients of ``sum(upstream * scores)`` (hidden only when ``frozen``)."""
    h = hidden.detach().to(cast).requires_grad_()
    w, b = (x.detach().to(cast).requires_grad_(not frozen) for x in (weight, bias))
    head = dict(softcap=softcap, logit_scale=logit_scale)
    if impl == "reference":
        scores = reference.sequence_scores(h, w, labels, b, **head)
    else:
        scores = nk.sequence_logprobs(h, w, labels, b, backend=impl, **head)
    live = [x for x in (h, w, b) if x.requires_grad]
    return [scores, *torch.autograd.grad((scores * upstream(scores)).sum(), live)]


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sequence_logprobs_gpu(backend, dtype, frozen):
    require(backend)
    problem = stage1_problem(dtype)
    got = stage1_run(backend, *problem, dtype, frozen)
    lowp = stage1_run("torch", *problem, dtype, frozen)
    truth = stage1_run("reference", *problem, torch.float64, frozen)
    assert len(got) == (2 if frozen else 4)
    for name, g, lo, tr in zip(("scores", "d_hidden", "d_weight", "d_bias"), got, lowp, truth):
        assert g.dtype == (torch.float32 if name == "scores" else dtype), name
        check(g, tr, lo, dtype, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kept_logits_match_recompute_gpu(backend, dtype, monkeypatch):
    """A trainable head with what the forward kept (``NAPO_KERNELS_KEEP_LOGITS=1``) against the
    recompute (``=0``), both against the float64 truth: what was kept must be no worse than the
    recompute (triton reads the logits its forward computed, whose launch configuration may round
    them unlike the backward's; cuda's kept probabilities replace the recomputed exp)."""
    require(backend)
    problem = stage1_problem(dtype, seed=1)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("NAPO_KERNELS_KEEP_LOGITS", flag)
        runs[flag] = stage1_run(backend, *problem, dtype, frozen=False)
    truth = stage1_run("reference", *problem, torch.float64, frozen=False)
    for name, kept, recomputed, tr in zip(
        ("scores", "d_hidden", "d_weight", "d_bias"), runs["1"], runs["0"], truth
    ):
        check(kept, tr, recomputed, dtype, f"{backend} {dtype} {name}, kept")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kept_logits_second_backward_gpu(backend):
    """``retain_graph``: a second backward through the same graph gives the first one's gradients
    (cuda's first backward overwrote what its forward kept; the op keeps it again)."""
    require(backend)
    hidden, weight, bias, labels = stage1_problem(torch.float32, seed=2)
    h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    scores = nk.sequence_logprobs(h, w, labels, b, backend=backend)
    loss = (scores * upstream(scores)).sum()
    first = torch.autograd.grad(loss, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w, b))
    for name, a, c in zip(("d_hidden", "d_weight", "d_bias"), first, second):
        assert torch.equal(a, c), name


@pytest.mark.parametrize("head", [(30.0, 1.0), (None, 0.0625), (10.0, 2.0)], ids=["gemma2", "cohere", "both"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_softcap_and_logit_scale_gpu(backend, dtype, frozen, head):
    """Soft-capped and scaled heads: the CUDA row passes (napo_math.h's maps) and the Triton kernels'
    compile-time variants against the reference, values and gradients. The logits are scaled up so
    that the cap of 10 saturates tanh for part of the vocabulary."""
    require(backend)
    hidden, weight, bias, labels = stage1_problem(dtype, seed=5)
    weight = weight * 6
    got = stage1_run(backend, hidden, weight, bias, labels, dtype, frozen, *head)
    lowp = stage1_run("torch", hidden, weight, bias, labels, dtype, frozen, *head)
    truth = stage1_run("reference", hidden, weight, bias, labels, torch.float64, frozen, *head)
    for name, g, lo, tr in zip(("scores", "d_hidden", "d_weight", "d_bias"), got, lowp, truth):
        assert torch.isfinite(g).all(), name
        check(g, tr, lo, dtype, f"{backend} {dtype} {head} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_logits_path_gpu(backend, dtype):
    require(backend)
    gen = torch.Generator().manual_seed(1)
    s = LOGITS
    logits = (torch.randn(s["b"], s["c"], s["t"], s["v"], generator=gen) * 3).to(DEVICE, dtype)
    labels = labels_for(s, gen)

    def run(impl: str, cast: torch.dtype) -> list[torch.Tensor]:
        x = logits.detach().to(cast).requires_grad_()
        if impl == "reference":
            scores = reference.sequence_scores_from_logits(x, labels)
        else:
            scores = nk.sequence_logprobs_from_logits(x, labels, backend=impl)
        return [scores, *torch.autograd.grad((scores * upstream(scores)).sum(), [x])]

    got, lowp, truth = run(backend, dtype), run("torch", dtype), run("reference", torch.float64)
    for name, g, lo, tr in zip(("scores", "d_logits"), got, lowp, truth):
        check(g, tr, lo, dtype, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("method", nk.METHODS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_preference_loss_gpu(backend, method):
    """Stage 2 at training size (B = 128 prompts, K = 3, shared pool) against the reference."""
    require(backend)
    gen = torch.Generator().manual_seed(2)
    k, sharing = (1, "own") if method == "dpo" else (3, "all")
    chosen = (torch.randn(128, generator=gen, dtype=torch.float64) * 3 - 8).to(DEVICE)
    rejected = (torch.randn(128, k, generator=gen, dtype=torch.float64) * 3 - 8).to(DEVICE)
    results = []
    margin = {"napo": dict(gamma0=0.5), "dynamicpo": {}}.get(method, dict(gamma=0.5))
    for impl in (backend, "reference"):
        c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
        if impl == "reference":
            loss = reference.family_loss(c, r, method=method, sharing=sharing, **margin)[0]
        else:
            loss = nk.preference_loss(c, r, method=method, sharing=sharing, backend=impl, **margin)
        results.append([loss, *torch.autograd.grad(loss, [c, r])])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_triton_deterministic_and_split_gpu():
    """No atomics: two runs give the same bits; the automatic vocabulary split (several programs
    per row block when few rows are scored) agrees with a single split up to rounding."""
    require("triton")
    from napo_kernels.kernels.triton import linear_logprobs as tlin

    gen = torch.Generator().manual_seed(3)
    r, h, v = SPLIT["rows"], SPLIT["h"], SPLIT["v"]
    hidden = torch.randn(r, h, generator=gen).to(DEVICE, torch.bfloat16)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(DEVICE, torch.bfloat16)
    targets = torch.randint(0, v, (r,), generator=gen).to(DEVICE)
    grad = torch.randn(r, generator=gen).to(DEVICE)
    assert tlin.vocab_splits(r, v, h, hidden.device) > 1, "this shape is meant to exercise the split"
    runs = []
    for splits in (None, None, 1):
        logp, lse, expected = tlin.linear_logprobs_fwd(hidden, weight, None, targets, 0, True, splits=splits)
        d = tlin.linear_logprobs_bwd(
            grad, hidden, weight, None, targets, lse, 0, True, True, False, splits=splits
        )
        runs.append([logp, lse, expected, d[0], d[1]])
    for a, b, single in zip(*runs):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.float(), single.float(), rtol=2e-2, atol=2e-3)


class TinyPolicy(torch.nn.Module):
    """A stand-in for an LLM: embedding, one MLP block, an ``lm_head``."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.block = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.LayerNorm(width)
        )
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(ids))


@pytest.mark.parametrize("backend", ("triton", "cuda", "torch"))
def test_torch_compile_training_step(backend):
    """``torch.compile`` traces the custom ops through their fake implementations (the kernels stay
    opaque calls) and reproduces the eager step's loss and every parameter gradient."""
    require(backend)
    torch.manual_seed(4)
    s = COMPILE
    model = TinyPolicy(s["v"], s["h"]).to(DEVICE)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, s["v"], (s["b"], s["c"], s["t"]), generator=gen).to(DEVICE)
    labels = labels_for(s, gen)

    def step(ids, labels):
        hidden = model(ids)
        weight = model.lm_head.weight
        return nk.napo_loss(hidden, weight, labels, method="napo", sharing="all", backend=backend)

    results = []
    for fn in (step, torch.compile(step)):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, labels)
        loss.backward()
        results.append([loss.detach(), *(p.grad.clone() for p in model.parameters())])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
