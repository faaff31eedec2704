"""Every backend against ``napo_kernels/reference.py``: stage 1 (sequence log-probs from hidden
states or logits), stage 2 (``preference_loss``) and end to end (``napo_loss``), values and every
gradient, over hypothesis-chosen shapes, layouts, masks, dtypes and options.

Ground truth is the reference evaluated in float64 on the (already rounded) inputs; fp64 kernels
must match it tightly, fp32 within ``strategies.TOL``, fp16/bf16 by the low-precision rule of
``strategies.assert_lowp_no_worse``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    IGNORE,
    SHARINGS,
    Stage1,
    Stage2,
    api_stage2,
    assert_close,
    assert_lowp_no_worse,
    draw_options,
    grads,
    hyp,
    leaf,
    make_labels,
    make_params,
    max_err,
    reference_stage1,
    reference_stage2,
    small,
    stage1_problems,
    stage2_problems,
)

import napo_kernels as nk
from napo_kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:napo. no margin_state:UserWarning")

# ----------------------------------------------------------------------------------------------
# Stage 1: sequence_logprobs (fused linear + log-softmax + gather + per-sequence sum)
# ----------------------------------------------------------------------------------------------


def run_stage1(p: Stage1, backend: str, frozen: bool, upstream: torch.Tensor | None = None):
    """Kernel and float64 reference: ``(values, grads)`` of each, grads of (hidden, weight, bias)
    for ``loss = sum(upstream * scores)`` (a random upstream checks per-sequence scaling)."""
    dtype = p.hidden.dtype
    h, w, b = leaf(p.hidden), leaf(p.weight, grad=not frozen), leaf(p.bias, grad=not frozen)
    got = nk.sequence_logprobs(h, w, p.labels, b, backend=backend, **p.kwargs())
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if upstream is None:
        upstream = torch.linspace(-1.5, 2.0, got.numel(), dtype=torch.float64).reshape(got.shape)
    got_grads = grads((got * upstream.to(got.dtype)).sum(), [h, w, b])

    h64, w64, b64 = (
        leaf(p.hidden, torch.float64),
        leaf(p.weight, torch.float64, grad=not frozen),
        leaf(p.bias, torch.float64, grad=not frozen),
    )
    want = reference_stage1(p, h64, w64, b64)
    want_grads = grads((want * upstream).sum(), [h64, w64, b64])
    return got, got_grads, want, want_grads


def test_sequence_logprobs_matches_reference(backend):
    @hyp(backend)
    @given(p=stage1_problems(tiny=small(backend)), frozen=st.booleans())
    def check(p: Stage1, frozen: bool):
        got, got_grads, want, want_grads = run_stage1(p, backend, frozen)
        dtype = p.hidden.dtype
        assert_close(got, want, dtype, f"scores {p.info}")
        for name, g, e in zip(("hidden", "weight", "bias"), got_grads, want_grads):
            assert (g is None) == (e is None), name
            if g is not None:
                assert g.dtype == dtype, f"d{name} dtype {g.dtype}"
                assert_close(g, e, dtype, f"d{name} {p.info} frozen={frozen}")

    check()


def test_frozen_and_trainable_agree_on_hidden_grad(backend):
    """The frozen-``lm_head`` backward (expected embedding, no vocabulary work) and the trainable
    one (recompute the logits) are different code: they must give the same hidden gradient."""

    @hyp(backend, scale=0.5)
    @given(p=stage1_problems(tiny=small(backend), dtypes=(torch.float64,)))
    def check(p: Stage1):
        _, (dh_frozen, dw, db), _, _ = run_stage1(p, backend, frozen=True)
        assert dw is None and db is None
        _, (dh_train, _, _), _, _ = run_stage1(p, backend, frozen=False)
        assert_close(dh_frozen, dh_train, torch.float64, "frozen vs trainable d hidden")

    check()


def test_sequence_logprobs_from_logits_matches_reference(backend):
    @hyp(backend)
    @given(p=stage1_problems(tiny=small(backend)), scale=st.sampled_from([1.0, 30.0]))
    def check(p: Stage1, scale: float):
        dtype = p.hidden.dtype
        gen = torch.Generator().manual_seed(p.labels.numel())
        logits = torch.randn(*p.labels.shape, p.weight.shape[0], generator=gen, dtype=torch.float64) * scale
        x = leaf(logits, dtype)
        got = nk.sequence_logprobs_from_logits(x, p.labels, backend=backend, **p.kwargs())
        upstream = torch.linspace(-1.0, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)
        (dx,) = grads((got * upstream.to(got.dtype)).sum(), [x])
        x64 = leaf(x, torch.float64)
        if p.sequence_ids is None:
            want = reference.sequence_scores_from_logits(x64, p.labels, p.reduction)
        else:  # identity weight: the packed reference scores logits directly
            eye = torch.eye(x64.shape[-1], dtype=torch.float64)
            want = reference_stage1(p, x64, eye, None)
        (dx64,) = grads((want * upstream).sum(), [x64])
        assert_close(got, want, dtype, f"scores {p.info}")
        assert dx.dtype == dtype
        assert_close(dx, dx64, dtype, f"dlogits {p.info}")
        ignored = p.labels == IGNORE
        assert bool((dx[ignored] == 0).all()), "ignored positions must get exactly zero gradient"

    check()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_no_worse_than_plain_torch(backend, dtype):
    """fp16/bf16 inputs: float64 ground truth; the plain low-precision implementation is what a
    user would otherwise write (logits in ``dtype``, ``log_softmax`` in fp32, autograd)."""

    @hyp(backend, scale=0.6)
    @given(
        p=stage1_problems(tiny=small(backend), dtypes=(dtype,), layouts=("structured",)), frozen=st.booleans()
    )
    def check(p: Stage1, frozen: bool):
        got, got_grads, want, want_grads = run_stage1(p, backend, frozen=frozen)
        h, w, b = leaf(p.hidden), leaf(p.weight, grad=not frozen), leaf(p.bias, grad=not frozen)
        logits = F.linear(h, w, b)  # in dtype, as model(...).logits would be
        logp = torch.log_softmax(logits.float(), -1)
        mask = p.labels != IGNORE
        tok = logp.gather(-1, p.labels.clamp(min=0)[..., None])[..., 0] * mask
        plain = tok.sum(-1) if p.reduction == "sum" else tok.sum(-1) / mask.sum(-1)
        upstream = torch.linspace(-1.5, 2.0, plain.numel(), dtype=torch.float64).reshape(plain.shape)
        plain_grads = grads((plain * upstream.float()).sum(), [h, w, b])
        assert_lowp_no_worse(got, plain, want, dtype, f"scores {p.info}")
        for name, g, r, e in zip(("hidden", "weight", "bias"), got_grads, plain_grads, want_grads):
            assert (g is None) == (e is None) == (r is None), name
            if e is not None:
                assert g.dtype == dtype
                assert_lowp_no_worse(g, r, e, dtype, f"d{name} {p.info}")

    check()


def gradcheck(backend: str, fn, inputs) -> bool:
    # the Triton interpreter pays ~1 ms per program launch: project onto random directions there
    return torch.autograd.gradcheck(fn, inputs, fast_mode=small(backend))


def test_gradcheck_fused_ops(backend):
    """``torch.autograd.gradcheck`` (float64) of both stage-1 entry points and both backward paths."""
    gen = torch.Generator().manual_seed(0)
    b, c, t, h, v = 2, 2, 3, 5, 7
    labels = make_labels((b, c, t), v, "random", gen)
    hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight, bias = make_params(h, v, torch.float64, True, gen)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    logits = torch.randn(b, c, t, v, generator=gen, dtype=torch.float64, requires_grad=True)
    for red in ("sum", "mean"):
        opts = dict(reduction=red, backend=backend)
        trainable = lambda x, w, bb, o=opts: nk.sequence_logprobs(x, w, labels, bb, chunk_size=3, **o)
        assert gradcheck(backend, trainable, (hidden, weight, bias))
        frozen = lambda x, o=opts: nk.sequence_logprobs(x, weight.detach(), labels, bias.detach(), **o)
        assert gradcheck(backend, frozen, (hidden,))
        from_logits = lambda z, o=opts: nk.sequence_logprobs_from_logits(z, labels, chunk_size=2, **o)
        assert gradcheck(backend, from_logits, (logits,))


def test_huge_logits_stay_finite(backend):
    """Hidden states scaled so logits reach ~1e4: no overflow; fp64 equals the reference."""
    gen = torch.Generator().manual_seed(1)
    b, c, t, h, v = 2, 3, 3, 6, 29
    labels = make_labels((b, c, t), v, "random", gen)
    for dtype in (torch.float64, torch.float32):
        weight, bias = make_params(h, v, dtype, True, gen)
        hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64)
        hidden = (hidden * 1e4 / (hidden @ weight.double().T).abs().max()).to(dtype)
        p = Stage1(hidden, weight, bias, labels, "sum", 2)
        got, got_grads, want, want_grads = run_stage1(p, backend, frozen=False)
        assert float((hidden.double() @ weight.double().T).abs().max()) > 5e3
        assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in got_grads)
        assert torch.isfinite(want).all()
        if dtype == torch.float64:
            assert_close(got, want, dtype, "huge logits scores")
            for g, e in zip(got_grads, want_grads):
                assert_close(g, e, dtype, "huge logits grads")
        logits = (hidden.double() @ weight.double().T).to(dtype).requires_grad_(True)
        s = nk.sequence_logprobs_from_logits(logits, labels, backend=backend)
        (dl,) = torch.autograd.grad(s.sum(), [logits])
        assert torch.isfinite(s).all() and torch.isfinite(dl).all()
        if dtype == torch.float64:
            assert_close(s, reference.sequence_scores_from_logits(logits, labels), dtype, "huge logits")


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_fp16_logits_beyond_65504(backend, frozen):
    """fp16 inputs whose logits (about 8e4) exceed fp16's largest value: the scores and every
    gradient are finite and match the float64 reference to the precision of fp32 logits there (8 u
    times the factor through which a logit error reaches the output, u = 2^-24 max|logit|, plus the
    output's fp16 rounding), where plain fp16 PyTorch gives NaN."""
    if backend == "cuda":
        pytest.skip("the cuda backend keeps fp16 logits blocks (csrc/chunked_linear.h, kWideHalf)")
    gen = torch.Generator().manual_seed(3)
    b, c, t, h, v = 2, 2, 3, 8 if small(backend) else 24, 40 if small(backend) else 300
    labels = make_labels((b, c, t), v, "random", gen)
    hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2 / h**0.5)
    hidden[..., 0], weight[:, 0] = 2000.0, 40.0  # a common 8e4 in every logit
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    hidden, weight, bias = hidden.half(), weight.half(), bias.half()
    p = Stage1(hidden, weight, bias, labels, "sum", 2)
    got, got_grads, want, want_grads = run_stage1(p, backend, frozen=frozen)
    raw = hidden.double() @ weight.double().T + bias.double()
    assert raw.min() > 7e4 and not torch.isfinite(torch.log_softmax((hidden @ weight.T).float(), -1)).all()
    u = 2.0**-24 * float(raw.abs().max())
    tokens = int((labels != IGNORE).sum(-1).max())  # a score sums this many log-probs
    upstream = 2.0  # |d loss / d score| of run_stage1's linspace(-1.5, 2.0)
    scales = (
        upstream * float(weight.abs().max()),
        upstream * tokens * float(hidden.abs().max()),
        upstream * tokens,
    )
    assert torch.isfinite(got).all()
    assert max_err(got, want) <= 8 * u * tokens, (max_err(got, want), u)
    for name, g, e, scale in zip(("hidden", "weight", "bias"), got_grads, want_grads, scales):
        assert (g is None) == (e is None), name
        if e is not None:
            bound = 8 * u * scale + torch.finfo(torch.float16).eps * float(e.abs().max())
            assert g.dtype == torch.float16 and torch.isfinite(g).all(), name
            assert max_err(g, e) <= bound, (name, max_err(g, e), bound)


