"""Bad input gets a clear error naming the argument (and, where it applies, the sequence), never a
silently wrong number. Each documented error has a case here; the 'meta' device stands in for a
second device."""

from __future__ import annotations

import pytest
import torch

import napo_kernels as nk
from napo_kernels import dispatch

pytestmark = pytest.mark.filterwarnings("ignore:napo. no margin_state:UserWarning")

B, C, T, H, V = 2, 3, 4, 5, 11


def stage1():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, C, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    labels = torch.randint(0, V, (B, C, T), generator=gen)
    return hidden, weight, labels


def with_label(labels: torch.Tensor, index: tuple[int, ...], value: int) -> torch.Tensor:
    out = labels.clone()
    out[index] = value
    return out


def nan_at(x: torch.Tensor, index: tuple[int, ...], value: float = float("nan")) -> torch.Tensor:
    out = x.clone()
    out[index] = value
    return out


h, w, lab = stage1()
flat_h, flat_lab = h.reshape(-1, H), lab.reshape(-1)
ids = torch.arange(B * C).repeat_interleave(T)
c3, r32 = torch.randn(3), torch.randn(3, 2)
meta = torch.device("meta")
empty_seq = lab.clone()
empty_seq[1, 2] = -100

# (id, call, exception, regex the message must match)
STAGE1_CASES = [
    (
        "hidden-not-tensor",
        lambda: nk.sequence_logprobs(h.tolist(), w, lab),
        TypeError,
        r"hidden must be a torch\.Tensor",
    ),
    ("hidden-int", lambda: nk.sequence_logprobs(h.long(), w, lab), TypeError, r"hidden must be a floating"),
    (
        "labels-float",
        lambda: nk.sequence_logprobs(h, w, lab.float()),
        TypeError,
        r"labels must be an integer",
    ),
    ("weight-3d", lambda: nk.sequence_logprobs(h, w[None], lab), ValueError, r"weight must be \[V, H\]"),
    (
        "weight-dtype",
        lambda: nk.sequence_logprobs(h, w.double(), lab),
        TypeError,
        r"weight has dtype torch\.float64",
    ),
    ("weight-device", lambda: nk.sequence_logprobs(h, w.to(meta), lab), ValueError, r"weight is on meta"),
    ("labels-device", lambda: nk.sequence_logprobs(h, w, lab.to(meta)), ValueError, r"labels is on meta"),
    (
        "H-mismatch",
        lambda: nk.sequence_logprobs(h, torch.randn(V, H + 1), lab),
        ValueError,
        r"hidden has size 5",
    ),
    (
        "labels-shape",
        lambda: nk.sequence_logprobs(h, w, lab[:, :2]),
        ValueError,
        r"hidden \[2, 3, 4, 5\] and labels",
    ),
    (
        "bias-shape",
        lambda: nk.sequence_logprobs(h, w, lab, torch.zeros(V - 1)),
        ValueError,
        r"bias must have shape \[11\]",
    ),
    (
        "bias-dtype",
        lambda: nk.sequence_logprobs(h, w, lab, torch.zeros(V).double()),
        TypeError,
        r"bias has dtype",
    ),
    (
        "bias-device",
        lambda: nk.sequence_logprobs(h, w, lab, torch.zeros(V, device=meta)),
        ValueError,
        r"bias is on meta",
    ),
    (
        "reduction",
        lambda: nk.sequence_logprobs(h, w, lab, reduction="max"),
        ValueError,
        r"reduction must be one of",
    ),
    (
        "chunk-zero",
        lambda: nk.sequence_logprobs(h, w, lab, chunk_size=0),
        ValueError,
        r"chunk_size must be a positive",
    ),
    (
        "chunk-negative",
        lambda: nk.sequence_logprobs(h, w, lab, chunk_size=-3),
        ValueError,
        r"chunk_size must be",
    ),
    (
        "chunk-float",
        lambda: nk.sequence_logprobs(h, w, lab, chunk_size=2.5),
        ValueError,
        r"chunk_size must be",
    ),
    # labels outside [0, V) other than ignore_index name the token and the sequence (b, c)
    (
        "label-too-big",
        lambda: nk.sequence_logprobs(h, w, with_label(lab, (1, 2, 3), V)),
        ValueError,
        r"labels: token 11 of sequence \(1, 2\) is outside \[0, 11\)",
    ),
    (
        "label-negative",
        lambda: nk.sequence_logprobs(h, w, with_label(lab, (0, 1, 0), -1)),
        ValueError,
        r"labels: token -1 of sequence \(0, 1\) is outside",
    ),
    ("label-other-ignore", lambda: nk.sequence_logprobs(h, w, lab, ignore_index=-1), None, None),
    (
        "no-scored-token",
        lambda: nk.sequence_logprobs(h, w, empty_seq),
        ValueError,
        r"sequence \(1, 2\) has no scored tokens",
    ),
    (
        "sequence-mask-size",
        lambda: nk.sequence_logprobs(h, w, empty_seq, sequence_mask=torch.ones(5).bool()),
        ValueError,
        r"sequence_mask must have 6 entries",
    ),
    (
        "nan-hidden",
        lambda: nk.sequence_logprobs(nan_at(h, (1, 0, 2, 3)), w, lab, check_finite=True),
        ValueError,
        r"hidden has a non-finite value \(nan\) at index \[1, 0, 2, 3\]",
    ),
    (
        "inf-weight",
        lambda: nk.sequence_logprobs(h, nan_at(w, (4, 1), float("inf")), lab, check_finite=True),
        ValueError,
        r"weight has a non-finite value \(inf\) at index \[4, 1\]",
    ),
    (
        "nan-bias",
        lambda: nk.sequence_logprobs(h, w, lab, nan_at(torch.zeros(V), (7,)), check_finite=True),
        ValueError,
        r"bias has a non-finite value",
    ),
    # packed layout
    (
        "ids-float",
        lambda: nk.sequence_logprobs(flat_h, w, flat_lab, sequence_ids=ids.float()),
        TypeError,
        r"sequence_ids must be an integer",
    ),
    (
        "ids-shape",
        lambda: nk.sequence_logprobs(flat_h, w, flat_lab, sequence_ids=ids[:-1]),
        ValueError,
        r"labels and sequence_ids must both be \[N\]",
    ),
    (
        "ids-range",
        lambda: nk.sequence_logprobs(flat_h, w, flat_lab, sequence_ids=ids, num_sequences=4),
        ValueError,
        r"sequence_ids must lie in \[0, 4\)",
    ),
    (
        "ids-negative",
        lambda: nk.sequence_logprobs(flat_h, w, flat_lab, sequence_ids=ids - 1),
        ValueError,
        r"sequence_ids must lie in",
    ),
    (
        "ids-device",
        lambda: nk.sequence_logprobs(flat_h, w, flat_lab, sequence_ids=ids.to(meta)),
        ValueError,
        r"sequence_ids is on meta",
    ),
    (
        "packed-empty-sequence",
        lambda: nk.sequence_logprobs(flat_h, w, flat_lab, sequence_ids=ids, num_sequences=7),
        ValueError,
        r"sequence 6 has no scored tokens",
    ),
    # from logits
    (
        "logits-int",
        lambda: nk.sequence_logprobs_from_logits(torch.ones(2, 3).long(), torch.zeros(2).long()),
        TypeError,
        r"logits must be a floating",
    ),
    (
        "logits-labels-shape",
        lambda: nk.sequence_logprobs_from_logits(torch.ones(2, 3), torch.zeros(3).long()),
        ValueError,
        r"logits \[2, 3\] and labels \[3\] disagree",
    ),
    (
        "logits-label-range",
        lambda: nk.sequence_logprobs_from_logits(
            torch.ones(2, 4, 3), torch.tensor([[0, 1, 2, 0], [0, 3, 0, 0]])
        ),
        ValueError,
        r"labels: token 3 of sequence 1 is outside \[0, 3\)",
    ),
    (
        "logits-nan",
        lambda: nk.sequence_logprobs_from_logits(
            nan_at(torch.zeros(2, 3), (1, 2)), torch.zeros(2).long(), check_finite=True
        ),
        ValueError,
        r"logits has a non-finite value \(nan\) at index \[1, 2\]",
    ),
    (
        "logits-labels-device",
        lambda: nk.sequence_logprobs_from_logits(torch.ones(2, 3), torch.zeros(2, device=meta).long()),
        ValueError,
        r"labels is on meta",
    ),
    (
        "logits-chunk",
        lambda: nk.sequence_logprobs_from_logits(torch.ones(2, 3), torch.zeros(2).long(), chunk_size=0),
        ValueError,
        r"chunk_size must be",
    ),
]

