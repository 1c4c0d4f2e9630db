"""GAE against a naive Python loop, closed forms, the λ limits, and padding invariance."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from textrl.advantages import gae, next_values_from


def naive_gae(r, v, nv, term, trunc, mask, gamma, lam):
    """Scalar reference: one row at a time, one step at a time, padding skipped."""
    B, T = len(r), len(r[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            if not mask[b][t]:
                continue
            next_v = 0.0 if term[b][t] else nv[b][t]
            delta = r[b][t] + gamma * next_v - v[b][t]
            running = delta if (term[b][t] or trunc[b][t]) else delta + gamma * lam * running
            adv[b][t] = running
    return adv


def seed_gae(rewards, values, gamma, lam):
    """The loop of shared/reference/ppo-concepts.md for one row, no masks."""
    T = len(rewards)
    advantages = [0.0] * T
    lastgaelam = 0.0
    for t in reversed(range(T)):
        nextvalues = values[t + 1] if t < T - 1 else 0
        delta = rewards[t] + gamma * nextvalues - values[t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[t] = lastgaelam
    return advantages


def _random_batch(B, T, gen, p_end=0.15, p_pad=0.2):
    r = torch.randn(B, T, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, generator=gen, dtype=torch.float64)
    nv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    u = torch.rand(B, T, generator=gen)
    term = u < p_end / 2
    trunc = (u >= p_end / 2) & (u < p_end)
    mask = torch.rand(B, T, generator=gen) > p_pad
    return r, v, nv, term, trunc, mask


def test_matches_seed_loop_unmasked():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    false = torch.zeros(3, 7, dtype=torch.bool)
    nv = next_values_from(v, torch.zeros(3, dtype=torch.float64))  # the seed bootstraps 0 after T
    adv, ret = gae(r, v, nv, false, false, ~false, gamma=0.99, lam=0.95)
    for b in range(3):
        expected = seed_gae(r[b].tolist(), v[b].tolist(), 0.99, 0.95)
        assert adv[b].tolist() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(ret, adv + v)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.98, 0.8), (0.9, 0.0), (0.99, 1.0)])
def test_matches_naive_loop_with_masks_and_episode_ends(gamma, lam):
    gen = torch.Generator().manual_seed(1)
    r, v, nv, term, trunc, mask = _random_batch(5, 23, gen)
    adv, ret = gae(r, v, nv, term, trunc, mask, gamma, lam)
    expected = naive_gae(r.tolist(), v.tolist(), nv.tolist(), term.tolist(), trunc.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.where(mask, adv + v, torch.zeros((), dtype=torch.float64)))


def test_closed_form_single_terminal_reward_constant_values():
    # r = R at the last step (terminated), V = c everywhere, γ = 1: δ_t = 0 before the end, so Â_t = λ^{T-1-t}(R - c).
    T, R, c, lam = 6, 2.0, 0.5, 0.9
    r = torch.zeros(1, T, dtype=torch.float64)
    r[0, -1] = R
    v = torch.full((1, T), c, dtype=torch.float64)
    term = torch.zeros(1, T, dtype=torch.bool)
    term[0, -1] = True
    nv = next_values_from(v, torch.full((1,), 123.0, dtype=torch.float64))  # must be ignored: terminal
    adv, ret = gae(r, v, nv, term, torch.zeros_like(term), torch.ones_like(term), 1.0, lam)
    expected = [lam ** (T - 1 - t) * (R - c) for t in range(T)]
    assert adv[0].tolist() == pytest.approx(expected)
    assert ret[0, -1].item() == pytest.approx(R)


def test_lambda_zero_is_one_step_td_and_lambda_one_is_monte_carlo():
    gen = torch.Generator().manual_seed(2)
    B, T, gamma = 2, 9, 0.97
    r = torch.randn(B, T, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, generator=gen, dtype=torch.float64)
    boot = torch.randn(B, generator=gen, dtype=torch.float64)
    nv = next_values_from(v, boot)
    false = torch.zeros(B, T, dtype=torch.bool)
    trunc = false.clone()
    trunc[:, -1] = True  # the rollout is cut: bootstrap from V(s_T)
    adv0, _ = gae(r, v, nv, false, trunc, ~false, gamma, 0.0)
    torch.testing.assert_close(adv0, r + gamma * nv - v)
    adv1, ret1 = gae(r, v, nv, false, trunc, ~false, gamma, 1.0)
    for t in range(T):
        mc = sum(gamma**k * r[:, t + k] for k in range(T - t)) + gamma ** (T - t) * boot
        torch.testing.assert_close(ret1[:, t], mc)
        torch.testing.assert_close(adv1[:, t], mc - v[:, t])


def test_terminated_never_bootstraps_truncated_does():
    r = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    v = torch.zeros(2, 1, dtype=torch.float64)
    nv = torch.full((2, 1), 10.0, dtype=torch.float64)
    term = torch.tensor([[True], [False]])
    trunc = torch.tensor([[False], [True]])
    adv, _ = gae(r, v, nv, term, trunc, torch.ones(2, 1, dtype=torch.bool), 0.5, 0.95)
    assert adv[:, 0].tolist() == [1.0, 1.0 + 0.5 * 10.0]


def test_episode_end_cuts_the_chain():
    # Two episodes in one row; the second's reward must not leak into the first.
    r = torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64)
    v = torch.zeros(1, 3, dtype=torch.float64)
    term = torch.tensor([[False, True, True]])
    adv, _ = gae(r, v, v.clone(), term, torch.zeros_like(term), torch.ones_like(term), 1.0, 1.0)
    assert adv[0].tolist() == [0.0, 0.0, 5.0]


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 4), T=st.integers(1, 12), seed=st.integers(0, 10_000),
    gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0), garbage=st.sampled_from([math.nan, math.inf, 1e6, -3.0]),
)
def test_padding_never_changes_advantages(B, T, seed, gamma, lam, garbage):
    gen = torch.Generator().manual_seed(seed)
    r, v, nv, term, trunc, mask = _random_batch(B, T, gen)
    adv, ret = gae(r, v, nv, term, trunc, mask, gamma, lam)
    pad = ~mask
    r2, v2, nv2 = (x.masked_fill(pad, garbage) for x in (r, v, nv))
    # flags at padding positions are not read either
    term2, trunc2 = term | pad, trunc ^ pad
    adv2, ret2 = gae(r2, v2, nv2, term2, trunc2, mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)
    assert torch.all(adv[pad] == 0) and torch.all(ret[pad] == 0)


def test_bad_input_names_the_argument():
    x = torch.zeros(2, 3)
    b = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="values shape"):
        gae(x, torch.zeros(2, 4), x, b, b, ~b, 1.0, 0.95)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        gae(x, x, x, b, b, torch.ones(2, 3), 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma and lam"):
        gae(x, x, x, b, b, ~b, 1.5, 0.95)
