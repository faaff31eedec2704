"""The C++ CPU kernels (``torch.ops.napo_C``, csrc/) against the pure-torch twin and the reference.

Every op is compared with ``napo_kernels.kernels.torch_chunked`` (same contract, same GEMMs, so
the two agree to a few ulps) and with a float64 autograd ground truth built from
``napo_kernels.reference`` on odd, hypothesis-chosen shapes. fp16/bf16 follow the "no worse than
the torch backend plus a margin" rule against that ground truth.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip(
    "napo_kernels._C",
    reason="C++ extension napo_kernels._C is not built (pip install --no-build-isolation -e .)",
)

import napo_kernels as nk  # noqa: E402
from napo_kernels import reference  # noqa: E402
from napo_kernels.kernels import extension as cpp  # noqa: E402
from napo_kernels.kernels import torch_chunked
from napo_kernels.ops.linear_logprobs import keeps_logits, linear_logprobs  # noqa: E402
from napo_kernels.ops.logits_logprobs import logits_logprobs  # noqa: E402
from napo_kernels.ops.preference import preference_rows  # noqa: E402

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# |cpp - torch backend| for outputs that go through the same GEMM (the row pass differs by ulps)
TWIN_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# gradients are rounded to the input dtype: allow one or two units in the last place
GRAD_TWIN_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

SETTINGS = settings(max_examples=30, deadline=None)
# (softcap, logit_scale): a plain head, scale only (Cohere, Granite), Gemma 2's cap, a cap that
# saturates tanh at these logits, both
HEADS = [(None, 1.0), (None, 0.37), (30.0, 1.0), (1.5, 1.0), (2.0, 2.5)]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _problem(rows, width, vocab, dtype, with_bias, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, width, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(vocab, width, generator=g, dtype=torch.float64) / width**0.5).to(dtype)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    grad = torch.randn(rows, generator=g, dtype=_acc(dtype))
    return hidden, weight, bias, targets, grad


def _truth(hidden, weight, bias, targets, grad, head=(None, 1.0)):
    """float64 ground truth from the reference: logp, lse, expected and the three gradients, for a
    head ``(softcap, logit_scale)``."""
    softcap, scale = head
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    # a zero bias when there is none: its gradient is what the op returns for need_bias without a bias
    b = (
        bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    ).requires_grad_()
    # one-token sequences [R, 1]: the reference scores are then per-row log-probs
    logp = reference.sequence_scores(h[:, None], w, targets[:, None], b, softcap=softcap, logit_scale=scale)
    with torch.no_grad():
        z = (h @ w.T + b) * scale
        slope = torch.full_like(z, scale)  # dz / draw
        if softcap is not None:
            slope = scale * (1 - torch.tanh(z / softcap) ** 2)
            z = softcap * torch.tanh(z / softcap)
        lse = torch.logsumexp(z, -1)
        expected = (torch.softmax(z, -1) * slope) @ w
    logp.backward(grad.double())
    return dict(
        logp=logp.detach(), lse=lse.detach(), expected=expected.detach(),
        d_hidden=h.grad, d_weight=w.grad, d_bias=b.grad,
    )  # fmt: skip


def _err(x, y):
    return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0


def _close_twin(got, want, dtype, rtol):
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert got.dtype == want.dtype and got.shape == want.shape
    assert _err(got, want) <= rtol * max(scale, 1.0), (_err(got, want), scale)


def _no_worse(got, twin, truth, dtype, margin=1e-3):
    """Low precision: the C++ error vs the fp64 truth is at most the torch backend's plus a margin."""
    scale = max(truth.abs().max().item(), 1.0)
    assert _err(got, truth) <= 2 * _err(twin, truth) + margin * scale, (_err(got, truth), _err(twin, truth))


@contextlib.contextmanager
def vocab_tile(width: int | None):
    """Caps the CPU kernel's vocabulary tile (csrc/cpu/tiled_linear.h; None: its default of 512
    columns, so these small vocabularies take the untiled loop). Narrow tiles make small vocabularies
    cross many tile borders, with a ragged last tile and, for wide tiles, several row chunks."""
    old = os.environ.pop("NAPO_KERNELS_CPU_VOCAB_TILE", None)
    if width is not None:
        os.environ["NAPO_KERNELS_CPU_VOCAB_TILE"] = str(width)
    try:
        yield
    finally:
        os.environ.pop("NAPO_KERNELS_CPU_VOCAB_TILE", None)
        if old is not None:
            os.environ["NAPO_KERNELS_CPU_VOCAB_TILE"] = old


shapes = dict(
    tile=st.sampled_from([None, 1, 7, 64]),
    rows=st.integers(1, 23),
    width=st.integers(1, 37),
    vocab=st.integers(1, 301),
    chunk_extra=st.integers(0, 26),
    with_bias=st.booleans(),
    dtype=st.sampled_from(FLOATS),
    seed=st.integers(0, 2**16),
    head=st.sampled_from(HEADS),
)


@pytest.mark.slow  # many hypothesis examples
@SETTINGS
@given(**shapes, compute_expected=st.booleans())
def test_linear_forward(
    tile, rows, width, vocab, chunk_extra, with_bias, dtype, seed, head, compute_expected
):
    chunk = 1 + chunk_extra % (rows + 3)  # 1 .. rows + 3
    hidden, weight, bias, targets, _ = _problem(rows, width, vocab, dtype, with_bias, seed, scale=2.0)
    with vocab_tile(tile):
        got = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, chunk, compute_expected, *head)
    twin = torch_chunked.linear_logprobs_fwd(hidden, weight, bias, targets, chunk, compute_expected, *head)
    truth = _truth(hidden, weight, bias, targets, torch.zeros(rows, dtype=_acc(dtype)), head)
    for g, t in zip(got[:2], twin[:2]):
        _close_twin(g, t, dtype, TWIN_TOL[dtype])
    assert got[2].shape == ((rows, width) if compute_expected else (0,)) and got[2].dtype == _acc(dtype)
    if compute_expected:
        _close_twin(got[2], twin[2], dtype, GRAD_TWIN_RTOL[dtype])
    names = ("logp", "lse", "expected") if compute_expected else ("logp", "lse")
    for name, g, t in zip(names, got, twin):
        if dtype in (torch.float64, torch.float32):
            tol = 1e-10 if dtype == torch.float64 else 2e-5
            assert _err(g, truth[name]) <= tol * max(truth[name].abs().max().item(), 1.0), name
        else:
            _no_worse(g, t, truth[name], dtype)