STAGE2_CASES = [
    (
        "chosen-not-tensor",
        lambda: nk.preference_loss([0.0, 1.0], r32, return_outputs=True),
        TypeError,
        r"chosen_logps must be a torch\.Tensor",
    ),
    (
        "chosen-int",
        lambda: nk.preference_loss(c3.long(), r32.long(), return_outputs=True),
        TypeError,
        r"chosen_logps must be a floating",
    ),
    (
        "chosen-2d",
        lambda: nk.preference_loss(c3[:, None], r32, return_outputs=True),
        ValueError,
        r"chosen_logps must be \[B\]",
    ),
    (
        "empty-batch",
        lambda: nk.preference_loss(torch.zeros(0), torch.zeros(0, 2), return_outputs=True),
        ValueError,
        r"no prompts",
    ),
    (
        "rejected-rows",
        lambda: nk.preference_loss(c3, torch.zeros(2, 2), return_outputs=True),
        ValueError,
        r"rejected_logps must be \[B=3, K\]",
    ),
    (
        "rejected-3d",
        lambda: nk.preference_loss(c3, torch.zeros(3, 2, 1), return_outputs=True),
        ValueError,
        r"rejected_logps must be",
    ),
    (
        "rejected-dtype",
        lambda: nk.preference_loss(c3, r32.double(), return_outputs=True),
        TypeError,
        r"rejected_logps has dtype",
    ),
    (
        "rejected-device",
        lambda: nk.preference_loss(c3, r32.to(meta), return_outputs=True),
        ValueError,
        r"rejected_logps is on meta",
    ),
    (
        "K-zero",
        lambda: nk.preference_loss(c3, torch.zeros(3, 0), return_outputs=True),
        ValueError,
        r"K = 0 negatives",
    ),
    (
        "method",
        lambda: nk.preference_loss(c3, r32, method="ipo", return_outputs=True),
        ValueError,
        r"method must be one of",
    ),
    (
        "beta-zero",
        lambda: nk.preference_loss(c3, r32, beta=0.0, return_outputs=True),
        ValueError,
        r"beta must be a finite number > 0",
    ),
    (
        "beta-inf",
        lambda: nk.preference_loss(c3, r32, beta=float("inf"), return_outputs=True),
        ValueError,
        r"beta must be a finite",
    ),
    (
        "rho-zero",
        lambda: nk.preference_loss(c3, r32, rho=0.0, return_outputs=True),
        ValueError,
        r"rho must lie in \(0, 1\], got 0\.0",
    ),
    (
        "rho-above-one",
        lambda: nk.preference_loss(c3, r32, rho=1.5, return_outputs=True),
        ValueError,
        r"rho must lie in \(0, 1\]",
    ),
    (
        "rho-nan",
        lambda: nk.preference_loss(c3, r32, rho=float("nan"), return_outputs=True),
        ValueError,
        r"rho must be a finite number, got nan",
    ),
    (
        "mask-shape",
        lambda: nk.preference_loss(c3, r32, torch.ones(3, 3).bool(), return_outputs=True),
        ValueError,
        r"negative_mask must have shape \[3, 2\]",
    ),
    (
        "mask-device",
        lambda: nk.preference_loss(c3, r32, torch.ones(3, 2, device=meta).bool(), return_outputs=True),
        ValueError,
        r"negative_mask is on meta",
    ),
    (
        "ref-only-one",
        lambda: nk.preference_loss(c3, r32, None, torch.zeros(3), return_outputs=True),
        ValueError,
        r"both ref_chosen_logps and ref_rejected_logps",
    ),
    (
        "ref-chosen-shape",
        lambda: nk.preference_loss(c3, r32, None, torch.zeros(3, 1), torch.zeros(3, 2), return_outputs=True),
        ValueError,
        r"ref_chosen_logps must have shape \[3\]",
    ),
    (
        "ref-rejected-shape",
        lambda: nk.preference_loss(c3, r32, None, torch.zeros(3), torch.zeros(3, 3), return_outputs=True),
        ValueError,
        r"ref_rejected_logps must have shape \[3, 2\] \(one reference score per negative\), got \[3, 3\]",
    ),
    (
        "ref-device",
        lambda: nk.preference_loss(
            c3, r32, None, torch.zeros(3), torch.zeros(3, 2, device=meta), return_outputs=True
        ),
        ValueError,
        r"ref_rejected_logps is on meta",
    ),
    (
        "sharing-name",
        lambda: nk.preference_loss(c3, r32, sharing="friends", return_outputs=True),
        ValueError,
        r"sharing must be one of",
    ),
    (
        "sharing-shape",
        lambda: nk.preference_loss(c3, r32, sharing=torch.ones(3, 2).bool(), return_outputs=True),
        ValueError,
        r"sharing must have shape \[3, 3\]",
    ),
    (
        "sharing-device",
        lambda: nk.preference_loss(
            c3, r32, method="s_dpo", sharing=torch.ones(3, 3, device=meta).bool(), return_outputs=True
        ),
        ValueError,
        r"sharing is on meta",
    ),
    (
        "similarity-no-users",
        lambda: nk.preference_loss(c3, r32, sharing="similarity", return_outputs=True),
        ValueError,
        r"sharing='similarity' needs user_embeddings",
    ),
    (
        "users-shape",
        lambda: nk.preference_loss(
            c3, r32, sharing="similarity", user_embeddings=torch.zeros(2, 4), return_outputs=True
        ),
        ValueError,
        r"user_embeddings must be \[B=3, D\]",
    ),
    (
        "users-device",
        lambda: nk.preference_loss(
            c3, r32, sharing="similarity", user_embeddings=torch.zeros(3, 4, device=meta), return_outputs=True
        ),
        ValueError,
        r"user_embeddings is on meta",
    ),
    (
        "confidence-size",
        lambda: nk.preference_loss(c3, r32, confidence=torch.zeros(5), return_outputs=True),
        ValueError,
        r"confidence must have shape \[3, 2\] \(one confidence per negative\), got \[5\]",
    ),
    (
        "confidence-device",
        lambda: nk.preference_loss(c3, r32, confidence=torch.zeros(3, 2, device=meta), return_outputs=True),
        ValueError,
        r"confidence is on meta",
    ),
    (
        "dpo-K2",
        lambda: nk.preference_loss(c3, r32, method="dpo", return_outputs=True),
        ValueError,
        r"method='dpo' compares each positive with exactly one",
    ),
    (
        "dpo-shared",
        lambda: nk.preference_loss(c3, r32[:, :1], method="dpo", sharing="all", return_outputs=True),
        ValueError,
        r"method='dpo'",
    ),
    (
        "empty-pool",
        lambda: nk.preference_loss(
            c3, r32, torch.tensor([[1, 1], [0, 0], [1, 0]]).bool(), method="s_dpo", return_outputs=True
        ),
        ValueError,
        r"prompt 1 has an empty negative pool",
    ),
    (
        "margin-mode",
        lambda: nk.preference_loss(c3, r32, method="napo", margin_mode="ema", return_outputs=True),
        ValueError,
        r"margin_mode must be one of",
    ),
    (
        "nan-chosen",
        lambda: nk.preference_loss(nan_at(c3, (2,)), r32, check_finite=True, return_outputs=True),
        ValueError,
        r"chosen_logps has a non-finite value \(nan\) at index \[2\]",
    ),
    (
        "inf-rejected",
        lambda: nk.preference_loss(
            c3, nan_at(r32, (1, 1), -float("inf")), check_finite=True, return_outputs=True
        ),
        ValueError,
        r"rejected_logps has a non-finite value \(-inf\) at index \[1, 1\]",
    ),
    (
        "nan-ref",
        lambda: nk.preference_loss(
            c3,
            r32,
            None,
            nan_at(torch.zeros(3), (0,)),
            torch.zeros(3, 2),
            check_finite=True,
            return_outputs=True,
        ),
        ValueError,
        r"ref_chosen_logps has a non-finite",
    ),
    (
        "nan-confidence",
        lambda: nk.preference_loss(
            c3, r32, confidence=nan_at(torch.zeros(3, 2), (0, 1)), check_finite=True, return_outputs=True
        ),
        ValueError,
        r"confidence has a non-finite",
    ),
    (
        "nan-users",
        lambda: nk.preference_loss(
            c3, r32, user_embeddings=nan_at(torch.zeros(3, 2), (2, 0)), check_finite=True, return_outputs=True
        ),
        ValueError,
        r"user_embeddings has a non-finite",
    ),
    ("module-method", lambda: nk.PreferenceLoss("ipo"), ValueError, r"method must be one of"),
    ("margin-state-mode", lambda: nk.DynamicMargin(mode="ema"), ValueError, r"margin mode must be one of"),
    ("margin-state-mu", lambda: nk.DynamicMargin(mu=1.0), ValueError, r"mu must lie in \[0, 1\)"),
]