def test_one_scored_token_per_candidate(backend):
    gen = torch.Generator().manual_seed(2)
    b, c, t, h, v = 3, 4, 5, 7, 23
    labels = make_labels((b, c, t), v, "one", gen)
    weight, bias = make_params(h, v, torch.float64, False, gen)
    hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64)
    for reduction in ("sum", "mean"):
        p = Stage1(hidden, weight, bias, labels, reduction, None)
        got, got_grads, want, want_grads = run_stage1(p, backend, frozen=False)
        assert_close(got, want, torch.float64, "one token")
        # with one token, sum and mean coincide and equal that token's log-prob
        row = labels != IGNORE
        tok = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        assert_close(got, (tok * row).sum(-1), torch.float64, "one token, direct")


def test_inputs_are_not_modified(backend):
    """Forward and backward leave every input untouched (a kernel working in place on a view of the
    caller's tensor would corrupt it: ``.to(dtype)`` is a no-op for a tensor already in ``dtype``)."""
    gen = torch.Generator().manual_seed(9)
    b, c, t, h, v = 2, 3, 3, 5, 13
    labels = make_labels((b, c, t), v, "random", gen)
    for dtype in (torch.float64, torch.float32):
        weight, bias = make_params(h, v, dtype, True, gen)
        hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64).to(dtype)
        logits = torch.randn(b, c, t, v, generator=gen, dtype=torch.float64).to(dtype)
        saved = [x.clone() for x in (hidden, weight, bias, logits, labels)]
        for frozen in (False, True):
            x, w, bb, z = (
                leaf(hidden),
                leaf(weight, grad=not frozen),
                leaf(bias, grad=not frozen),
                leaf(logits),
            )
            x.data, w.data, bb.data, z.data = hidden, weight, bias, logits  # share the caller's storage
            loss = nk.napo_loss(x, w, labels, bias=bb, method="s_dpo", chunk_size=2, backend=backend)
            loss = loss + nk.sequence_logprobs_from_logits(z, labels, chunk_size=2, backend=backend).sum()
            loss.backward()
        for before, after in zip(saved, (hidden, weight, bias, logits, labels)):
            assert torch.equal(before, after)