@pytest.mark.slow  # many hypothesis examples
@SETTINGS
@given(**shapes, need=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_linear_backward(tile, rows, width, vocab, chunk_extra, with_bias, dtype, seed, head, need):
    chunk = 1 + chunk_extra % (rows + 3)
    need_hidden, need_weight, need_bias = need
    hidden, weight, bias, targets, grad = _problem(rows, width, vocab, dtype, with_bias, seed, scale=2.0)
    lse = torch_chunked.linear_logprobs_fwd(hidden, weight, bias, targets, chunk, False, *head)[1]
    args = (grad, hidden, weight, bias, targets, lse, chunk, need_hidden, need_weight, need_bias, *head)
    with vocab_tile(tile):
        got = cpp.linear_logprobs_bwd(*args)
    twin = torch_chunked.linear_logprobs_bwd(*args)
    truth = _truth(hidden, weight, bias, targets, grad, head)
    names = ("d_hidden", "d_weight", "d_bias")
    for name, wanted, g, t in zip(names, need, got, twin):
        if not wanted:
            assert g.numel() == 0, name
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        _close_twin(g, t, dtype, GRAD_TWIN_RTOL[dtype])
        want = truth[name]
        if dtype in (torch.float64, torch.float32):
            tol = 1e-10 if dtype == torch.float64 else 5e-5
            assert _err(g, want) <= tol * max(want.abs().max().item(), 1.0), name
        else:
            _no_worse(g, t, want, dtype, margin=2e-2)


# ---------------------------------------------------------------------------------------------
# Kept logits (a trainable head, rows <= H): the forward writes its raw logits into the memory of the
# weight gradient, the backward reads them there instead of recomputing them (3 products, not 4)
# ---------------------------------------------------------------------------------------------

KEPT_FLOATS = (torch.float64, torch.float32, torch.float16)  # bf16 logits are not kept
NEEDS = [(True, True, True), (False, True, False), (False, False, True), (True, True, False)]


@pytest.mark.slow  # many hypothesis examples
@SETTINGS
@given(
    tile=st.sampled_from([None, 1, 7, 64]), rows=st.integers(1, 23), extra=st.integers(0, 14),
    vocab=st.integers(1, 301), chunk_extra=st.integers(0, 26), with_bias=st.booleans(),
    dtype=st.sampled_from(KEPT_FLOATS), seed=st.integers(0, 2**16), head=st.sampled_from(HEADS),
    compute_expected=st.booleans(),
    need=st.sampled_from(NEEDS),
)  # fmt: skip
def test_kept_logits_match_recompute(
    tile, rows, extra, vocab, chunk_extra, with_bias, dtype, seed, head, compute_expected, need
):
    """Forward with kept logits: the same log-probs and E as without, and a [V, H] buffer in the
    accumulation dtype; backward from them: the weight gradient written into that buffer (d_weight
    comes back empty), the hidden and bias gradients as the recomputing backward's and the float64
    ground truth's."""
    width, chunk = rows + extra, rows + chunk_extra  # a budget of at least all rows: the scratch fits
    need_hidden, need_weight, need_bias = need
    hidden, weight, bias, targets, grad = _problem(rows, width, vocab, dtype, with_bias, seed, scale=2.0)
    with vocab_tile(tile):
        plain = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, chunk, compute_expected, *head)
        *outs, kept = cpp.linear_logprobs_fwd(
            hidden, weight, bias, targets, chunk, compute_expected, *head, keep_logits=True
        )
        for a, b, tol in zip(outs, plain, (TWIN_TOL[dtype], TWIN_TOL[dtype], GRAD_TWIN_RTOL[dtype])):
            _close_twin(a, b, dtype, tol)  # the untiled loop (V <= tile) sums E in another order
        assert kept.shape == weight.shape and kept.dtype == _acc(dtype)
        args = (
            grad,
            hidden,
            weight,
            bias,
            targets,
            plain[1],
            chunk,
            need_hidden,
            need_weight,
            need_bias,
            *head,
        )
        recomputed = cpp.linear_logprobs_bwd(*args)
        got = list(cpp.linear_logprobs_bwd(*args, kept=kept))
    assert got[1].numel() == 0
    if need_weight:
        got[1] = kept.to(dtype)
    truth = _truth(hidden, weight, bias, targets, grad, head)
    for name, wanted, g, t in zip(("d_hidden", "d_weight", "d_bias"), need, got, recomputed):
        if not wanted:
            assert g.numel() == 0, name
            continue
        _close_twin(g, t, dtype, GRAD_TWIN_RTOL[dtype])
        want = truth[name]
        if dtype == torch.float16:
            _no_worse(g, t, want, dtype, margin=2e-2)
        else:
            tol = 1e-10 if dtype == torch.float64 else 5e-5
            assert _err(g, want) <= tol * max(want.abs().max().item(), 1.0), name


