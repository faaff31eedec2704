"""Soft-capped and scaled heads through :func:`napo_kernels.sequence_logprobs` on every backend.

The head's logits are ``z = logit_scale * (h W^T + b)``, then with a ``softcap``
``z = softcap * tanh(z / softcap)`` (Gemma 2's final soft cap; Cohere's ``logit_scale``, Granite's
``1 / logits_scaling``). Ground truth: ``reference.sequence_scores`` in float64 with autograd;
values and the gradients of hidden, weight and bias, frozen and trainable head, both layouts.
The kernel-level tests (the CPU vocabulary tiles, every instruction set, the Triton kernels called
directly, huge logits) are in ``test_cpp_kernels.py`` and ``test_triton_kernels.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    IGNORE,
    Stage1,
    assert_close,
    assert_lowp_no_worse,
    grads,
    hyp,
    leaf,
    make_labels,
    make_params,
    small,
    stage1_problems,
)

import napo_kernels as nk
from napo_kernels import reference

# softcap None or in [0.5, 50] (tight caps saturate tanh at these logits), logit_scale in [0.05, 4]
softcaps = st.one_of(st.none(), st.floats(0.5, 50.0))
logit_scales = st.one_of(st.just(1.0), st.floats(0.05, 4.0))


def reference_scores(p: Stage1, hidden, weight, bias, softcap, logit_scale):
    """``reference.sequence_scores`` for both layouts (packed rows scored one by one, then summed)."""
    head = dict(softcap=softcap, logit_scale=logit_scale)
    if p.sequence_ids is None:
        return reference.sequence_scores(hidden, weight, p.labels, bias, p.reduction, **head)
    per_row = reference.sequence_scores(hidden[:, None, :], weight, p.labels[:, None], bias, "sum", **head)
    scores = per_row.new_zeros(p.num_sequences).index_add(0, p.sequence_ids, per_row)
    if p.reduction == "mean":
        counts = torch.bincount(p.sequence_ids[p.labels != IGNORE], minlength=p.num_sequences)
        scores = scores / counts.to(scores.dtype)
    return scores


def run(p: Stage1, backend: str, frozen: bool, softcap, logit_scale):
    """``(scores, grads)`` of the kernel and of the float64 reference, for ``sum(upstream * scores)``."""
    h, w, b = leaf(p.hidden), leaf(p.weight, grad=not frozen), leaf(p.bias, grad=not frozen)
    got = nk.sequence_logprobs(
        h, w, p.labels, b, backend=backend, softcap=softcap, logit_scale=logit_scale, **p.kwargs()
    )
    upstream = torch.linspace(-1.5, 2.0, got.numel(), dtype=torch.float64).reshape(got.shape)
    got_grads = grads((got * upstream.to(got.dtype)).sum(), [h, w, b])
    h64 = leaf(p.hidden, torch.float64)
    w64, b64 = leaf(p.weight, torch.float64, grad=not frozen), leaf(p.bias, torch.float64, grad=not frozen)
    want = reference_scores(p, h64, w64, b64, softcap, logit_scale)
    return got, got_grads, want, grads((want * upstream).sum(), [h64, w64, b64])


def test_softcap_and_logit_scale_match_reference(backend):
    @hyp(backend)
    @given(
        p=stage1_problems(tiny=small(backend)),
        frozen=st.booleans(),
        softcap=softcaps,
        logit_scale=logit_scales,
    )
    def check(p: Stage1, frozen: bool, softcap, logit_scale):
        got, got_grads, want, want_grads = run(p, backend, frozen, softcap, logit_scale)
        dtype = p.hidden.dtype
        what = f"{p.info} frozen={frozen} softcap={softcap} logit_scale={logit_scale}"
        assert_close(got, want, dtype, f"scores {what}")
        for name, g, e in zip(("hidden", "weight", "bias"), got_grads, want_grads):
            assert (g is None) == (e is None), name
            if g is not None:
                assert g.dtype == dtype
                assert_close(g, e, dtype, f"d{name} {what}")

    check()


def test_softcap_frozen_and_trainable_agree(backend):
    """The frozen head's backward (``c_y W[y] - E``, no vocabulary work) and the trainable one
    (recomputed logits, the chain rule per element) give the same hidden gradient."""

    @hyp(backend, scale=0.5)
    @given(
        p=stage1_problems(tiny=small(backend), dtypes=(torch.float64,)),
        softcap=st.floats(0.5, 50.0),
        logit_scale=logit_scales,
    )
    def check(p: Stage1, softcap, logit_scale):
        _, (dh_frozen, dw, db), _, _ = run(p, backend, True, softcap, logit_scale)
        assert dw is None and db is None
        _, (dh_train, _, _), _, _ = run(p, backend, False, softcap, logit_scale)
        assert_close(dh_frozen, dh_train, torch.float64, "frozen vs trainable d hidden")

    check()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_softcap_low_precision_no_worse_than_plain_torch(backend, dtype):
    """fp16/bf16: no worse than what a user would write (logits in ``dtype`` as ``model(...).logits``,
    then scale, cap and ``log_softmax`` in float32, autograd), against the float64 reference."""

    @hyp(backend, scale=0.6)
    @given(
        p=stage1_problems(tiny=small(backend), dtypes=(dtype,), layouts=("structured",)),
        frozen=st.booleans(),
        softcap=st.floats(2.0, 50.0),
        logit_scale=logit_scales,
    )
    def check(p: Stage1, frozen: bool, softcap, logit_scale):
        got, got_grads, want, want_grads = run(p, backend, frozen, softcap, logit_scale)
        h, w, b = leaf(p.hidden), leaf(p.weight, grad=not frozen), leaf(p.bias, grad=not frozen)
        z = F.linear(h, w, b).float() * logit_scale
        logp = torch.log_softmax(softcap * torch.tanh(z / softcap), -1)
        mask = p.labels != IGNORE
        tok = logp.gather(-1, p.labels.clamp(min=0)[..., None])[..., 0] * mask
        plain = tok.sum(-1) if p.reduction == "sum" else tok.sum(-1) / mask.sum(-1)
        upstream = torch.linspace(-1.5, 2.0, plain.numel(), dtype=torch.float64).reshape(plain.shape)
        plain_grads = grads((plain * upstream.float()).sum(), [h, w, b])
        assert_lowp_no_worse(got, plain, want, dtype, f"scores {p.info}")
        for name, g, r, e in zip(("hidden", "weight", "bias"), got_grads, plain_grads, want_grads):
            if e is not None:
                assert g.dtype == dtype
                assert_lowp_no_worse(g, r, e, dtype, f"d{name} {p.info}")

    check()


@pytest.mark.parametrize("head", [(None, 0.3), (2.0, 1.0), (1.5, 2.5)], ids=["scale", "cap", "cap+scale"])
def test_gradcheck_softcap(backend, head):
    """``torch.autograd.gradcheck`` (float64) of both backward paths with a scaled / capped head."""
    softcap, logit_scale = head
    gen = torch.Generator().manual_seed(0)
    b, c, t, h, v = 2, 2, 3, 5, 7
    labels = make_labels((b, c, t), v, "random", gen)
    hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64).mul(2).requires_grad_(True)
    weight, bias = make_params(h, v, torch.float64, True, gen, scale=2.0)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opts = dict(backend=backend, softcap=softcap, logit_scale=logit_scale)

    def trainable(x, w, bb):
        return nk.sequence_logprobs(x, w, labels, bb, chunk_size=3, **opts)

    def frozen(x):
        return nk.sequence_logprobs(x, weight.detach(), labels, bias.detach(), **opts)

    fast = small(backend)  # the Triton interpreter pays ~1 ms per launch: random directions there
    assert torch.autograd.gradcheck(trainable, (hidden, weight, bias), fast_mode=fast)
    assert torch.autograd.gradcheck(frozen, (hidden,), fast_mode=fast)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_softcap_huge_logits_stay_finite(backend, dtype):
    """Raw logits of +-1e4 under a cap: finite scores and gradients in every dtype (the cap bounds
    the logits; its derivative underflows to 0, never to NaN); float64 equals the reference."""
    gen = torch.Generator().manual_seed(1)
    b, c, t, h, v = 2, 2, 3, 6, 29
    labels = make_labels((b, c, t), v, "random", gen)
    weight, bias = make_params(h, v, torch.float64, True, gen)
    hidden = torch.randn(b, c, t, h, generator=gen, dtype=torch.float64)
    hidden = hidden * 1e4 / (hidden @ weight.T).abs().max()
    p = Stage1(hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, "sum", 2)
    assert float((p.hidden.double() @ p.weight.double().T).abs().max()) > 9e3
    for frozen in (False, True):
        got, got_grads, want, want_grads = run(p, backend, frozen, 30.0, 1.0)
        assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in got_grads if g is not None)
        if dtype == torch.float64:
            assert_close(got, want, dtype, "huge logits scores")
            for g, e in zip(got_grads, want_grads):
                if e is not None:
                    assert_close(g, e, dtype, "huge logits grads")


def test_defaults_are_the_plain_head(backend):
    """``softcap=None, logit_scale=1.0`` is exactly the plain head (same bits as not passing them)."""
    gen = torch.Generator().manual_seed(2)
    labels = make_labels((2, 3, 4), 23, "prefix", gen)
    hidden = torch.randn(2, 3, 4, 8, generator=gen)
    weight, bias = make_params(8, 23, torch.float32, True, gen)
    plain = nk.sequence_logprobs(hidden, weight, labels, bias, backend=backend)
    same = nk.sequence_logprobs(hidden, weight, labels, bias, backend=backend, softcap=None, logit_scale=1.0)
    assert torch.equal(plain, same)
    # a cap far above every logit changes (almost) nothing; a scale of 2 is a temperature of 1/2
    capped = nk.sequence_logprobs(hidden, weight, labels, bias, backend=backend, softcap=1e6)
    torch.testing.assert_close(capped, plain, rtol=1e-5, atol=1e-5)
    hot = nk.sequence_logprobs(hidden, 0.5 * weight, labels, 0.5 * bias, backend=backend, logit_scale=2.0)
    torch.testing.assert_close(hot, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(softcap=0.0), ValueError, r"softcap must be None or a finite number > 0, got 0.0"),
        (dict(softcap=-30.0), ValueError, r"softcap must be None or a finite number > 0, got -30.0"),
        (dict(softcap=math.inf), ValueError, r"softcap must be None or a finite number > 0, got inf"),
        (dict(softcap=math.nan), ValueError, r"softcap must be None or a finite number > 0, got nan"),
        (dict(softcap="30"), TypeError, r"softcap must be None or a finite number > 0, got str"),
        (dict(softcap=True), TypeError, r"softcap must be None or a finite number > 0, got bool"),
        (dict(logit_scale=0.0), ValueError, r"logit_scale must be a finite number > 0, got 0.0"),
        (dict(logit_scale=-1), ValueError, r"logit_scale must be a finite number > 0, got -1"),
        (dict(logit_scale=math.nan), ValueError, r"logit_scale must be a finite number > 0, got nan"),
        (dict(logit_scale=None), TypeError, r"logit_scale must be a finite number > 0, got NoneType"),
        (
            dict(logit_scale=torch.tensor(2.0)),
            TypeError,
            r"logit_scale must be a finite number > 0, got Tensor",
        ),
    ],
    ids=lambda x: str(x) if not isinstance(x, dict) else ",".join(f"{k}={v!r}" for k, v in x.items()),
)
def test_head_constants_are_validated(kwargs, error, match):
    hidden, weight = torch.randn(2, 3, 4), torch.randn(7, 4)
    labels = torch.randint(0, 7, (2, 3))
    with pytest.raises(error, match=match):
        nk.sequence_logprobs(hidden, weight, labels, **kwargs)
    # integers are fine
    nk.sequence_logprobs(hidden, weight, labels, softcap=30, logit_scale=2)