def test_deterministic_bits(backend):
    """Same input, same bits: values and gradients, stage 1 and the full loss."""
    gen = torch.Generator().manual_seed(3)
    b, c, t, h, v = 3, 3, 4, 9, 41
    labels = make_labels((b, c, t), v, "prefix", gen)
    weight, bias = make_params(h, v, torch.float32, True, gen)
    hidden = torch.randn(b, c, t, h, generator=gen)

    def once():
        x, w, bb = leaf(hidden), leaf(weight), leaf(bias)
        out = nk.napo_loss(
            x, w, labels, bias=bb, method="napo", chunk_size=5, backend=backend, return_outputs=True
        )
        return [out.loss, out.chosen_logps, *torch.autograd.grad(out.loss, [x, w, bb])]

    first, second = once(), once()
    for a, z in zip(first, second):
        assert torch.equal(a, z)


# ----------------------------------------------------------------------------------------------
# Stage 2: preference_loss
# ----------------------------------------------------------------------------------------------


def expected_metrics(p: Stage2, chosen: torch.Tensor, rejected: torch.Tensor, extras: dict) -> dict:
    """The documented metrics, recomputed with plain loops from their definitions."""
    b, k = rejected.shape
    mask = torch.ones(b, k, dtype=torch.bool) if p.mask is None else p.mask
    rc = chosen.double() - (0 if p.ref_chosen is None else p.ref_chosen.double())
    rr = rejected.double() - (0 if p.ref_rejected is None else p.ref_rejected.double())
    pool = extras["pool"]
    pairs = [(i, j, kk) for i in range(b) for j in range(b) for kk in range(k) if pool[i, j * k + kk]]
    valid = [(j, kk) for j in range(b) for kk in range(k) if mask[j, kk]]
    out = {
        "loss": extras["rows"].mean(),
        "rewards/chosen": rc.mean(),
        "rewards/rejected": sum(rr[j, kk] for j, kk in valid) / len(valid),
        "rewards/accuracies": sum(float(rc[i] > rr[j, kk]) for i, j, kk in pairs) / len(pairs),
        "rewards/margins": sum(rc[i] - rr[j, kk] for i, j, kk in pairs) / len(pairs),
        "logps/chosen": chosen.double().mean(),
        "logps/rejected": sum(rejected[j, kk].double() for j, kk in valid) / len(valid),
        "pool/size": len(pairs) / b,
    }
    method = p.options["method"]
    if method == "napo":
        out["margin/gamma"] = sum(extras["margin"][i, j * k + kk] for i, j, kk in pairs) / len(pairs)
        out["margin/batch_confidence"] = extras["batch_confidence"]
    if method == "dynamicpo":
        boundary, beta_n = extras["boundary"], extras["beta_n"]
        out["dynamicpo/boundary_size"] = float(boundary.sum()) / b
        out["dynamicpo/beta"] = beta_n[boundary].mean()
    return out