NAPO_CASES = [
    (
        "hidden-3d",
        lambda: nk.napo_loss(h[0], w, lab[0]),
        ValueError,
        r"hidden must be \[B, C, T, H\] or packed",
    ),
    ("K-zero", lambda: nk.napo_loss(h[:, :1], w, lab[:, :1]), ValueError, r"C = 1 candidates \(K = 0\)"),
    (
        "packed-no-ids",
        lambda: nk.napo_loss(flat_h, w, flat_lab),
        ValueError,
        r"packed hidden \[N, H\] needs sequence_ids",
    ),
    (
        "candidate-mask-shape",
        lambda: nk.napo_loss(h, w, lab, candidate_mask=torch.ones(2, 2).bool()),
        ValueError,
        r"candidate_mask must have shape \[2, 3\]",
    ),
    (
        "no-positive",
        lambda: nk.napo_loss(h, w, lab, candidate_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]).bool()),
        ValueError,
        r"candidate_mask: prompt 1 has no positive",
    ),
    (
        "ref-shape",
        lambda: nk.napo_loss(h, w, lab, ref_logps=torch.zeros(2, 2)),
        ValueError,
        r"ref_logps must have shape \[2, 3\]",
    ),
    (
        "ref-device",
        lambda: nk.napo_loss(h, w, lab, ref_logps=torch.zeros(2, 3, device=meta)),
        ValueError,
        r"ref_logps is on meta",
    ),
    (
        "candidate-no-token",
        lambda: nk.napo_loss(h, w, empty_seq),
        ValueError,
        r"sequence \(1, 2\) has no scored tokens",
    ),
    (
        "label-range",
        lambda: nk.napo_loss(h, w, with_label(lab, (0, 2, 1), 99)),
        ValueError,
        r"token 99 of sequence \(0, 2\) is outside \[0, 11\)",
    ),
    (
        "nan-hidden",
        lambda: nk.napo_loss(nan_at(h, (0, 1, 1, 1)), w, lab, check_finite=True),
        ValueError,
        r"hidden has a non-finite value \(nan\) at index \[0, 1, 1, 1\]",
    ),
    ("method", lambda: nk.napo_loss(h, w, lab, method="kto"), ValueError, r"method must be one of"),
    ("dpo-K2", lambda: nk.napo_loss(h, w, lab, method="dpo"), ValueError, r"method='dpo'"),
    ("rho", lambda: nk.napo_loss(h, w, lab, rho=2.0), ValueError, r"rho must lie in \(0, 1\]"),
    ("backend", lambda: nk.napo_loss(h, w, lab, backend="jax"), ValueError, r"unknown backend 'jax'"),
]


