"""The cases an audit of the public API found silent (issue 10): each now raises an exact error, or
behaves as documented. One test per finding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napo_kernels as nk
from napo_kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:napo. no margin_state:UserWarning")

B, K, C, T, H, V = 3, 2, 3, 4, 5, 11
gen = torch.Generator().manual_seed(0)
chosen = torch.randn(B, generator=gen, dtype=torch.float64)
rejected = torch.randn(B, K, generator=gen, dtype=torch.float64)
hidden = torch.randn(B, C, T, H, generator=gen)
weight = torch.randn(V, H, generator=gen)
labels = torch.randint(0, V, (B, C, T), generator=gen)


def raises(exc: type[Exception], match: str):
    return pytest.raises(exc, match=match)


# --- gamma means one thing -----------------------------------------------------------------------


def test_gamma_is_not_napos_base_margin():
    with raises(
        ValueError,
        r"gamma \(an additive margin\) does not apply to method='napo': NAPO's base margin is gamma0",
    ):
        nk.preference_loss(chosen, rejected, method="napo", gamma=0.5)


def test_gamma_does_not_silently_apply_to_dynamicpo():
    with raises(
        ValueError,
        r"gamma \(an additive margin\) does not apply to method='dynamicpo': DynamicPO has no margin",
    ):
        nk.preference_loss(chosen, rejected, method="dynamicpo", gamma=0.5)


def test_napo_margin_options_rejected_for_other_methods():
    with raises(ValueError, r"gamma0, alpha configure NAPO's dynamic margin; method='s_dpo' has none"):
        nk.preference_loss(chosen, rejected, method="s_dpo", gamma0=1.0, alpha=0.3)


def test_gamma0_is_napos_base_margin():
    """gamma0 = 0 with margin_mode="none" is S-DPO; gamma0 = g equals S-DPO's additive margin g."""
    for g in (0.0, 0.7):
        napo = nk.preference_loss(
            chosen, rejected, method="napo", sharing="own", gamma0=g, margin_mode="none"
        )
        sdpo = nk.preference_loss(chosen, rejected, method="s_dpo", gamma=g)
        torch.testing.assert_close(napo, sdpo, rtol=1e-12, atol=0)


# --- margin_state never silently overrides explicit arguments --------------------------------------


@pytest.mark.parametrize(
    "option", [dict(gamma0=2.0), dict(alpha=0.5), dict(mu=0.5), dict(margin_mode="none")]
)
def test_margin_state_with_explicit_margin_options(option):
    name = next(iter(option))
    with raises(
        ValueError, rf"margin_state fixes gamma0, alpha, mu and the margin mode; {name} given as well"
    ):
        nk.preference_loss(chosen, rejected, method="napo", margin_state=nk.DynamicMargin(), **option)


def test_margin_state_for_a_method_without_margin():
    with raises(ValueError, r"margin_state is NAPO's dynamic margin; method='dmpo' has none"):
        nk.preference_loss(chosen, rejected, method="dmpo", margin_state=nk.DynamicMargin())


def test_margin_state_type():
    with raises(TypeError, r"margin_state must be a DynamicMargin, got float"):
        nk.preference_loss(chosen, rejected, method="napo", margin_state=0.5)


# --- the margin in eval(): what a training step would use, without storing it ---------------------


def test_eval_margin_uses_the_would_be_ema_and_does_not_store_it():
    state = nk.DynamicMargin(gamma0=1.0, alpha=0.3, mu=0.9)
    conf = torch.rand(B, K, generator=gen, dtype=torch.float64)
    nk.preference_loss(chosen, rejected, method="napo", sharing="all", confidence=conf, margin_state=state)
    ema, steps = float(state.ema), int(state.steps)
    assert steps == 1 and ema > 0
    state.eval()
    conf2 = torch.rand(B, K, generator=gen, dtype=torch.float64)
    out = nk.preference_loss(
        chosen,
        rejected,
        method="napo",
        sharing="all",
        confidence=conf2,
        margin_state=state,
        return_outputs=True,
    )
    assert float(state.ema) == ema and int(state.steps) == 1  # nothing stored in eval()
    m_t = float(conf2.mean())
    would_be = 0.9 * ema + 0.1 * m_t
    assert float(out.metrics["margin/gamma"]) == pytest.approx(1.0 * (1 - 0.3 * (m_t - would_be)), rel=1e-12)
    # the same call in train() gives the same loss and then stores the EMA
    state.train()
    again = nk.preference_loss(
        chosen, rejected, method="napo", sharing="all", confidence=conf2, margin_state=state
    )
    torch.testing.assert_close(again, out.loss, rtol=0, atol=0)
    assert float(state.ema) == pytest.approx(would_be, rel=1e-15) and int(state.steps) == 2