def check_stage2(p: Stage2, backend: str, check_metrics: bool = True):
    dtype = p.chosen.dtype
    c, r = leaf(p.chosen), leaf(p.rejected)
    out = api_stage2(p, c, r, backend)
    assert out.loss.dtype == dtype and out.rows.shape == (c.shape[0],)
    dc, dr = torch.autograd.grad(out.loss, [c, r])
    c64, r64 = leaf(p.chosen, torch.float64), leaf(p.rejected, torch.float64)
    want, extras = reference_stage2(p, c64, r64)
    dc64, dr64 = torch.autograd.grad(want, [c64, r64], allow_unused=True)
    dr64 = torch.zeros_like(r64) if dr64 is None else dr64  # detach_negatives="all"
    what = f"{p.options['method']} sharing={p.options['sharing']} mode={p.options.get('margin_mode')}"
    assert_close(out.loss, want, dtype, f"loss {what}")
    assert_close(out.rows, extras["rows"], dtype, f"rows {what}")
    assert_close(dc, dc64, dtype, f"d chosen {what}")
    assert_close(dr, dr64, dtype, f"d rejected {what}")
    if p.mask is not None:
        assert bool((dr[~p.mask] == 0).all()), "masked negatives must get no gradient"
    if check_metrics:
        want_metrics = expected_metrics(p, p.chosen, p.rejected, extras)
        assert set(out.metrics) == set(want_metrics), sorted(out.metrics)
        for name, value in want_metrics.items():
            got = out.metrics[name]
            assert not got.requires_grad, name
            tol = (
                torch.float32 if torch.float32 in (got.dtype, dtype) else dtype
            )  # logps/* are logged in fp32
            assert_close(got, torch.as_tensor(value, dtype=torch.float64), tol, f"metric {name} {what}")
    return out, extras