def _params(cases):
    return [pytest.param(f, exc, msg, id=name) for name, f, exc, msg in cases]


@pytest.mark.parametrize(("call", "exc", "message"), _params(STAGE1_CASES + STAGE2_CASES + NAPO_CASES))
def test_bad_input_raises_clear_error(call, exc, message):
    if exc is None:  # a control case: the same call shape is accepted
        call()
        return
    with pytest.raises(exc, match=message):
        call()


def test_masked_invalid_candidate_may_have_no_tokens(backend):
    """An invalid candidate (``candidate_mask`` False) may have no scored token: accepted, and the
    loss and gradients do not depend on it at all."""
    hidden = h.double().requires_grad_(True)
    weight = w.double()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    for reduction in ("sum", "mean"):
        out = nk.napo_loss(hidden, weight, empty_seq, candidate_mask=mask, method="s_dpo", sharing="all",
                           reduction=reduction, backend=backend)  # fmt: skip
        (dh,) = torch.autograd.grad(out, [hidden])
        same = nk.napo_loss(hidden, weight, lab, candidate_mask=mask, method="s_dpo", sharing="all",
                            reduction=reduction, backend=backend)  # fmt: skip
        assert torch.isfinite(out) and out.item() == pytest.approx(same.item(), rel=1e-12)
        assert bool((dh[1, 2] == 0).all()) and torch.isfinite(dh).all()
        # the stage-1 entry point with sequence_mask accepts it too and scores it 0
        s = nk.sequence_logprobs(
            hidden, weight, empty_seq, sequence_mask=mask, reduction=reduction, backend=backend
        )
        assert s[1, 2].item() == 0.0 and torch.isfinite(s).all()