# --- the share matrix, masks and shapes -------------------------------------------------------------


def test_share_matrix_diagonal_must_be_true():
    share = torch.ones(B, B, dtype=torch.bool)
    share[1, 1] = False
    with raises(ValueError, r"sharing\[1, 1\] is False: a prompt's own negatives are always in its pool"):
        nk.preference_loss(chosen, rejected, method="s_dpo", sharing=share)


def test_float_share_matrix_is_rejected():
    with raises(TypeError, r"sharing must be a bool tensor .* got torch.float32"):
        nk.preference_loss(chosen, rejected, method="s_dpo", sharing=torch.full((B, B), 0.3))


def test_float_candidate_mask_is_rejected():
    with raises(
        TypeError, r"candidate_mask must be a bool tensor \(True where the entry exists\), got torch.float32"
    ):
        nk.napo_loss(hidden, weight, labels, candidate_mask=torch.full((B, C), 0.5))


def test_integer_masks_must_be_zero_or_one():
    with raises(ValueError, r"negative_mask must hold only 0/1 \(or be bool\), got 2 at index \[0, 1\]"):
        nk.preference_loss(chosen, rejected, torch.tensor([[1, 2], [1, 1], [1, 0]]), method="s_dpo")
    ok = nk.preference_loss(chosen, rejected, torch.tensor([[1, 0], [1, 1], [1, 0]]), method="s_dpo")
    want = nk.preference_loss(chosen, rejected, torch.tensor([[1, 0], [1, 1], [1, 0]]).bool(), method="s_dpo")
    torch.testing.assert_close(ok, want, rtol=0, atol=0)


def test_confidence_transposed_is_rejected():
    with raises(
        ValueError, r"confidence must have shape \[3, 2\] \(one confidence per negative\), got \[2, 3\]"
    ):
        nk.preference_loss(chosen, rejected, method="napo", confidence=torch.rand(K, B, dtype=torch.float64))


def test_flat_ref_rejected_is_rejected():
    with raises(ValueError, r"ref_rejected_logps must have shape \[3, 2\]"):
        nk.preference_loss(chosen, rejected, None, chosen, torch.zeros(B * K, dtype=torch.float64))


# --- scalar hyper-parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "option", [dict(method="s_dpo", gamma=float("nan")), dict(alpha=float("nan")), dict(tau=float("nan")),
               dict(gamma0=float("inf")), dict(beta=float("nan"))],
)  # fmt: skip
def test_non_finite_hyper_parameters(option):
    name = next(k for k in option if k != "method")
    with raises(ValueError, rf"{name} must be a finite number, got (nan|inf)"):
        nk.preference_loss(chosen, rejected, **option)


def test_hyper_parameter_type():
    with raises(TypeError, r"beta must be a number, got str"):
        nk.LossConfig(beta="1")


def test_module_validates_at_construction():
    with raises(ValueError, r"rho must lie in \(0, 1\], got 1.5"):
        nk.PreferenceLoss(rho=1.5)
    with raises(ValueError, r"method must be one of"):
        nk.PreferenceLoss("ipo")


def test_unknown_option_names_the_valid_ones():
    with raises(TypeError, r"unknown loss option\(s\) \['gama'\]; the hyper-parameters are"):
        nk.preference_loss(chosen, rejected, gama=1.0)


def test_config_or_keywords_not_both():
    with raises(ValueError, r"give either config= or hyper-parameters \(beta\), not both"):
        nk.preference_loss(chosen, rejected, config=nk.LossConfig(), beta=2.0)


def test_config_object_equals_keywords():
    cfg = nk.LossConfig(method="dmpo", beta=1.5, gamma=0.2)
    torch.testing.assert_close(
        nk.preference_loss(chosen, rejected, config=cfg),
        nk.preference_loss(chosen, rejected, method="dmpo", beta=1.5, gamma=0.2),
        rtol=0,
        atol=0,
    )


def test_module_call_rejects_hyper_parameters():
    crit = nk.PreferenceLoss("s_dpo")
    with raises(TypeError, r"PreferenceLoss got \['beta'\]: hyper-parameters and kernel options are fixed"):
        crit(hidden, weight, labels, beta=2.0)