# dpo compares with exactly one own negative (sharing with it is rejected: see test_inputs.py)
COMBOS = [(m, s) for m in nk.METHODS for s in SHARINGS if m != "dpo" or s == "own"]


@pytest.mark.parametrize(("method", "sharing"), COMBOS)
def test_preference_loss_matches_reference(backend, method, sharing):
    @hyp(backend, scale=0.4)
    @given(p=stage2_problems(methods=(method,), sharings=(sharing,), max_b=3 if small(backend) else 6))
    def check(p: Stage2):
        check_stage2(p, backend)

    check()


def test_stage2_loss_value_is_exact_softplus(backend):
    """``L = softplus(z)`` exactly in float64 on every backend, also above 20 where
    ``torch.nn.functional.softplus`` returns ``z`` itself (an error of ``e^-z``, 2e-9 at z = 20)."""
    from napo_kernels.ops.preference import preference_rows

    z = torch.tensor([-30.0, 0.5, 19.0, 20.0, 20.5, 25.0, 33.0, 40.0], dtype=torch.float64)
    ones = torch.ones(len(z), 1, dtype=torch.float64)
    # one selected negative per row: z = coef * (rejected - chosen) + margin = 0 - (-z)
    rows, _ = preference_rows(
        -z, torch.zeros(1, dtype=torch.float64), ones.bool(), ones, 0 * ones, None, 0, backend
    )
    exact = z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))
    torch.testing.assert_close(rows, exact, rtol=1e-15, atol=0)
    assert (rows[4:7] > z[4:7]).all()  # where the thresholded softplus returned z itself


def test_dynamicpo_ties_and_fallback(backend):
    """Scores on a grid (exact ties between negatives and with the positive), and positives above
    every negative so the 3-means fallback chooses the boundary set."""

    @hyp(backend, scale=0.6)
    @given(
        b=st.integers(1, 4),
        k=st.integers(1, 6),
        seed=st.integers(0, 2**31 - 1),
        above=st.booleans(),
        sharing=st.sampled_from(["own", "all"]),
    )
    def check(b, k, seed, above, sharing):
        gen = torch.Generator().manual_seed(seed)
        rejected = torch.randint(-4, 1, (b, k), generator=gen).double()
        chosen = torch.randint(-4, 1, (b,), generator=gen).double() + (5.0 if above else 0.0)
        options = dict(method="dynamicpo", beta=1.0, sharing=sharing, user_embeddings=None, rho=0.7, tau=2.0)
        p = Stage2(chosen, rejected, None, None, None, options)
        _, extras = check_stage2(p, backend)
        boundary, beta_n = extras["boundary"], extras["beta_n"]
        assert bool(boundary.any(1).all()), "every prompt has a boundary set"
        if above:  # no negative reaches the positive: the fallback cluster is the top cluster
            for i in range(b):
                members = torch.nonzero(extras["pool"][i]).flatten()
                vals = rejected.reshape(-1)[members]
                top = members[reference.top_cluster_3means(vals.tolist())]
                assert set(top.tolist()) == set(torch.nonzero(boundary[i]).flatten().tolist())
        sel = beta_n[boundary]
        assert bool(((sel >= 0.5) & (sel <= 1.5)).all())

    check()


def test_dynamicpo_zero_over_zero_guard(backend):
    """All scores equal: d1 = d2 = 0 for every boundary negative; beta_n is finite (0.5 beta)."""
    chosen = torch.full((2,), -3.0, dtype=torch.float64, requires_grad=True)
    rejected = torch.full((2, 3), -3.0, dtype=torch.float64, requires_grad=True)
    out = nk.preference_loss(
        chosen, rejected, method="dynamicpo", beta=2.0, backend=backend, return_outputs=True
    )
    _, extras = reference.family_loss(chosen, rejected, method="dynamicpo", beta=2.0)
    assert torch.isfinite(out.loss) and torch.all(extras["beta_n"][extras["boundary"]] == 1.0)
    assert float(out.metrics["dynamicpo/beta"]) == pytest.approx(1.0)
    assert_close(out.loss, torch.tensor(math.log(2.0), dtype=torch.float64), torch.float64, "0/0 loss")
    dc, dr = torch.autograd.grad(out.loss, [chosen, rejected])
    assert torch.isfinite(dc).all() and torch.isfinite(dr).all()