@pytest.mark.parametrize("head", [(None, 1.0), (1.5, 2.5)], ids=["plain", "cap"])
@pytest.mark.parametrize("tile", [None, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_kept_logits(with_bias, tile, head):
    """gradcheck (float64) of a trainable head whose forward keeps its logits (7 rows <= H = 9)."""
    hidden, weight, bias, targets, _ = _problem(7, 9, 13, torch.float64, with_bias, seed=4, scale=2.0)
    for x in (hidden, weight, bias):
        if x is not None:
            x.requires_grad_(True)
    assert keeps_logits("cpp", 7, weight, 7)

    def f(h, w, b):
        return linear_logprobs(h, w, b, targets, 7, True, "cpp", *head, True)[0]

    with vocab_tile(tile):
        assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_kept_logits_only_where_they_fit(monkeypatch):
    """rows <= H and products in the accumulation dtype (not bf16); NAPO_KERNELS_KEEP_LOGITS=0
    turns it off; a step gives the same gradients either way."""
    hidden, weight, bias, targets, _ = _problem(6, 5, 17, torch.float32, True, seed=1)
    with pytest.raises(ValueError, match="rows <= H"):
        cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 4, True, keep_logits=True)
    with pytest.raises(ValueError, match="bf16"):
        cpp.linear_logprobs_fwd(
            hidden[:5].bfloat16(), weight.bfloat16(), None, targets[:5], 4, True, keep_logits=True
        )
    assert keeps_logits("cpp", 5, weight, 5) and not keeps_logits("cpp", 6, weight, 6)
    assert not keeps_logits("torch", 5, weight, 4) and not keeps_logits("cpp", 5, weight.bfloat16(), 4)
    big = torch.empty(2000, 64)  # 512-column tiles: 32 rows x 512 fit a [16, 2000] budget, not [8, 2000]
    assert keeps_logits("cpp", 32, big, 16) and not keeps_logits("cpp", 32, big, 8)
    targets = torch.zeros(32, dtype=torch.long)
    with pytest.raises(ValueError, match="budget"):
        cpp.linear_logprobs_fwd(torch.randn(32, 64), big, None, targets, 8, True, keep_logits=True)
    labels = torch.randint(0, 17, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 3, 4, 32, dtype=torch.float64)
    weight = torch.randn(17, 32, dtype=torch.float64)
    grads = []
    for flag in ("1", "0"):
        monkeypatch.setenv("NAPO_KERNELS_KEEP_LOGITS", flag)
        assert keeps_logits("cpp", 24, weight, 24) == (flag == "1")
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        nk.sequence_logprobs(h, w, labels, backend="cpp", chunk_size=24).sum().backward()
        grads.append((h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(
    rows=st.integers(1, 19), vocab=st.integers(1, 517), dtype=st.sampled_from(FLOATS),
    seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 30.0]),
)  # fmt: skip
def test_logits_forward_backward(rows, vocab, dtype, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    grad = torch.randn(rows, generator=gen, dtype=_acc(dtype))
    logp, lse = cpp.logits_logprobs_fwd(logits, targets, 1)
    twin_logp, twin_lse = torch_chunked.logits_logprobs_fwd(logits, targets, 3)
    _close_twin(logp, twin_logp, dtype, TWIN_TOL[dtype])
    _close_twin(lse, twin_lse, dtype, TWIN_TOL[dtype])
    d_logits = cpp.logits_logprobs_bwd(grad, logits, targets, lse, 1)
    twin = torch_chunked.logits_logprobs_bwd(grad, logits, targets, twin_lse, 3)
    _close_twin(d_logits, twin, dtype, GRAD_TWIN_RTOL[dtype])
    x = logits.double().requires_grad_(True)
    truth = reference.sequence_scores_from_logits(x[:, None], targets[:, None])
    truth.backward(grad.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 5e-3)
    assert _err(logp, truth.detach()) <= tol * max(truth.abs().max().item(), 1.0)
    assert _err(d_logits, x.grad) <= max(tol, GRAD_TWIN_RTOL[dtype]) * max(x.grad.abs().max().item(), 1.0)


def _preference_inputs(batch, pool, dtype, seed, agg):
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randn(batch, generator=gen, dtype=dtype) * 3
    rejected = torch.randn(pool, generator=gen, dtype=dtype) * 3
    select = torch.rand(batch, pool, generator=gen) < 0.6
    select[torch.arange(batch), torch.randint(0, pool, (batch,), generator=gen)] = True  # never empty
    coef = 0.5 + torch.rand(batch, pool, generator=gen, dtype=dtype)
    margin = torch.randn(batch, pool, generator=gen, dtype=dtype)
    return chosen, rejected, select, coef, margin


@SETTINGS
@given(
    batch=st.integers(1, 9), pool=st.integers(1, 40), agg=st.sampled_from([0, 1]),
    dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_preference_matches_torch_and_reference(batch, pool, agg, dtype, seed):
    chosen, rejected, select, coef, margin = _preference_inputs(batch, pool, dtype, seed, agg)
    rows, weights = cpp.preference_fwd(chosen, rejected, select, coef, margin, agg)
    twin_rows, twin_weights = torch_chunked.preference_fwd(chosen, rejected, select, coef, margin, agg)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _close_twin(rows, twin_rows, dtype, tol)
    _close_twin(weights, twin_weights, dtype, tol)
    # ground truth: the reference's losses, weights = d loss_i / d Delta_in by autograd (float64)
    delta = reference.reward_matrix(chosen.double(), rejected.double()).requires_grad_(True)
    if agg == 0:  # NAPO / S-DPO form: per-pair margin, one beta
        beta = float(coef[0, 0])
        coef = torch.full_like(coef, beta)
        rows, weights = cpp.preference_fwd(chosen, rejected, select, coef, margin, agg)
        truth = reference.napo_rows(delta, select, margin.double(), beta)
    else:  # DMPO / DynamicPO form: per-pair beta_n, one additive gamma
        gamma = float(margin[0, 0])
        rows, weights = cpp.preference_fwd(
            chosen, rejected, select, coef, torch.full_like(margin, gamma), agg
        )
        truth = reference.dynamicpo_rows(delta, select, coef.double(), gamma)
    truth.sum().backward()
    assert _err(rows, truth.detach()) <= 10 * tol * max(truth.abs().max().item(), 1.0)
    assert _err(weights, delta.grad) <= 10 * tol * max(delta.grad.abs().max().item(), 1.0)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64) through the custom ops with backend="cpp": forward and hand-written backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [(None, 1.0), (None, 0.37), (1.5, 2.5)], ids=["plain", "scale", "cap"])
@pytest.mark.parametrize("tile", [None, 4, 12])  # untiled; 4 tiles in one chunk; 2 tiles x 3 chunks
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_gradcheck_linear(with_bias, frozen, tile, head):
    hidden, weight, bias, targets, _ = _problem(7, 5, 13, torch.float64, with_bias, seed=3, scale=2.0)
    hidden.requires_grad_(True)
    if not frozen:
        weight.requires_grad_(True)
        if bias is not None:
            bias.requires_grad_(True)

    def f(h, w, b):
        return linear_logprobs(h, w, b, targets, 3, frozen, "cpp", *head)[0]

    with vocab_tile(tile):
        assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_gradcheck_logits_and_preference():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (6,), generator=gen)
    assert torch.autograd.gradcheck(lambda x: logits_logprobs(x, targets, 4, "cpp")[0], (logits,))
    for agg in (0, 1):
        chosen, rejected, select, coef, margin = _preference_inputs(4, 9, torch.float64, 7, agg)
        chosen.requires_grad_(True)
        rejected.requires_grad_(True)

        def f(c, r, agg=agg, select=select, coef=coef, margin=margin):
            return preference_rows(c, r, select, coef, margin, None, agg, "cpp")[0]

        assert torch.autograd.gradcheck(f, (chosen, rejected))


