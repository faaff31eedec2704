"""Cross-checks of the ground truth itself, and of the package, against formulas written again here
independently (scalar Python loops over the spec in docs/loss-family.md): DPO as the K = 1 case of
every method, S-DPO's two forms, DMPO's and NAPO's paper formulas, DynamicPO's boundary set and
``beta_n``, the exact 1-D 3-means against a brute-force search, and the similarity pool."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_close, hyp

import napo_kernels as nk
from napo_kernels import plan, reference

pytestmark = pytest.mark.filterwarnings("ignore:napo. no margin_state:UserWarning")


def softplus(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def neg_log_sigmoid(z: float) -> float:
    return softplus(-z)


def lse(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def beta_n_by_hand(beta: float, tau: float, pos: float, neg: float, rest_mean: float) -> float:
    d1, d2 = pos - neg, neg - rest_mean
    denom = abs(d1) + abs(d2)
    ratio = (d1 - d2 - tau) / denom if denom > 0 else (-math.inf if tau > 0 else 0.0)
    return beta * (1.0 + 0.5 * math.tanh(ratio))


# ----------------------------------------------------------------------------------------------
# K = 1: every method is DPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # every method against DPO on every backend
def test_k1_every_method_is_dpo(backend):
    """With one own negative: ``-log sigma(beta (r+ - r-) - gamma)`` for DPO, S-DPO, DMPO and NAPO
    (constant margin gamma_0 = gamma); DynamicPO is the same with its own ``beta_n``."""

    @hyp(backend, scale=0.6)
    @given(
        b=st.integers(1, 5),
        beta=st.sampled_from([0.1, 1.0, 3.0]),
        gamma=st.sampled_from([0.0, 0.7]),
        with_ref=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(b, beta, gamma, with_ref, seed):
        gen = torch.Generator().manual_seed(seed)
        s_pos, s_neg = (
            torch.randn(b, generator=gen).double() * 3,
            torch.randn(b, 1, generator=gen).double() * 3,
        )
        ref_pos, ref_neg = (
            (torch.randn(b, generator=gen).double(), torch.randn(b, 1, generator=gen).double())
            if with_ref
            else (None, None)
        )
        r_pos = s_pos - (ref_pos if with_ref else 0)
        r_neg = s_neg[:, 0] - (ref_neg[:, 0] if with_ref else 0)
        dpo = [neg_log_sigmoid(beta * float(r_pos[i] - r_neg[i]) - gamma) for i in range(b)]
        for method in nk.METHODS:
            kw = dict(method=method, beta=beta, gamma=gamma, sharing="own")
            if method == "napo":  # NAPO's margin is gamma0; constant with margin_mode="none"
                kw = dict(method=method, beta=beta, gamma0=gamma, margin_mode="none", sharing="own")
            want = dpo
            if method == "dynamicpo":  # no margin; B_i = D_i = {the negative}: d2 = 0, beta_n from d1 alone
                kw.pop("gamma")
                want = []
                for i in range(b):
                    bn = beta_n_by_hand(beta, 2.0, float(s_pos[i]), float(s_neg[i, 0]), float(s_neg[i, 0]))
                    want.append(neg_log_sigmoid(bn * float(r_pos[i] - r_neg[i])))
            want_t = torch.tensor(want, dtype=torch.float64)
            out = nk.preference_loss(
                s_pos, s_neg, None, ref_pos, ref_neg, backend=backend, **kw, return_outputs=True
            )
            assert_close(out.rows, want_t, torch.float64, f"api {method}")
            _, extras = reference.family_loss(s_pos, s_neg, None, ref_pos, ref_neg, **kw)
            assert_close(extras["rows"], want_t, torch.float64, f"reference {method}")

    check()


def test_dpo_gradient_by_hand(backend):
    """d/dr+ of ``-log sigma(z)``, ``z = beta (r+ - r-) - gamma`` is ``-beta sigma(-z)``."""
    s_pos = torch.tensor([0.3, -2.0, 5.0], dtype=torch.float64, requires_grad=True)
    s_neg = torch.tensor([[1.0], [-2.5], [-1.0]], dtype=torch.float64, requires_grad=True)
    beta, gamma = 1.7, 0.4
    out = nk.preference_loss(
        s_pos, s_neg, method="dpo", beta=beta, gamma=gamma, backend=backend, return_outputs=True
    )
    d_pos, d_neg = torch.autograd.grad(out.loss, [s_pos, s_neg])
    for i in range(3):
        z = beta * float(s_pos[i].detach() - s_neg[i, 0].detach()) - gamma
        g = -beta / (1 + math.exp(z)) / 3  # mean over 3 prompts
        assert d_pos[i].item() == pytest.approx(g, rel=1e-12)
        assert d_neg[i, 0].item() == pytest.approx(-g, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Multi-negative formulas written directly
# ----------------------------------------------------------------------------------------------


def pools_by_hand(b: int, k: int, mask: torch.Tensor, share: torch.Tensor) -> list[list[tuple[int, int]]]:
    """``P_i``: own valid negatives plus the valid negatives of every prompt ``j`` with ``share[i, j]``."""
    return [
        [(j, kk) for j in range(b) for kk in range(k) if (j == i or share[i, j]) and mask[j, kk]]
        for i in range(b)
    ]


@st.composite
def multi_negative(draw):
    b, k = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    s_pos = torch.randn(b, generator=gen).double() * 2
    s_neg = torch.randn(b, k, generator=gen).double() * 2
    share = (torch.rand(b, b, generator=gen) < 0.5) | torch.eye(b, dtype=torch.bool)
    mask = torch.rand(b, k, generator=gen) < 0.75
    mask[:, 0] = True
    beta = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return s_pos, s_neg, mask, share, beta


def test_sdpo_two_forms_agree(backend):
    """``softplus(LSE(beta Delta))`` (what is computed) equals the paper's
    ``-log sigma(-log sum exp(beta Delta))`` (``reference.sdpo_rows_sigmoid_form``) and a direct sum."""

    @hyp(backend, scale=0.6)
    @given(case=multi_negative())
    def check(case):
        s_pos, s_neg, mask, share, beta = case
        b, k = s_neg.shape
        out = nk.preference_loss(
            s_pos, s_neg, mask, method="s_dpo", beta=beta, sharing=share, backend=backend, return_outputs=True
        )
        pool = reference.pool_mask(mask, share)
        delta = reference.reward_matrix(s_pos, s_neg.masked_fill(~mask, 0).reshape(-1))
        sigmoid_form = reference.sdpo_rows_sigmoid_form(delta, pool, beta)
        by_hand = [
            -math.log(
                1
                / (
                    1
                    + math.exp(math.log(sum(math.exp(beta * float(s_neg[j, kk] - s_pos[i])) for j, kk in p)))
                )
            )
            for i, p in enumerate(pools_by_hand(b, k, mask, share))
        ]
        assert_close(out.rows, sigmoid_form, torch.float64, "api vs sigmoid form")
        assert_close(reference.sdpo_rows(delta, pool, beta), sigmoid_form, torch.float64, "reference forms")
        assert_close(out.rows, torch.tensor(by_hand, dtype=torch.float64), torch.float64, "by hand")

    check()


def test_dmpo_paper_formula(backend):
    """DMPO: ``-log sigma(beta r+ - (1/|P_i|) sum_{n in P_i} beta r_n)`` with reference rewards."""

    @hyp(backend, scale=0.6)
    @given(case=multi_negative(), gamma=st.sampled_from([0.0, 0.3]))
    def check(case, gamma):
        s_pos, s_neg, mask, share, beta = case
        b, k = s_neg.shape
        ref_pos, ref_neg = s_pos.flip(0) * 0.5, s_neg * 0.3
        r_pos, r_neg = s_pos - ref_pos, s_neg - ref_neg
        out = nk.preference_loss(
            s_pos, s_neg, mask, ref_pos, ref_neg, method="dmpo", beta=beta, gamma=gamma, sharing=share,
            backend=backend,
        return_outputs=True)  # fmt: skip
        want = []
        for i, p in enumerate(pools_by_hand(b, k, mask, share)):
            mean_neg = sum(beta * float(r_neg[j, kk]) for j, kk in p) / len(p)
            want.append(neg_log_sigmoid(beta * float(r_pos[i]) - mean_neg - gamma))
        assert_close(out.rows, torch.tensor(want, dtype=torch.float64), torch.float64, "dmpo")

    check()


@pytest.mark.parametrize("mode", ["batch", "per_negative", "none"])
def test_napo_paper_formula(backend, mode):
    """NAPO's loss with the dynamic margin of the released code, written out by hand:
    ``M_t`` = mean confidence over pairs, ``Mbar_t = mu Mbar + (1 - mu) M_t``,
    ``gamma_t = gamma0 (1 - alpha (M_t - Mbar_t))``, ``L_i = softplus(gamma_t + LSE(beta Delta))``
    (per-negative: ``gamma_{i,n}`` inside the LSE; none: ``gamma0``)."""

    @hyp(backend, scale=0.4)
    @given(case=multi_negative(), ema=st.sampled_from([0.0, 0.4]))
    def check(case, ema):
        s_pos, s_neg, mask, share, beta = case
        b, k = s_neg.shape
        conf = torch.rand(b, k, generator=torch.Generator().manual_seed(b * 10 + k)).double()
        gamma0, alpha, mu = 0.8, 0.3, 0.9
        state = nk.DynamicMargin(gamma0, alpha, mu, mode)
        state.ema.fill_(ema)
        out = nk.preference_loss(
            s_pos, s_neg, mask, method="napo", beta=beta, sharing=share, confidence=conf, margin_state=state,
            backend=backend,
        return_outputs=True)  # fmt: skip
        pools = pools_by_hand(b, k, mask, share)
        pairs = [(j, kk) for p in pools for j, kk in p]
        m_t = sum(float(conf[j, kk]) for j, kk in pairs) / len(pairs)
        mbar = mu * ema + (1 - mu) * m_t
        want = []
        for i, p in enumerate(pools):
            terms = []
            for j, kk in p:
                gamma = {
                    "batch": gamma0 * (1 - alpha * (m_t - mbar)),
                    "per_negative": gamma0 * (1 - alpha * (float(conf[j, kk]) - mbar)),
                    "none": gamma0,
                }[mode]
                terms.append(beta * float(s_neg[j, kk] - s_pos[i]) + gamma)
            want.append(softplus(lse(terms)))
        assert_close(out.rows, torch.tensor(want, dtype=torch.float64), torch.float64, f"napo {mode}")
        assert float(state.ema) == pytest.approx(mbar, rel=1e-12)
        assert float(out.metrics["margin/batch_confidence"]) == pytest.approx(m_t, rel=1e-12)

    check()


# ----------------------------------------------------------------------------------------------
# DynamicPO selection and the exact 1-D 3-means
# ----------------------------------------------------------------------------------------------


def sse(xs: list[float]) -> float:
    if not xs:
        return 0.0
    mean = sum(xs) / len(xs)
    return sum((x - mean) ** 2 for x in xs)


def brute_force_cost(values: list[float]) -> float:
    """Least within-cluster sum of squares over every assignment of the values to 3 labels."""
    best = math.inf
    for labels in itertools.product(range(3), repeat=len(values)):
        cost = sum(sse([v for v, c in zip(values, labels) if c == g]) for g in range(3))
        best = min(best, cost)
    return best


def best_two_cost(values: list[float]) -> float:
    """Least 2-cluster sum of squares (any assignment)."""
    best = math.inf
    for labels in itertools.product(range(2), repeat=len(values)):
        best = min(best, sum(sse([v for v, c in zip(values, labels) if c == g]) for g in range(2)))
    return best


values_1d = st.one_of(
    st.lists(st.floats(-50, 50, allow_nan=False, allow_subnormal=False), min_size=1, max_size=7),
    st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=7),  # a coarse grid: many exact ties
)


@settings(max_examples=60, deadline=None)
@given(values=values_1d)
def test_top_cluster_3means_is_optimal(values):
    """The reference and the vectorised ``plan`` twin return the same top cluster, and the partition
    it belongs to costs what a brute-force search over all 3-labellings finds."""
    ref = reference.top_cluster_3means(values)
    got = torch.nonzero(plan.top_cluster_3means(torch.tensor(values, dtype=torch.float64))).flatten().tolist()
    assert sorted(ref) == got
    n = len(values)
    top = [values[i] for i in ref]
    rest = [values[i] for i in range(n) if i not in ref]
    assert top and (not rest or min(top) > max(rest)), "the top cluster holds the largest values"
    if n < 3:
        assert top == [max(values)] * len(top) and len(top) == values.count(max(values))
        return
    # cost of the partition {top} + best 2-split of the rest equals the optimum
    cost = sse(top) + best_two_cost(rest)
    assert cost == pytest.approx(brute_force_cost(values), rel=1e-9, abs=1e-9)


def test_top_cluster_3means_examples():
    assert reference.top_cluster_3means([0.0, 0.1, 5.0, 5.1, 10.0, 10.2]) == [4, 5]
    assert reference.top_cluster_3means([1.0, 1.0, 1.0, 1.0]) == [0, 1, 2, 3]  # all equal: one cluster
    assert reference.top_cluster_3means([2.0, 1.0, 2.0, 1.0]) == [0, 2]  # two distinct values
    assert reference.top_cluster_3means([3.0, -1.0]) == [0]  # fewer than 3: the largest
    assert reference.top_cluster_3means([4.0, 4.0]) == [0, 1]


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 4),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    grid=st.booleans(),
    beta=st.sampled_from([0.5, 1.0]),
    tau=st.sampled_from([2.0, 0.0, 1.0]),
)
def test_dynamicpo_selection_by_hand(b, k, seed, grid, beta, tau):
    """``B_i = {n : s_n >= s_i+}``, else the top 3-means cluster; ``D_i = P_i \\ B_i`` (or ``B_i``);
    ``beta_n`` from ``d1, d2`` with the 0/0 guard; in [0.5 beta, 1.5 beta]. Reference and ``plan``
    agree exactly on the sets."""
    gen = torch.Generator().manual_seed(seed)
    s_pos = torch.randn(b, generator=gen).double() * 2
    s_neg = torch.randn(b * k, generator=gen).double() * 2
    if grid:
        s_pos, s_neg = s_pos.round(), s_neg.round()
    pool = torch.rand(b, b * k, generator=gen) < 0.6
    pool[torch.arange(b), torch.randint(0, b * k, (b,), generator=gen)] = True
    ref_b, ref_beta = reference.dynamicpo_selection(s_pos, s_neg, pool, beta, tau)
    got_b, got_beta = plan.dynamicpo_selection(s_pos, s_neg, pool, beta, tau)
    assert torch.equal(ref_b, got_b)
    assert_close(got_beta, ref_beta, torch.float64, "beta_n plan vs reference")
    for i in range(b):
        members = [n for n in range(b * k) if pool[i, n]]
        boundary = [n for n in members if s_neg[n] >= s_pos[i]]
        if not boundary:
            boundary = [members[t] for t in reference.top_cluster_3means([float(s_neg[n]) for n in members])]
        assert sorted(boundary) == torch.nonzero(ref_b[i]).flatten().tolist()
        rest = [n for n in members if n not in boundary] or boundary
        rest_mean = sum(float(s_neg[n]) for n in rest) / len(rest)
        for n in boundary:
            bn = beta_n_by_hand(beta, tau, float(s_pos[i]), float(s_neg[n]), rest_mean)
            assert float(ref_beta[i, n]) == pytest.approx(bn, rel=1e-9, abs=1e-12)
            assert 0.5 * beta <= bn <= 1.5 * beta  # (0.5, 1.5) beta in exact arithmetic; tanh rounds to +-1
        assert all(float(ref_beta[i, n]) == 0.0 for n in range(b * k) if n not in boundary)


# ----------------------------------------------------------------------------------------------
# Pools
# ----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 7),
    rho=st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.99, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    grid=st.booleans(),
)
def test_similarity_pool(b, rho, seed, grid):
    """Each prompt shares with the ``floor(rho (B - 1))`` other prompts of largest ``<u_i, u_j>``
    (self excluded before the top-m, ties to the lower index); ``plan`` equals the reference."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, 3, generator=gen).double()
    if grid:  # repeated users give exact ties
        u = u.round().clamp(-1, 1)
    m = math.floor(rho * (b - 1) + 1e-9)
    ref = reference.similar_prompts(u, rho)
    share = plan.share_matrix(b, "similarity", u, rho, torch.device("cpu"))
    assert torch.equal(share, ref | torch.eye(b, dtype=torch.bool))
    for i in range(b):
        chosen = torch.nonzero(ref[i]).flatten().tolist()
        assert len(chosen) == m and i not in chosen
        sims = [(float(u[i] @ u[j]), -j) for j in range(b) if j != i]
        expected = sorted(sims, reverse=True)[:m]
        assert sorted(-j for _, j in expected) == chosen
    mask = torch.rand(b, 2, generator=gen) < 0.7
    assert torch.equal(plan.negative_pool(share, mask), reference.pool_mask(mask, "similarity", u, rho))


def test_reference_sequence_scores_by_hand():
    """The reference's stage 1 against a token-by-token log-softmax in Python floats."""
    gen = torch.Generator().manual_seed(0)
    t, h, v = 4, 3, 5
    hidden = torch.randn(2, t, h, generator=gen).double()
    weight = torch.randn(v, h, generator=gen).double()
    bias = torch.randn(v, generator=gen).double()
    labels = torch.tensor([[-100, 2, 4, 0], [1, -100, -100, 3]])
    for reduction in ("sum", "mean"):
        got = reference.sequence_scores(hidden, weight, labels, bias, reduction)
        for s in range(2):
            total, count = 0.0, 0
            for tt in range(t):
                if labels[s, tt] == -100:
                    continue
                logits = [
                    sum(float(hidden[s, tt, d] * weight[vv, d]) for d in range(h)) + float(bias[vv])
                    for vv in range(v)
                ]
                total += logits[int(labels[s, tt])] - lse(logits)
                count += 1
            want = total if reduction == "sum" else total / count
            assert float(got[s]) == pytest.approx(want, rel=1e-12)