@pytest.mark.parametrize("sharing", ["all", "matrix", "similarity"])
def test_batch_of_one_with_sharing(backend, sharing):
    """B = 1: sharing has nobody to share with, so the pool is the prompt's own negatives."""
    gen = torch.Generator().manual_seed(4)
    for method in ("s_dpo", "dmpo", "napo", "dynamicpo"):
        share, user = {"all": ("all", None), "matrix": (torch.ones(1, 1, dtype=torch.bool), None),
                       "similarity": ("similarity", torch.randn(1, 4, generator=gen))}[sharing]  # fmt: skip
        options = dict(method=method, beta=1.0, sharing=share, user_embeddings=user, rho=0.7, tau=2.0,
                       detach_negatives="shared")  # fmt: skip
        if method == "napo":
            options.update(gamma0=0.5, margin_mode="batch", alpha=0.3, mu=0.9)
        elif method != "dynamicpo":
            options.update(gamma=0.5)
        p = Stage2(torch.randn(1, generator=gen).double(), torch.randn(1, 3, generator=gen).double(), None,
                   None, None, options)  # fmt: skip
        _, extras = check_stage2(p, backend)
        assert int(extras["pool"].sum()) == 3


def test_napo_defaults_match_reference(backend):
    """``preference_loss(method="napo", return_outputs=True)`` defaults: gamma_0 = 1, shared pool ("all", or
    "similarity" with user embeddings, rho 0.7), batch margin, sigmoid(beta r) confidence."""
    gen = torch.Generator().manual_seed(5)
    chosen, rejected = torch.randn(5, generator=gen).double(), torch.randn(5, 3, generator=gen).double()
    user = torch.randn(5, 4, generator=gen).double()
    for kwargs, sharing in (({}, "all"), ({"user_embeddings": user}, "similarity")):
        out = nk.preference_loss(chosen, rejected, backend=backend, **kwargs, return_outputs=True)
        want, _ = reference.family_loss(chosen, rejected, method="napo", gamma0=1.0, sharing=sharing,
                                            user_embeddings=user, rho=0.7, margin_mode="batch")  # fmt: skip
        assert_close(out.loss, want, torch.float64, f"napo defaults sharing={sharing}")


def test_stateless_napo_warns_once(monkeypatch):
    import napo_kernels.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_warned_stateless", False)
    x, y = torch.zeros(2), torch.zeros(2, 2)
    with pytest.warns(UserWarning, match="margin_state"):
        nk.preference_loss(x, y, method="napo", return_outputs=True)
    nk.preference_loss(
        x, y, method="napo", margin_state=nk.DynamicMargin(), return_outputs=True
    )  # no warning with state


# ----------------------------------------------------------------------------------------------
# NAPO's margin state across steps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "per_negative", "none"])
def test_dynamic_margin_threads_ema(backend, mode):
    """Several steps with one ``DynamicMargin`` equal the reference with the EMA threaded by hand;
    the EMA survives a ``state_dict`` save/load into a fresh module."""
    gen = torch.Generator().manual_seed(6)
    state = nk.DynamicMargin(gamma0=0.8, alpha=0.4, mu=0.7, mode=mode)
    ema, saved = 0.0, None
    for step in range(4):
        b, k = 3, 2 + step % 2
        chosen, rejected = torch.randn(b, generator=gen).double(), torch.randn(b, k, generator=gen).double()
        conf = torch.rand(b, k, generator=gen).double() if step % 2 else None
        out = nk.preference_loss(chosen, rejected, method="napo", sharing="all", confidence=conf,
                                 margin_state=state, backend=backend, return_outputs=True)  # fmt: skip
        want, extras = reference.family_loss(
            chosen, rejected, method="napo", gamma0=0.8, sharing="all", alpha=0.4, mu=0.7, margin_mode=mode,
            ema=ema, confidence=None if conf is None else conf.reshape(-1),
        )  # fmt: skip
        ema = extras["ema"]
        assert_close(out.loss, want, torch.float64, f"step {step}")
        assert float(state.ema) == pytest.approx(ema, rel=1e-12, abs=1e-15)
        assert int(state.steps) == step + 1
        if step == 1:
            buf = io.BytesIO()
            torch.save(state.state_dict(), buf)
            saved = buf.getvalue()
    restored = nk.DynamicMargin(gamma0=0.8, alpha=0.4, mu=0.7, mode=mode)
    restored.load_state_dict(torch.load(io.BytesIO(saved)))
    assert float(restored.ema) != 0.0 and int(restored.steps) == 2
    # update=False and eval mode read the margin without moving the EMA
    before = float(state.ema)
    pool = torch.ones(2, 4, dtype=torch.bool)
    state(torch.rand(4), pool, update=False)
    state.eval()
    state(torch.rand(4), pool)
    assert float(state.ema) == before