# ---------------------------------------------------------------------------------------------
# Numerics at the edges
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_logits_do_not_overflow(dtype):
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(5, 257, generator=gen, dtype=torch.float64) * 1e4).to(dtype)
    targets = torch.randint(0, 257, (5,), generator=gen)
    logp, lse = cpp.logits_logprobs_fwd(logits, targets, 2)
    truth = reference.sequence_scores_from_logits(logits.double()[:, None], targets[:, None])
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all()
    assert _err(logp, truth) <= 1e-6 * 1e4
    # the row maximum in a later part of a long row (the kernels merge partial sums of pieces of a row)
    logits = torch.randn(3, 2500, generator=gen, dtype=torch.float64).to(dtype)
    logits[0, 2100], logits[1, 1500], logits[2, 10] = 1e4, -1e4, 3e3
    logp, lse = cpp.logits_logprobs_fwd(logits, targets[:3], 1)
    truth = reference.sequence_scores_from_logits(logits.double()[:, None], targets[:3, None])
    assert torch.isfinite(lse).all() and _err(logp, truth) <= 1e-6 * 1e4
    # stage 2: terms far apart (exp of their spread overflows), in increasing order
    chosen = torch.zeros(2, dtype=dtype)
    rejected = torch.tensor([0.0, 300.0, 900.0, 1200.0], dtype=dtype)
    ones = torch.ones(2, 4, dtype=dtype)
    rows, weights = cpp.preference_fwd(chosen, rejected, ones.bool(), ones, ones * 0, 0)
    twin_rows, twin_weights = torch_chunked.preference_fwd(chosen, rejected, ones.bool(), ones, ones * 0, 0)
    torch.testing.assert_close(rows, twin_rows)
    torch.testing.assert_close(weights, twin_weights)
    # the same through the fused linear path: logits ~ 1e4 from hidden @ W^T
    hidden, weight, bias, targets, grad = _problem(9, 8, 101, dtype, True, seed=2, scale=3e3)
    logp, lse, expected = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 4, True)
    d = cpp.linear_logprobs_bwd(grad, hidden, weight, bias, targets, lse, 4, True, True, True)
    truth = _truth(hidden, weight, bias, targets, grad)
    assert (hidden.double() @ weight.double().T).abs().max() > 5e3
    for x in (logp, lse, expected, *d):
        assert torch.isfinite(x).all()
    assert _err(logp, truth["logp"]) <= 1e-6 * 1e4
    assert _err(d[0], truth["d_hidden"]) <= 1e-4 * max(truth["d_hidden"].abs().max().item(), 1.0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_vocab_tiles_follow_a_moving_row_max(dtype):
    """The tiled forward sums each row against a running max: rows whose max sits in a later tile
    (so the frozen head's sum is rescaled), a wholly masked (-inf) first tile, a masked stretch
    across tile borders and logits ~1e3 apart all match the untiled torch backend."""
    vocab, rows = 23, 6
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    hidden[0, 21], hidden[1, 2], hidden[2, 9] = 30.0, 30.0, 1e3 if dtype != torch.float16 else 300.0
    hidden[3] = torch.linspace(-20, 20, vocab)  # the max moves at every tile
    bias = torch.zeros(vocab, dtype=torch.float64)
    bias[:4] = float("-inf")  # the first tile (width 4) is masked in every row
    bias[10:15] = float("-inf")
    hidden, weight, bias = hidden.to(dtype), torch.eye(vocab, dtype=dtype), bias.to(dtype)
    targets = torch.tensor([21, 5, 9, 22, 4, 16])
    grad = torch.randn(rows, generator=gen, dtype=_acc(dtype))
    twin = torch_chunked.linear_logprobs_fwd(hidden, weight, bias, targets, 2, True)
    args = (grad, hidden, weight, bias, targets, twin[1], 2, True, True, True)
    twin_grads = torch_chunked.linear_logprobs_bwd(*args)
    with vocab_tile(4):
        got = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 2, True)
        grads = cpp.linear_logprobs_bwd(*args)
    for g, t in zip(got[:2], twin[:2]):
        _close_twin(g, t, dtype, TWIN_TOL[dtype])
    for g, t in zip((got[2], *grads), (twin[2], *twin_grads)):
        assert torch.isfinite(g).all()
        _close_twin(g, t, dtype, GRAD_TWIN_RTOL[dtype])
    assert (got[2][:, :4] == 0).all() and (got[2][:, 10:15] == 0).all()  # masked: probability 0