# --- tensors as tensors ---------------------------------------------------------------------------


def test_numpy_array_is_a_type_error():
    with raises(
        TypeError, r"rejected_logps must be a torch.Tensor, got ndarray \(convert it with torch.as_tensor\)"
    ):
        nk.preference_loss(chosen, rejected.numpy())


def test_list_is_a_type_error():
    with raises(TypeError, r"negative_mask must be a torch.Tensor, got list"):
        nk.preference_loss(chosen, rejected, [[True, True]] * B)
    with raises(TypeError, r"hidden must be a torch.Tensor, got ndarray"):
        nk.napo_loss(np.zeros((B, C, T, H)), weight, labels)


# --- errors name the public argument and its own index ---------------------------------------------


def test_check_finite_names_ref_logps_and_its_index():
    ref = torch.zeros(B, C)
    ref[1, 2] = float("nan")
    with raises(ValueError, r"ref_logps has a non-finite value \(nan\) at index \[1, 2\]"):
        nk.napo_loss(hidden, weight, labels, ref_logps=ref, check_finite=True)


def test_check_finite_names_confidence():
    conf = torch.rand(B, K)
    conf[2, 0] = float("inf")
    with raises(ValueError, r"confidence has a non-finite value \(inf\) at index \[2, 0\]"):
        nk.napo_loss(hidden, weight, labels, confidence=conf, check_finite=True)


# --- detach_negatives: what each setting detaches ---------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "shared", "all"])
def test_detach_negatives(mode):
    c = chosen.clone().requires_grad_(True)
    r = rejected.clone().requires_grad_(True)
    nk.preference_loss(c, r, method="napo", sharing="all", detach_negatives=mode, backend="torch").backward()
    c_ref, r_ref = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    reference.family_loss(c_ref, r_ref, method="napo", sharing="all", detach_negatives=mode)[0].backward()
    torch.testing.assert_close(c.grad, c_ref.grad, rtol=1e-12, atol=1e-14)
    want = torch.zeros_like(rejected) if r_ref.grad is None else r_ref.grad  # "all": no path at all
    torch.testing.assert_close(r.grad, want, rtol=1e-12, atol=1e-14)
    assert c.grad.abs().sum() > 0  # the positive always learns
    if mode == "all":  # NAPO's released code: no negative is pushed down
        assert r.grad.abs().sum() == 0
    else:
        assert (r.grad != 0).all()


def test_detach_shared_keeps_own_gradient_only():
    """With "shared", a negative's gradient comes from its own prompt's row alone."""
    r = rejected.clone().requires_grad_(True)
    out = nk.preference_loss(
        chosen, r, method="s_dpo", sharing="all", detach_negatives="shared", return_outputs=True
    )
    out.loss.backward()
    own = rejected.clone().requires_grad_(True)
    rows = nk.preference_loss(chosen, own, method="s_dpo", sharing="all", return_outputs=True).rows
    for i in range(B):  # d rows[i] / d own negatives of i, through the full pool
        (g,) = torch.autograd.grad(rows[i] / B, own, retain_graph=True)
        torch.testing.assert_close(r.grad[i], g[i], rtol=1e-12, atol=1e-14)


# --- one return convention ---------------------------------------------------------------------------


def test_return_convention():
    loss = nk.preference_loss(chosen, rejected, method="s_dpo")
    out = nk.preference_loss(chosen, rejected, method="s_dpo", return_outputs=True)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert isinstance(out, nk.PreferenceOutput)
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=0)
    fused = nk.napo_loss(hidden, weight, labels, method="s_dpo")
    fused_out = nk.napo_loss(hidden, weight, labels, method="s_dpo", return_outputs=True)
    assert isinstance(fused, torch.Tensor) and isinstance(fused_out, nk.PreferenceOutput)
    module_out = nk.PreferenceLoss("s_dpo")(hidden, weight, labels)
    assert isinstance(module_out, nk.PreferenceOutput)
    torch.testing.assert_close(module_out.loss, fused, rtol=0, atol=0)


def test_float_sequence_mask_is_rejected():
    with raises(
        TypeError, r"sequence_mask must be a bool tensor \(True where the entry exists\), got torch.float32"
    ):
        nk.sequence_logprobs(hidden, weight, labels, sequence_mask=torch.full((B, C), 0.5))