def test_preference_loss_module_keeps_ema(backend):
    """``PreferenceLoss`` equals ``napo_loss`` with the EMA threaded through the reference, and a
    module restored from its ``state_dict`` continues identically."""
    gen = torch.Generator().manual_seed(7)
    b, c, t, h, v = 3, 3, 3, 6, 19
    weight, _ = make_params(h, v, torch.float64, False, gen)
    crit = nk.PreferenceLoss("napo", beta=1.5, gamma0=0.7, sharing="all", chunk_size=4, backend=backend)
    twin = None
    ema = 0.0
    for step in range(3):
        labels = make_labels((b, c, t), v, "prefix", gen)
        hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64, requires_grad=True)
        out = crit(hidden, weight, labels)
        (dh,) = torch.autograd.grad(out.loss, [hidden])
        h64 = leaf(hidden)
        scores = reference.sequence_scores(h64, weight, labels)
        want, extras = reference.family_loss(
            scores[:, 0], scores[:, 1:], method="napo", beta=1.5, gamma0=0.7, sharing="all", ema=ema
        )
        (dh64,) = torch.autograd.grad(want, [h64])
        ema = extras["ema"]
        assert_close(out.loss, want, torch.float64, f"module step {step}")
        assert_close(dh, dh64, torch.float64, f"module d hidden step {step}")
        if twin is not None:
            assert torch.equal(twin(hidden, weight, labels).loss, out.loss)
        if step == 0:
            buf = io.BytesIO()
            torch.save(crit.state_dict(), buf)
            twin = nk.PreferenceLoss(
                "napo", beta=1.5, gamma0=0.7, sharing="all", chunk_size=4, backend=backend
            )
            twin.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
            assert "margin.ema" in crit.state_dict()
    # from_logps goes through the same state
    out = crit.from_logps(torch.zeros(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    assert int(crit.margin.steps) == 4


# ----------------------------------------------------------------------------------------------
# End to end: napo_loss (stage 1 + stage 2) against the reference composition
# ----------------------------------------------------------------------------------------------


@st.composite
def e2e_problems(draw, tiny: bool):
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    method = draw(st.sampled_from(nk.METHODS))
    b = draw(st.integers(1, 2 if tiny else 4))
    c = 2 if method == "dpo" else draw(st.integers(2, 3 if tiny else 5))
    t, h, v = (
        draw(st.integers(1, 3 if tiny else 6)),
        draw(st.integers(1, 8 if tiny else 24)),
        draw(st.integers(2, 23 if tiny else 97)),
    )
    kind = "own" if method == "dpo" else draw(st.sampled_from(SHARINGS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    options, mask = draw_options(draw, method, b, c - 1, kind, gen)
    reduction = draw(st.sampled_from(["sum", "mean"]))
    labels = make_labels((b, c, t), v, draw(st.sampled_from(["prefix", "random", "one"])), gen)
    cmask = None
    if mask is not None:
        cmask = torch.cat([torch.ones(b, 1, dtype=torch.bool), mask], 1)
        if reduction == "sum":  # an invalid candidate may have no scored token at all
            labels[~cmask] = IGNORE
    weight, bias = make_params(h, v, dtype, draw(st.booleans()), gen)
    hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64).to(dtype)
    ref_logps = (
        (torch.randn(b, c, generator=gen, dtype=torch.float64) * 2 - 5) if draw(st.booleans()) else None
    )
    packed = draw(st.booleans())
    confidence = torch.rand(b, c - 1, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None
    return dict(
        hidden=hidden, weight=weight, bias=bias, labels=labels, candidate_mask=cmask, ref_logps=ref_logps,
        options=options, reduction=reduction, packed=packed, frozen=draw(st.booleans()),
        confidence=confidence, chunk_size=draw(st.sampled_from([None, 1, 3])),
    )  # fmt: skip


def test_napo_loss_end_to_end(backend):
    @hyp(backend)
    @given(e=e2e_problems(tiny=small(backend)))
    def check(e: dict):
        dtype = e["hidden"].dtype
        b, c, t, h = e["hidden"].shape
        frozen = e["frozen"]
        x, w, bb = leaf(e["hidden"]), leaf(e["weight"], grad=not frozen), leaf(e["bias"], grad=not frozen)
        layout: dict = {}
        if e["packed"]:  # rows of every candidate, flattened in order, sequence id = b * C + c
            layout = dict(
                sequence_ids=torch.arange(b * c).repeat_interleave(t), num_prompts=b, num_candidates=c
            )
            hid, lab = x.reshape(-1, h), e["labels"].reshape(-1)
        else:
            hid, lab = x, e["labels"]
        out = nk.napo_loss(
            hid, w, lab, bias=bb, candidate_mask=e["candidate_mask"], ref_logps=e["ref_logps"],
            confidence=e["confidence"], reduction=e["reduction"], chunk_size=e["chunk_size"], backend=backend,
            return_outputs=True, **layout, **e["options"],
        )  # fmt: skip
        got_grads = grads(out.loss, [x, w, bb])

        x64, w64, b64 = (
            leaf(x, torch.float64),
            leaf(w, torch.float64, not frozen),
            leaf(bb, torch.float64, not frozen),
        )
        labels = e["labels"]
        tot = reference.sequence_scores(x64, w64, labels, b64, "sum")
        if e["reduction"] == "mean":  # guarded mean: empty (invalid) candidates only occur with "sum"
            tot = tot / (labels != IGNORE).sum(-1).clamp(min=1)
        ref = e["ref_logps"]
        cm = e["candidate_mask"]
        o = dict(e["options"])
        conf = e["confidence"]
        want, extras = reference.family_loss(
            tot[:, 0], tot[:, 1:], None if cm is None else cm[:, 1:],
            None if ref is None else ref[:, 0], None if ref is None else ref[:, 1:],
            confidence=None if conf is None else conf.reshape(-1), **o,
        )  # fmt: skip
        want_grads = grads(want, [x64, w64, b64])
        what = f"{o['method']} sharing={o['sharing']} packed={e['packed']} frozen={frozen}"
        assert_close(out.loss, want, dtype, f"loss {what}")
        assert_close(out.rows, extras["rows"], dtype, f"rows {what}")
        assert_close(out.chosen_logps, tot[:, 0], dtype, f"chosen logps {what}")
        for name, g, r in zip(("hidden", "weight", "bias"), got_grads, want_grads):
            assert (g is None) == (r is None), name
            if g is not None:
                assert_close(g, r, dtype, f"d{name} {what}")

    check()


def test_gradcheck_losses(backend):
    """gradcheck (float64) of ``preference_loss`` per method and of ``napo_loss`` end to end."""
    gen = torch.Generator().manual_seed(8)
    b, k = 3, 3
    chosen = torch.randn(b, generator=gen, dtype=torch.float64, requires_grad=True)
    rejected = (torch.randn(b, k, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    ref_c, ref_r = torch.randn(b, generator=gen).double(), torch.randn(b, k, generator=gen).double()
    conf = torch.rand(b, k, generator=gen).double()
    # DynamicPO's beta_n and NAPO's default confidence are smooth but *detached* functions of the
    # scores, so finite differences would see a gradient the spec removes: NAPO gets a caller
    # confidence here and DynamicPO's gradients are checked against the reference's autograd instead.
    dpo = lambda x, y: nk.preference_loss(x, y[:, :1], method="dpo", gamma=0.3, backend=backend)
    assert gradcheck(backend, dpo, (chosen, rejected))
    for method in ("s_dpo", "dmpo", "napo"):
        f = lambda x, y, m=method: nk.preference_loss(
            x, y, mask, ref_c, ref_r, method=m, sharing="all", confidence=conf, backend=backend,
            margin_state=nk.DynamicMargin(mode="per_negative") if m == "napo" else None,
        return_outputs=True).rows  # fmt: skip
        assert gradcheck(backend, f, (chosen, rejected)), method
    c, t, h, v = 3, 2, 4, 7
    labels = make_labels((b, c, t), v, "random", gen)
    hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight, _ = make_params(h, v, torch.float64, False, gen)
    weight.requires_grad_(True)
    g = lambda x, w: nk.napo_loss(x, w, labels, method="s_dpo", sharing="all", chunk_size=4, backend=backend)
    assert gradcheck(backend, g, (hidden, weight))