@pytest.mark.parametrize("compute_expected", [False, True], ids=["lse-only", "with-E"])
def test_vocab_tiles_nan_poisons_only_its_row(compute_expected):
    """A NaN logit in a tile that is otherwise -inf (and one in a later, finite tile) makes its
    row's logp, lse and E NaN, whether the tile pass sums only (lse) or also writes the
    probabilities (one exp per element against the new max); the other rows stay exact."""
    vocab, rows = 12, 4
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(rows, vocab, generator=gen)
    bias = torch.zeros(vocab)
    bias[:4] = float("-inf")  # the first tile (width 4) is masked
    hidden[1, 2] = float("nan")  # ... except for a NaN in row 1
    hidden[2, 9] = float("nan")  # row 2: a NaN in a finite tile
    weight, targets = torch.eye(vocab), torch.tensor([5, 6, 7, 8])
    twin = torch_chunked.linear_logprobs_fwd(hidden, weight, bias, targets, 2, compute_expected)
    with vocab_tile(4):
        got = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 2, compute_expected)
    for g, t in zip(got[:2] if not compute_expected else got, twin):
        assert g[1].isnan().all() and g[2].isnan().all()
        torch.testing.assert_close(g[[0, 3]], t[[0, 3]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_softcap_tanh_and_slope_within_a_few_ulps(isa, monkeypatch):
    """The row loops' vectorised float tanh (napo_math.h): with one vocabulary entry and a weight
    of 1, lse is the capped logit cap * tanh(x / cap) itself and the frozen head's expected row is
    its slope 1 - tanh^2; both against float64, from tiny to saturated arguments."""
    monkeypatch.setenv("NAPO_KERNELS_CPU_ISA", isa)
    x = torch.cat(
        [torch.linspace(-12.0, 12.0, 48001), torch.logspace(-9, 0, 2000), -torch.logspace(-9, 0, 2000)]
    )
    x = x.float()[:, None]
    targets = torch.zeros(len(x), dtype=torch.long)
    _, lse, slope = cpp.linear_logprobs_fwd(x, torch.ones(1, 1), None, targets, 4096, True, 1.0, 1.0)
    t = torch.tanh(x[:, 0].double())
    ulp = torch.finfo(torch.float32).eps * t.abs().clamp(min=torch.finfo(torch.float32).tiny)
    assert ((lse.double() - t).abs() <= 2 * ulp).all(), ((lse.double() - t).abs() / ulp).max()
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(slope[:, 0].double(), 1 - t**2, rtol=4 * eps, atol=2 * eps)
    # a scale folds into the argument and the slope
    _, lse, slope = cpp.linear_logprobs_fwd(x, torch.ones(1, 1), None, targets, 4096, True, 1.0, 2.5)
    t = torch.tanh(2.5 * x[:, 0].double())
    torch.testing.assert_close(lse.double(), t, rtol=2 * eps, atol=eps)
    torch.testing.assert_close(slope[:, 0].double(), 2.5 * (1 - t**2), rtol=4 * eps, atol=8 * eps)
    # a wider cap: |z| up to 30, where one unit in the last place of z is 2e-6 (the softmax's
    # exp(z - lse) inherits it: here it should be exactly 1)
    _, lse, slope = cpp.linear_logprobs_fwd(x, torch.ones(1, 1), None, targets, 4096, True, 30.0, 2.5)
    t = torch.tanh(2.5 * x[:, 0].double() / 30.0)
    ulp30 = 32 * eps
    torch.testing.assert_close(lse.double(), 30.0 * t, rtol=2 * eps, atol=eps)
    torch.testing.assert_close(slope[:, 0].double(), 2.5 * (1 - t**2), rtol=2 * ulp30, atol=8 * eps)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("head", [(30.0, 1.0), (5.0, 0.5), (None, 0.5)], ids=["cap", "cap+scale", "scale"])
@pytest.mark.parametrize("tile", [None, 16])
def test_softcap_huge_logits_stay_finite(dtype, head, tile):
    """Raw logits of +-1e4 (fp16 holds them; exp of their spread overflows): every output and
    gradient finite on both loops, float64 equal to the reference, float32 close to it."""
    hidden, weight, bias, targets, grad = _problem(9, 8, 101, torch.float64, True, seed=2)
    hidden = hidden * 1e4 / (hidden @ weight.T).abs().max()
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    grad = grad.to(_acc(dtype))
    assert (hidden.double() @ weight.double().T + bias.double()).abs().max() > 9e3
    with vocab_tile(tile):
        logp, lse, expected = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 4, True, *head)
        d = cpp.linear_logprobs_bwd(grad, hidden, weight, bias, targets, lse, 4, True, True, True, *head)
    for x in (logp, lse, expected, *d):
        assert torch.isfinite(x).all()
    truth = _truth(hidden, weight, bias, targets, grad, head)
    t_logp, t_lse, t_expected = torch_chunked.linear_logprobs_fwd(
        hidden, weight, bias, targets, 4, True, *head
    )
    t_grads = torch_chunked.linear_logprobs_bwd(
        grad, hidden, weight, bias, targets, t_lse, 4, True, True, True, *head
    )
    twin = (t_logp, t_expected, *t_grads)
    names = ("logp", "expected", "d_hidden", "d_weight", "d_bias")
    for name, got, want, low in zip(names, (logp, expected, *d), (truth[n] for n in names), twin):
        if dtype == torch.float64:
            assert _err(got, want) <= 1e-10 * max(want.abs().max().item(), 1.0) * (
                1e4 if name == "logp" else 1
            )
        else:  # raw logits ~1e4 carry absolute rounding ~1e4 * eps: no worse than the torch backend
            _no_worse(got, low, want, dtype, margin=1e-5 if dtype == torch.float32 else 2e-2)


def _fp16_beyond_range(rows, width, vocab, seed):
    """fp16 inputs whose logits lie near 8e4, beyond fp16's largest value (65504), a few units
    apart (a softmax that is neither flat nor one-hot): every hidden state carries 2000 and every
    weight row 40 in the first coordinate, the other coordinates are ordinary."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64) * (2 / width**0.5)
    hidden[:, 0], weight[:, 0] = 2000.0, 40.0
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    grad = torch.randn(rows, generator=g)
    return hidden.half(), weight.half(), bias.half(), targets, grad


def assert_fp32_logits_accuracy(got, truth, logits_max, scale, what):
    """fp32 logits near ``logits_max`` carry rounding of ``u = 2^-24 logits_max`` (the log-sum-exp
    too: a softmax from them sums to 1 within a few u); ``scale`` is the factor through which a logit
    error reaches the output. Allowed: 8 u scale, plus the output's own fp16 rounding."""
    u = 2.0**-24 * logits_max
    bound = 8 * u * scale + torch.finfo(torch.float16).eps * truth.abs().max().item()
    assert torch.isfinite(got).all(), what
    assert _err(got, truth) <= bound, (what, _err(got, truth), bound)


@pytest.mark.parametrize("tile", [None, 64], ids=["row-chunks", "vocab-tiles"])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_fp16_logits_beyond_65504_stay_finite_and_accurate(tile, chunk):
    """An fp16 GEMM output overflows to inf beyond 65504 (the plain fp16 computation below gives
    NaN); both CPU loops keep fp16 logits, and the products that read them, in fp32, so the
    log-probs, the frozen head's expected hidden state and the trainable head's three gradients
    match the float64 ground truth to the precision fp32 logits have at that size, like the torch
    backend's."""
    hidden, weight, bias, targets, grad = _fp16_beyond_range(9, 24, 300, seed=chunk)
    raw = hidden.double() @ weight.double().T + bias.double()
    assert raw.min() > 7e4 and not torch.isfinite(torch.log_softmax((hidden @ weight.T).float(), -1)).all()
    truth = _truth(hidden, weight, bias, targets, grad)
    big, g_max = raw.abs().max().item(), grad.abs().max().item()
    w_max, h_max = weight.abs().max().item(), hidden.abs().max().item()
    with vocab_tile(tile):
        for name, mod in (("cpp", cpp), ("torch", torch_chunked)):
            logp, lse, expected = mod.linear_logprobs_fwd(hidden, weight, bias, targets, chunk, True)
            d_h, d_w, d_b = mod.linear_logprobs_bwd(
                grad, hidden, weight, bias, targets, lse, chunk, True, True, True
            )
            assert (d_h.dtype, d_w.dtype, d_b.dtype) == (torch.float16,) * 3
            assert_fp32_logits_accuracy(logp, truth["logp"], big, 1.0, f"{name} logp")
            assert_fp32_logits_accuracy(lse, truth["lse"], big, 1.0, f"{name} lse")
            assert_fp32_logits_accuracy(expected, truth["expected"], big, w_max, f"{name} expected")
            assert_fp32_logits_accuracy(d_h, truth["d_hidden"], big, g_max * w_max, f"{name} d_hidden")
            assert_fp32_logits_accuracy(d_w, truth["d_weight"], big, g_max * h_max, f"{name} d_weight")
            assert_fp32_logits_accuracy(d_b, truth["d_bias"], big, g_max, f"{name} d_bias")


def test_fp16_frozen_head_tiles_do_not_overflow():
    """fp16 holds at most 65504: a tile's product of unnormalised probabilities (up to 1 each) with
    weights of 200 would reach 512 * 200; the tiled forward keeps them normalised instead."""
    hidden = torch.zeros(2, 4, dtype=torch.float16)  # every logit equal: a flat softmax
    weight = torch.full((1024, 4), 200.0, dtype=torch.float16)
    targets = torch.tensor([0, 700])
    got = cpp.linear_logprobs_fwd(hidden, weight, None, targets, 2, True)  # two 512-column tiles
    twin = torch_chunked.linear_logprobs_fwd(hidden, weight, None, targets, 2, True)
    assert torch.isfinite(got[2]).all()
    for g, t in zip(got, twin):
        torch.testing.assert_close(g, t)


def test_masked_vocabulary_and_nan_rows():
    """-inf logits (a masked vocabulary entry) get probability 0; a NaN poisons only its own row."""
    logits = torch.randn(4, 70, dtype=torch.float64)
    logits[:, 5:40] = float("-inf")
    logits[2, 60] = float("nan")
    targets = torch.tensor([0, 41, 1, 69])
    grad = torch.ones(4, dtype=torch.float64)
    logp, lse = cpp.logits_logprobs_fwd(logits, targets, 1)
    twin_logp, twin_lse = torch_chunked.logits_logprobs_fwd(logits, targets, 1)
    ok = torch.tensor([True, True, False, True])
    assert torch.allclose(logp[ok], twin_logp[ok]) and torch.allclose(lse[ok], twin_lse[ok])
    assert torch.isnan(logp[2]) and torch.isnan(lse[2])
    d = cpp.logits_logprobs_bwd(grad, logits, targets, lse, 1)
    assert torch.allclose(d[ok], torch_chunked.logits_logprobs_bwd(grad, logits, targets, lse, 1)[ok])
    assert (d[ok][:, 5:40] == 0).all()
    # a whole -inf stretch longer than the kernel's row block (1024) and an entirely masked row
    logits = torch.randn(3, 2600, dtype=torch.float64)
    logits[:, 700:2300] = float("-inf")
    logits[1] = float("-inf")
    targets = torch.tensor([3, 5, 2500])
    logp, lse = cpp.logits_logprobs_fwd(logits, targets, 1)
    twin_logp, twin_lse = torch_chunked.logits_logprobs_fwd(logits, targets, 1)
    torch.testing.assert_close(logp[[0, 2]], twin_logp[[0, 2]])
    assert lse[1] == float("-inf") and torch.isnan(logp[1])  # log(0/0): no distribution to score


@pytest.mark.slow  # every dtype, forward and backward, through each instruction set
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_instruction_set(isa, monkeypatch):
    """The CPU row loops are compiled per instruction set and picked at run time; the environment
    variable caps the choice, so each variant is checked here (a cap the CPU lacks falls back)."""
    monkeypatch.setenv("NAPO_KERNELS_CPU_ISA", isa)
    for dtype in FLOATS:
        hidden, weight, bias, targets, grad = _problem(21, 13, 1111, dtype, True, seed=8, scale=4.0)
        got = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 8, True)
        twin = torch_chunked.linear_logprobs_fwd(hidden, weight, bias, targets, 8, True)
        for g, t in zip(got[:2], twin[:2]):
            _close_twin(g, t, dtype, TWIN_TOL[dtype])
        _close_twin(got[2], twin[2], dtype, GRAD_TWIN_RTOL[dtype])
        args = (grad, hidden, weight, bias, targets, twin[1], 8, True, True, True)
        for g, t in zip(cpp.linear_logprobs_bwd(*args), torch_chunked.linear_logprobs_bwd(*args)):
            _close_twin(g, t, dtype, GRAD_TWIN_RTOL[dtype])


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_softmax_accuracy_within_a_few_ulps(isa, monkeypatch):
    """Rows [0, t] through an identity projection: the frozen-head output is the softmax itself, so
    its error is that of the kernels' exp and log-sum-exp (a vectorised exp on the CPU)."""
    monkeypatch.setenv("NAPO_KERNELS_CPU_ISA", isa)
    t = torch.cat([torch.linspace(-103.0, 0.0, 5001), torch.linspace(-1.0, 1.0, 999)])
    hidden = torch.stack([torch.zeros_like(t), t], 1)
    targets = torch.ones_like(t, dtype=torch.long)
    logp, lse, probs = cpp.linear_logprobs_fwd(hidden, torch.eye(2), None, targets, 64, True)
    x = hidden.double()
    truth = torch.softmax(x, 1)
    assert probs.dtype == torch.float32

    def rel(p):  # relative error per element (absolute below the smallest normal float)
        return (p.double() - truth).abs() / truth.clamp(min=torch.finfo(torch.float32).tiny)

    # elementwise no worse than the torch backend's float32 exp(x - lse) plus 2 ulps (both inherit the
    # rounding of x - lse, up to |x| ulps / 2: that part is the formula's, not the exp's)
    twin = torch_chunked.linear_logprobs_fwd(hidden, torch.eye(2), None, targets, 64, True)[2]
    eps = torch.finfo(torch.float32).eps
    assert (rel(probs) <= rel(twin) + 2 * eps).all(), (rel(probs) - rel(twin)).max() / eps
    torch.testing.assert_close(logp.double(), torch.log_softmax(x, 1)[:, 1], rtol=4e-7, atol=2e-7)
    torch.testing.assert_close(lse.double(), torch.logsumexp(x, 1), rtol=4e-7, atol=2e-7)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_loads_and_stores_are_exact(dtype, isa, monkeypatch):
    """Every 16-bit pattern is read exactly, and float32 values are rounded to nearest-even exactly
    as torch rounds them (ties, subnormals, overflow to inf, NaN): rows [x, -inf] have lse = x,
    and with the target on the -inf column the gradient row is exactly [-g, g]."""
    monkeypatch.setenv("NAPO_KERNELS_CPU_ISA", isa)
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[values != float("inf")]  # [+inf, -inf] has no finite lse (log_softmax: NaN too)
    logits = torch.stack([values, torch.full_like(values, float("-inf"))], 1)
    _, lse = cpp.logits_logprobs_fwd(logits, torch.zeros(len(values), dtype=torch.long), 1)
    assert torch.equal(lse.isnan(), values.isnan())
    assert torch.equal(lse[~lse.isnan()], values.float()[~lse.isnan()])
    # float32 values to round: random bit patterns (NaN, inf, subnormal, huge), every midpoint
    # between neighbouring 16-bit values (the ties) and the float32 values just either side of it
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (40000,), generator=gen, dtype=torch.int64).to(torch.int32)
    finite = torch.sort(values[torch.isfinite(values)].float()).values
    mid = (finite[:-1] + finite[1:]) / 2
    up, down = torch.full_like(mid, float("inf")), torch.full_like(mid, float("-inf"))
    g = torch.cat([bits.view(torch.float32), mid, torch.nextafter(mid, up), torch.nextafter(mid, down)])
    rows = torch.stack([torch.zeros(len(g)), torch.full((len(g),), float("-inf"))], 1).to(dtype)
    targets = torch.ones(len(g), dtype=torch.long)
    lse = torch.zeros(len(g))
    d = cpp.logits_logprobs_bwd(g, rows, targets, lse, 1)
    for got, want in ((d[:, 1], g.to(dtype)), (d[:, 0], (-g).to(dtype))):
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(got[ok].view(torch.int16), want[ok].view(torch.int16))


