"""The ``torch.library`` custom ops pass ``torch.library.opcheck`` (schema, fake tensors, autograd
registration, AOT dispatch) on every backend, and a small training step calling ``napo_loss``
compiles with ``torch.compile`` and gives the eager gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import napo_kernels as nk
from napo_kernels.ops.linear_logprobs import keeps_logits, linear_logprobs, linear_logprobs_backward
from napo_kernels.ops.logits_logprobs import logits_logprobs, logits_logprobs_backward
from napo_kernels.ops.preference import preference_rows

pytestmark = pytest.mark.filterwarnings(
    "ignore:napo. no margin_state:UserWarning",
    "ignore:Dynamo detected a call to a `functools.lru_cache`",  # dispatch._probe: constant per process
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",  # raised inside inductor
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
NOT_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


def assert_opcheck(op, args) -> None:
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_stage1(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    r, h, v = 7, 5, 13
    hidden = torch.randn(r, h, generator=gen).to(dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=gen).to(dtype).requires_grad_(True)
    bias = torch.randn(v, generator=gen).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (r,), generator=gen)
    # trainable head (recompute backward) and frozen head (expected-embedding backward)
    assert_opcheck(linear_logprobs, (hidden, weight, bias, targets, 3, False, backend))
    assert_opcheck(linear_logprobs, (hidden, weight.detach(), None, targets, 4, True, backend))
    # a soft-capped, scaled head (Gemma 2 / Cohere): the same, with the two float arguments
    assert_opcheck(linear_logprobs, (hidden, weight, bias, targets, 3, False, backend, 2.0, 0.5))
    assert_opcheck(linear_logprobs, (hidden, weight.detach(), None, targets, 4, True, backend, 2.0, 0.5))
    _, lse, _, _ = linear_logprobs(
        hidden.detach(), weight.detach(), bias.detach(), targets, 3, False, backend
    )
    grad = torch.randn(r, generator=gen).to(lse.dtype)
    for needs in [(True, True, True), (True, False, False), (False, True, False)]:
        args = (grad, hidden.detach(), weight.detach(), bias.detach(), targets, lse, 3, *needs, backend)
        assert_opcheck(linear_logprobs_backward, args)
        assert_opcheck(linear_logprobs_backward, (*args, 3.0, 1.5))
    if keeps_logits(backend, 4, weight, 4):  # logits kept (cpp: 4 rows <= H = 5; triton: <= chunk)
        # not the AOT test: an opcheck returns every output, and the backward writes the weight
        # gradient over this one (kept), which AOT cannot partition; sequence_logprobs does not
        # return it, and the compiled training step below keeps logits too
        args = (hidden[:4], weight, bias, targets[:4], 4, True, backend, 2.0, 0.5, True)
        result = torch.library.opcheck(linear_logprobs, args, test_utils=NOT_AOT)
        assert all(v == "SUCCESS" for v in result.values()), result
        kept = linear_logprobs(hidden[:4].detach(), weight.detach(), None, targets[:4], 4, False, backend,
                               keep_logits=True)[3]  # fmt: skip
        args = (
            grad[:4],
            hidden[:4].detach(),
            weight.detach(),
            None,
            targets[:4],
            lse[:4],
            4,
            True,
            True,
            False,
        )
        assert_opcheck(linear_logprobs_backward, (*args, backend, None, 1.0, kept))
    logits = torch.randn(r, v, generator=gen).to(dtype).requires_grad_(True)
    assert_opcheck(logits_logprobs, (logits, targets, 2, backend))
    _, lse = logits_logprobs(logits.detach(), targets, 2, backend)
    assert_opcheck(logits_logprobs_backward, (grad, logits.detach(), targets, lse, 2, backend))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_preference_rows(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    b, m = 3, 6
    chosen = torch.randn(b, generator=gen).to(dtype).requires_grad_(True)
    rejected = torch.randn(m, generator=gen).to(dtype).requires_grad_(True)
    select = torch.rand(b, m, generator=gen) < 0.6
    select[:, 0] = True
    coef = (torch.rand(b, m, generator=gen) + 0.5).to(dtype)
    margin = torch.randn(b, m, generator=gen).to(dtype)
    grad_mask = torch.rand(b, m, generator=gen) < 0.5
    for agg in (0, 1):  # log-sum-exp (S-DPO, NAPO, DPO) and mean (DMPO, DynamicPO)
        for gm in (None, grad_mask):
            assert_opcheck(preference_rows, (chosen, rejected, select, coef, margin, gm, agg, backend))


class TinyLM(nn.Module):
    """A body that makes hidden states from token ids, and an ``lm_head``."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.embed(ids)))