def test_masked_negative_values_are_ignored(backend):
    """A masked negative's score (even NaN without ``check_finite``) cannot leak into the loss."""
    rejected = r32.clone()
    rejected[1, 1] = float("nan")
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]]).bool()
    for method in ("s_dpo", "dmpo", "napo", "dynamicpo"):
        out = nk.preference_loss(
            c3, rejected, mask, method=method, sharing="all", backend=backend, return_outputs=True
        )
        clean = nk.preference_loss(
            c3, r32, mask, method=method, sharing="all", backend=backend, return_outputs=True
        )
        assert torch.isfinite(out.loss), method
        assert float(out.loss) == pytest.approx(float(clean.loss), rel=1e-6), method


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'numpy'; choose one of"):
        nk.sequence_logprobs(h, w, lab, backend="numpy")
    with pytest.raises(ValueError, match=r"unknown backend"):
        nk.preference_loss(c3, r32, backend="numpy", return_outputs=True)


def test_unavailable_backend_names_the_reason(monkeypatch):
    """Asking for a backend that cannot run here says which and why (never a silent fallback)."""
    missing = [name for name, info in nk.backends().items() if not info.available]
    for name in missing:  # e.g. 'cuda' on this machine
        with pytest.raises(RuntimeError, match=rf"backend '{name}' is unavailable: .+"):
            nk.sequence_logprobs(h, w, lab, backend=name)
    # the same for the C++ extension, simulated as missing
    fake = dispatch.BackendInfo("cpp", False, ("cpu",), "C++ extension napo_kernels._C not importable (test)")
    real = dispatch._probe
    monkeypatch.setattr(dispatch, "_probe", lambda name: fake if name == "cpp" else real(name))
    with pytest.raises(RuntimeError, match=r"backend 'cpp' is unavailable: C\+\+ extension .* \(test\)"):
        nk.preference_loss(c3, r32, backend="cpp", return_outputs=True)
    # 'auto' falls back to the torch backend and says so once
    monkeypatch.setattr(dispatch, "_warned_missing_extension", False)
    with pytest.warns(UserWarning, match=r"using the pure-torch backend: C\+\+ extension"):
        nk.sequence_logprobs(h, w, lab)


def test_backend_on_wrong_device(monkeypatch):
    gpu_only = dispatch.BackendInfo("triton", True, ("cuda",))
    real = dispatch._probe
    monkeypatch.setattr(dispatch, "_probe", lambda name: gpu_only if name == "triton" else real(name))
    with pytest.raises(ValueError, match=r"backend 'triton' runs on \('cuda',\), but the tensors are on cpu"):
        nk.sequence_logprobs(h, w, lab, backend="triton")