# ---------------------------------------------------------------------------------------------
# Determinism: the same input gives the same bits, whatever the number of threads of the row passes
# ---------------------------------------------------------------------------------------------


def _all_outputs():
    hidden, weight, bias, targets, grad = _problem(50, 24, 1500, torch.float32, True, seed=9)
    fwd = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 16, True)
    bwd = cpp.linear_logprobs_bwd(grad, hidden, weight, bias, targets, fwd[1], 16, True, True, True)
    logits = torch.randn(40, 3000, generator=torch.Generator().manual_seed(1))
    lfwd = cpp.logits_logprobs_fwd(logits, targets[:40], 1)
    lbwd = cpp.logits_logprobs_bwd(grad[:40], logits, targets[:40], lfwd[1], 1)
    pref = cpp.preference_fwd(*_preference_inputs(64, 700, torch.float32, 4, 0), 0)
    return [*fwd, *bwd], [*lfwd, lbwd, *pref]


def test_deterministic():
    first_linear, first_rows = _all_outputs()
    second_linear, second_rows = _all_outputs()
    for a, b in zip(first_linear + first_rows, second_linear + second_rows):
        assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:  # the row passes (no GEMM involved) do not depend on the thread count
        torch.set_num_threads(1)
        _, single_rows = _all_outputs()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first_rows, single_rows):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The op registrations: schema, fake (meta) kernels, torch.compile-style tracing