def train_steps(model, criterion, batches, compiler: str | None):
    """Loss and gradients of each step (no optimizer: every step sees the same weights)."""

    def step(ids, labels):
        out = criterion(model(ids), model.lm_head.weight, labels, bias=model.lm_head.bias)
        return out.loss

    fn = step if compiler is None else torch.compile(step, backend=compiler)
    results = []
    for ids, labels in batches:
        loss = fn(ids, labels)
        results.append([loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))])
    return results


COMPILE_CASES = [
    pytest.param("aot_eager", "torch", 8, id="aot_eager-torch"),
    pytest.param("aot_eager", "cpp", 8, id="aot_eager-cpp"),
    pytest.param("aot_eager", "cpp", 32, id="aot_eager-cpp-kept-logits"),  # 18 rows <= H: kept
    pytest.param("inductor", "torch", 8, id="inductor-torch"),
]


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize(("compiler", "kernel_backend", "h"), COMPILE_CASES)
def test_compiled_training_step_matches_eager(compiler, kernel_backend, h):
    """Three NAPO steps through ``PreferenceLoss`` (margin EMA state included) under torch.compile."""
    info = nk.backends()[kernel_backend]
    if not info.available:
        pytest.skip(f"backend {kernel_backend!r} unavailable: {info.reason}")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    b, c, t, v = 2, 3, 4, 17
    model = TinyLM(v, h).double()
    batches = []
    for _ in range(3):
        ids = torch.randint(0, v, (b, c, t), generator=gen)
        labels = torch.randint(0, v, (b, c, t), generator=gen)
        labels[..., 0] = -100
        batches.append((ids, labels))
    eager_crit = nk.PreferenceLoss("napo", sharing="all", chunk_size=3, backend=kernel_backend)
    compiled_crit = copy.deepcopy(eager_crit)
    eager = train_steps(model, eager_crit, batches, None)
    compiled = train_steps(model, compiled_crit, batches, compiler)
    for step, (want, got) in enumerate(zip(eager, compiled)):
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m, s=step: f"step {s}: {m}")
    assert float(compiled_crit.margin.ema) == pytest.approx(float(eager_crit.margin.ema), rel=1e-12)
    assert int(compiled_crit.margin.steps) == 3


def test_keeps_logits_rules_of_the_gpu_backends(monkeypatch):
    """triton: kept where the ``[R, V]`` logits fit the ``[chunk_size, V]`` budget and reading them
    pays (fp32/fp64, or H >= 1024 for 16-bit heads); cuda: wherever the rows fit one chunk;
    ``NAPO_KERNELS_KEEP_LOGITS`` 0 / 1 overrides. What each keeps: ``fakes.kept``."""
    from napo_kernels.kernels import fakes

    monkeypatch.delenv("NAPO_KERNELS_KEEP_LOGITS", raising=False)
    fp32, narrow, wide = torch.empty(50, 64), torch.empty(50, 896).bfloat16(), torch.empty(50, 1024).half()
    assert keeps_logits("triton", 64, fp32, 64) and not keeps_logits("triton", 65, fp32, 64)
    assert keeps_logits("triton", 8, fp32.double(), 8) and not keeps_logits("triton", 0, fp32, 8)
    assert keeps_logits("triton", 8, wide, 8) and not keeps_logits("triton", 8, narrow, 8)
    monkeypatch.setenv("NAPO_KERNELS_KEEP_LOGITS", "1")
    assert keeps_logits("triton", 8, narrow, 8) and not keeps_logits("triton", 9, narrow, 8)
    assert keeps_logits("cuda", 8, narrow, 8) and not keeps_logits("cuda", 9, narrow, 8)
    monkeypatch.setenv("NAPO_KERNELS_KEEP_LOGITS", "0")
    assert not keeps_logits("triton", 8, fp32, 8) and not keeps_logits("cuda", 8, fp32, 8)
    hidden = torch.empty(8, 64).bfloat16()
    shapes = {
        layout: fakes.kept(hidden, narrow, True, layout) for layout in ("weight_grad", "logits", "probs")
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in shapes.items()} == {
        "weight_grad": ((50, 896), torch.float32),
        "logits": ((8, 50), torch.float32),
        "probs": ((8, 50), torch.bfloat16),
    }
    assert fakes.kept(hidden, narrow, False, "probs").shape == (0,)