# ---------------------------------------------------------------------------------------------


def _opcheck_cases():
    hidden, weight, bias, targets, grad = _problem(6, 5, 17, torch.float32, True, seed=1)
    lse = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 4, False)[1]
    logits = torch.randn(6, 17)
    chosen, rejected, select, coef, margin = _preference_inputs(3, 8, torch.float32, 2, 0)
    ops = torch.ops.napo_C
    kept_args = (grad[:5], hidden[:5], weight, bias, targets[:5], lse[:5], 5, True, True, True)
    return [
        (ops.linear_logprobs_fwd, (hidden, weight, bias, targets, 4, True)),
        (ops.linear_logprobs_fwd, (hidden, weight, None, targets, 2, False)),
        (ops.linear_logprobs_fwd, (hidden, weight, bias, targets, 4, True, 2.0, 0.5)),
        (ops.linear_logprobs_bwd, (grad, hidden, weight, bias, targets, lse, 4, True, True, True)),
        (ops.linear_logprobs_bwd, (grad, hidden, weight, None, targets, lse, 3, True, False, False)),
        (ops.linear_logprobs_bwd, (grad, hidden, weight, bias, targets, lse, 4, True, True, True, 2.0, 0.5)),
        # kept logits (5 rows <= H = 5, a budget of all rows): the backward writes dW into `kept`
        (ops.linear_logprobs_fwd, (hidden[:5], weight, bias, targets[:5], 5, True, None, 1.0, True)),
        (ops.linear_logprobs_bwd, (*kept_args, None, 1.0, torch.randn(17, 5))),
        (ops.logits_logprobs_fwd, (logits, targets)),
        (ops.logits_logprobs_bwd, (grad, logits, targets, lse)),
        (ops.preference_fwd, (chosen, rejected, select, coef, margin, 0)),
        (ops.preference_fwd, (chosen, rejected, select, coef, margin, 1)),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_has_cuda_is_false_on_a_cpu_build():
    assert torch.ops.napo_C.has_cuda() is (torch.version.cuda is not None and torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument (and the row)
# ---------------------------------------------------------------------------------------------


def test_errors():
    hidden, weight, bias, targets, grad = _problem(5, 4, 9, torch.float32, True, seed=0)
    with pytest.raises(TypeError, match="weight must have dtype"):
        cpp.linear_logprobs_fwd(hidden, weight.double(), bias, targets, 2, False)
    with pytest.raises(ValueError, match="H dimensions differ"):
        cpp.linear_logprobs_fwd(hidden, weight[:, :3], bias, targets, 2, False)
    with pytest.raises(ValueError, match="bias must have shape"):
        cpp.linear_logprobs_fwd(hidden, weight, bias[:4], targets, 2, False)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 0, False)
    with pytest.raises(ValueError, match="softcap must be None or finite and > 0, got 0"):
        cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 2, False, 0.0)
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0, got -1"):
        cpp.linear_logprobs_bwd(grad, hidden, weight, bias, targets, grad, 2, True, True, True, None, -1.0)
    with pytest.raises(TypeError, match="targets must have dtype"):
        cpp.linear_logprobs_fwd(hidden, weight, bias, targets.int(), 2, False)
    with pytest.raises(TypeError, match="hidden must be float16"):
        cpp.linear_logprobs_fwd(hidden.int(), weight.int(), None, targets, 2, False)
    with pytest.raises(ValueError, match="lse must have shape"):
        cpp.linear_logprobs_bwd(grad, hidden, weight, bias, targets, grad[:2], 2, True, True, True)
    with pytest.raises(TypeError, match="grad must have dtype"):
        cpp.linear_logprobs_bwd(grad.double(), hidden, weight, bias, targets, grad, 2, True, True, True)
    chosen, rejected, select, coef, margin = _preference_inputs(3, 4, torch.float32, 0, 0)
    select[1] = False
    with pytest.raises(ValueError, match="prompt 1 has no selected negative"):
        cpp.preference_fwd(chosen, rejected, select, coef, margin, 0)
    with pytest.raises(ValueError, match="agg must be 0"):
        cpp.preference_fwd(chosen, rejected, select | True, coef, margin, 2)
    with pytest.raises(TypeError, match="coef must have dtype"):
        cpp.preference_fwd(chosen, rejected, select | True, coef.double(), margin, 0)


@pytest.mark.parametrize("tile", [None, 4])  # the row-chunk loop; vocabulary tiles
def test_out_of_range_targets_are_not_read(tile):
    """Target values are trusted (the public API validates labels, naming the sequence), so the
    ops do not scan them; but no row pass reads outside its row: a target outside [0, V) gives that
    row logp = NaN and leaves every other output as with valid targets."""
    hidden, weight, bias, targets, grad = _problem(5, 4, 9, torch.float32, True, seed=0)
    bad = targets.clone()
    bad[1], bad[3] = -1, 1 << 40
    ok = torch.tensor([True, False, True, False, True])
    with vocab_tile(tile):
        got = cpp.linear_logprobs_fwd(hidden, weight, bias, bad, 2, False)
        want = cpp.linear_logprobs_fwd(hidden, weight, bias, targets, 2, False)
    assert torch.isnan(got[0][~ok]).all()
    assert torch.equal(got[0][ok], want[0][ok]) and torch.equal(got[1], want[1])
    logits = torch.randn(5, 9)
    logp, lse = cpp.logits_logprobs_fwd(logits, bad, 1)
    want_logp, want_lse = cpp.logits_logprobs_fwd(logits, targets, 1)
    assert torch.isnan(logp[~ok]).all() and torch.equal(logp[ok], want_logp[ok])
    assert torch.equal(lse, want_lse)


def test_empty_and_non_contiguous_inputs():
    hidden, weight, bias, targets, grad = _problem(8, 6, 31, torch.float32, True, seed=4)
    logp, lse, expected = cpp.linear_logprobs_fwd(hidden[:0], weight, bias, targets[:0], 4, True)
    assert logp.shape == (0,) and expected.shape == (0, 6)
    d = cpp.linear_logprobs_bwd(grad[:0], hidden[:0], weight, bias, targets[:0], lse, 4, True, True, True)
    assert d[1].shape == weight.shape and (d[1] == 0).all() and (d[2] == 0).all()
    # strided views (a transposed weight, every other hidden row) give the same numbers as copies
    weight_t = weight.T.contiguous().T
    h2 = torch.cat([hidden, hidden])[::2]
    a = cpp.linear_logprobs_fwd(h2, weight_t, bias, targets, 3, True)
    b = cpp.linear_logprobs_fwd(h2.contiguous(), weight, bias, targets, 3, True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("v", [97, 1300])  # one vocabulary tile; three default 512-column tiles
def test_end_to_end_napo_loss_matches_torch_backend(v):
    import napo_kernels as nk

    gen = torch.Generator().manual_seed(0)
    b, c, t, h = 3, 4, 5, 16
    hidden0 = torch.randn(b, c, t, h, generator=gen)
    weight0 = torch.randn(v, h, generator=gen) / 4
    labels = torch.randint(0, v, (b, c, t), generator=gen)
    labels[:, :, :2] = -100  # prompt positions are not scored
    for trainable in (False, True):
        out = {}
        for backend in ("torch", "cpp"):
            hidden = hidden0.clone().requires_grad_(True)
            weight = weight0.clone().requires_grad_(trainable)
            loss = nk.napo_loss(hidden, weight, labels, method="napo", backend=backend, chunk_size=7,
                                margin_state=nk.DynamicMargin())  # fmt: skip
            loss.backward()
            out[backend] = (loss, hidden.grad, weight.grad)
        torch.testing.assert_close(out["cpp"][0], out["torch"][0])
        torch.testing.assert_close(out["cpp"][1], out["torch"][1])
        if trainable:
            torch.testing.assert_close(out["cpp"][2], out["torch"][2])


# ----------------------------------------------------------------------------------------------
# The CUDA build's chunk loop (csrc/chunked_linear.h) with the CPU passes: its kept path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("head", [(None, 1.0), (None, 0.37), (1.5, 2.5)], ids=["plain", "scale", "cap"])
@pytest.mark.parametrize("compute_expected", [False, True], ids=["lse-only", "with-E"])
def test_chunk_loop_kept_probabilities(dtype, head, compute_expected):
    """A trainable head whose rows fit one chunk keeps the chunk's block of probabilities
    (``softmax * dz/draw``) and the backward turns it into the logits' gradient in place, without
    the product and the exp of the recompute: the forward's outputs are the same bits, the
    gradients those of the recompute (the same bits for a plain fp32/fp64 head, a rounding or two
    apart otherwise), a bias gradient included."""
    fwd, bwd = torch.ops.napo_C._chunked_linear_logprobs_fwd, torch.ops.napo_C._chunked_linear_logprobs_bwd
    gen = torch.Generator().manual_seed(9)
    r, v, h = 11, 37, 6
    hidden = torch.randn(r, h, generator=gen).to(dtype)
    weight, bias = (torch.randn(v, h, generator=gen) * 0.5).to(dtype), torch.randn(v, generator=gen).to(dtype)
    targets, grad = torch.randint(0, v, (r,), generator=gen), torch.randn(r, generator=gen).to(_acc(dtype))
    plain = fwd(hidden, weight, bias, targets, r + 3, compute_expected, *head, False)
    *outs, kept = fwd(hidden, weight, bias, targets, r + 3, compute_expected, *head, True)
    block = torch.float32 if dtype == torch.float16 else dtype  # the CPU runs fp16 products in fp32
    assert kept.shape == (r, v) and kept.dtype == block and plain[3].shape == (0,)
    for a, b in zip(plain[:3], outs):
        assert torch.equal(a, b)
    # what was kept: softmax(z) * dz/draw
    raw = (hidden.double() @ weight.double().T + bias.double()).to(block).double()  # the block's rounding
    z = raw * head[1] if head[0] is None else head[0] * torch.tanh(raw * head[1] / head[0])
    slope = head[1] if head[0] is None else head[1] / torch.cosh(raw * head[1] / head[0]) ** 2
    tol = 32 * torch.finfo(block).eps
    torch.testing.assert_close(kept.double(), z.softmax(-1) * slope, rtol=tol, atol=tol)
    args = (grad, hidden, weight, bias, targets, plain[1], r + 3, True, True, True, *head)
    recomputed = bwd(*args)
    from_kept = bwd(*args, kept)
    for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), recomputed, from_kept):
        if head == (None, 1.0) and dtype in (torch.float32, torch.float64):
            assert torch.equal(a, b), name
        else:
            tol = 4 * torch.finfo(dtype).eps * max(1.0, float(a.abs().max()))
            assert float((a.double() - b.double()).abs().max()) <= tol, name


def test_chunk_loop_kept_rejects_what_does_not_fit():
    fwd, bwd = torch.ops.napo_C._chunked_linear_logprobs_fwd, torch.ops.napo_C._chunked_linear_logprobs_bwd
    hidden, weight, targets = torch.randn(6, 4), torch.randn(9, 4), torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="keep_logits needs every row in one chunk"):
        fwd(hidden, weight, None, targets, 5, True, None, 1.0, True)
    _, lse, _, kept = fwd(hidden, weight, None, targets, 6, True, None, 1.0, True)
    args = (torch.ones(6), hidden, weight, None, targets, lse, 6, False, True, False, None, 1.0)
    for bad in (kept[:5], kept.double(), kept.T.contiguous(), torch.empty(9, 6).T):
        with pytest.raises(ValueError, match="kept must be the forward's contiguous"):
            bwd(*args, bad)
    # no rows: the kept block is [0, V] in the products' dtype, as the fake says
    empty = fwd(hidden[:0], weight, None, targets[:0], 6, True, None, 1.0, True)[3]
    assert empty.shape == (0, 9) and empty.dtype == torch.float32
