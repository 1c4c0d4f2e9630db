"""Losses, KL estimators, masked statistics and KL controllers against naive loops and closed forms."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from textrl.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from textrl.logprobs import entropy_from_logits
from textrl.losses import explained_variance, kl_estimate, policy_loss, sequence_policy_loss, value_loss
from textrl.masking import masked_mean, masked_var, masked_whiten


def _data(seed, B=4, T=9):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    return lp, old, adv, mask


def test_masked_stats_match_a_loop():
    x = torch.tensor([[1.0, 2.0, 99.0], [4.0, float("nan"), 6.0]])
    m = torch.tensor([[True, True, False], [True, False, True]])
    vals = [1.0, 2.0, 4.0, 6.0]
    mean = sum(vals) / 4
    assert masked_mean(x, m).item() == pytest.approx(mean)
    assert masked_var(x, m).item() == pytest.approx(sum((a - mean) ** 2 for a in vals) / 3)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(sum((a - mean) ** 2 for a in vals) / 4)
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, m).item() == pytest.approx(1.0, abs=1e-5)
    assert w[0, 2].item() == 0 and w[1, 1].item() == 0
    w2 = masked_whiten(x, m, shift_mean=False)
    assert masked_mean(w2, m).item() == pytest.approx(mean, rel=1e-5)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty mask: 0, not NaN
    with pytest.raises(ValueError, match="at least one"):
        masked_var(x, torch.zeros_like(m))
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(x, m[:, :2])


def test_policy_loss_matches_naive_loop():
    lp, old, adv, mask = _data(0)
    eps = 0.2
    loss, stats = policy_loss(lp, old, adv, mask, eps)
    terms, kls, clipped = [], [], []
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(lp[b, t] - old[b, t])
            a = adv[b, t].item()
            terms.append(max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)))
            kls.append((ratio - 1) - math.log(ratio))
            clipped.append(abs(ratio - 1) > eps)
    assert loss.item() == pytest.approx(sum(terms) / len(terms))
    assert stats["approx_kl"].item() == pytest.approx(sum(kls) / len(kls))
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped))


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_gradient_is_unclipped():
    lp, _, adv, mask = _data(1)
    lp = lp.clone().requires_grad_(True)
    loss, stats = policy_loss(lp, lp.detach(), adv, mask, 0.2)
    assert loss.item() == pytest.approx(-masked_mean(adv, mask).item())
    assert stats["approx_kl"].item() == 0 and stats["clipfrac"].item() == 0 and stats["ratio_max_dev"].item() == 0
    loss.backward()
    expected = torch.where(mask, -adv / mask.sum(), torch.zeros_like(adv))  # d(-r·A)/dlogπ = -A at r = 1
    torch.testing.assert_close(lp.grad, expected)


def test_policy_loss_clipping_kills_gradient_outside_the_trust_region():
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.tensor([[math.log(1.5), math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # both want to move further out: clipped
    loss, stats = policy_loss(lp, old, adv, torch.ones(1, 2, dtype=torch.bool), 0.2)
    loss.backward()
    assert torch.all(lp.grad == 0)
    assert stats["clipfrac"].item() == 1.0


def test_value_loss_matches_naive_loop_clipped_and_unclipped():
    g = torch.Generator().manual_seed(3)
    v, old, ret = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[0, 0] = True
    ev = 0.2
    clipped, plain = [], []
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                vc = old[b, t] + min(max(v[b, t] - old[b, t], -ev), ev)
                clipped.append(max((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2).item())
                plain.append(((v[b, t] - ret[b, t]) ** 2).item())
    assert value_loss(v, old, ret, mask, ev)[0].item() == pytest.approx(sum(clipped) / len(clipped))
    assert value_loss(v, old, ret, mask, None)[0].item() == pytest.approx(sum(plain) / len(plain))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), garbage=st.sampled_from([math.nan, math.inf, -1e9]))
def test_padding_never_changes_any_loss(seed, garbage):
    lp, old, adv, mask = _data(seed)
    pad = ~mask
    g = lambda x: x.masked_fill(pad, garbage)  # noqa: E731
    a = policy_loss(lp, old, adv, mask, 0.2)
    b = policy_loss(g(lp), g(old), g(adv), mask, 0.2)
    assert a[0].item() == pytest.approx(b[0].item())
    for key in a[1]:
        assert a[1][key].item() == pytest.approx(b[1][key].item())
    va = value_loss(lp, old, adv, mask, 0.2)[0]
    vb = value_loss(g(lp), g(old), g(adv), mask, 0.2)[0]
    assert va.item() == pytest.approx(vb.item())
    assert explained_variance(lp, adv, mask).item() == pytest.approx(explained_variance(g(lp), g(adv), mask).item())


def test_entropy_from_logits_closed_forms():
    uniform = torch.zeros(2, 3, 7)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(7)))
    peaked = torch.tensor([[1e4, 0.0, 0.0]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(5, 11)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_explained_variance():
    ret = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = torch.ones(4, dtype=torch.bool)
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), ret, m).item() == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones(4), m).item())


def test_kl_estimators_match_their_formulas_and_direction():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    for i in range(3):
        log_r = ref[i].item() - lp[i].item()
        assert kl_estimate(lp, ref, "k1")[i].item() == pytest.approx(lp[i].item() - ref[i].item())
        assert kl_estimate(lp, ref, "k2")[i].item() == pytest.approx(0.5 * log_r**2)
        assert kl_estimate(lp, ref, "k3")[i].item() == pytest.approx(math.exp(log_r) - 1 - log_r)
    for est in ("k1", "k2", "k3"):
        assert torch.all(kl_estimate(lp, lp, est) == 0)  # policy == reference -> zero KL
    assert kl_estimate(lp, ref, "k1")[0] > 0  # policy puts more mass on a_t than the reference: positive
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(lp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(6, generator=g), torch.randn(6, generator=g)
    logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    true_kl = (logp.exp() * (logp - logq)).sum().item()
    a = torch.multinomial(logp.exp(), 400_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        assert kl_estimate(logp[a], logq[a], est).mean().item() == pytest.approx(true_kl, abs=0.01)


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    assert fixed.update(10.0, 100) == 0.05
    ada = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ada.update(current_kl=12.0, n_steps=1000)  # error clipped to +0.2
    assert ada.value == pytest.approx(0.1 * (1 + 0.2 * 1000 / 10_000))
    ada.update(current_kl=3.0, n_steps=1000)  # error -0.5 clipped to -0.2
    assert ada.value == pytest.approx(0.1 * 1.02 * 0.98)
    before = ada.value
    ada.update(float("nan"), 1000)
    assert ada.value == before
    clone = make_kl_controller(0.3, target_kl=6.0)
    clone.load_state_dict(ada.state_dict())
    assert clone.value == ada.value
    assert isinstance(make_kl_controller(0.05), FixedKLController)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0, horizon=10)


def test_only_k1_as_a_reward_gives_the_gradient_of_the_kl():
    """With the KL estimate paid as a reward, the policy gradient is E_π[k(a) ∇log π(a)] (k held fixed, as a
    reward is). Enumerated exactly on a 6-way softmax: k1's equals ∇KL(π‖π_ref); k2's and k3's do not (so a
    run refuses them in the reward); the k2 loss term, differentiated through, gives ∇KL(π‖π_ref) too."""
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    true_grad, = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta, retain_graph=True)
    grads = {}
    for est in ("k1", "k2", "k3"):
        reward = kl_estimate(logp, ref, est).detach()
        grads[est], = torch.autograd.grad((logp.exp().detach() * reward * logp).sum(), theta, retain_graph=True)
    torch.testing.assert_close(grads["k1"], true_grad)
    for est in ("k2", "k3"):
        rel = float((grads[est] - true_grad).norm() / true_grad.norm())
        assert rel > 0.5, (est, rel)  # (0.69 and 0.86 here)
    # as a loss term differentiated through π (GRPO's kl_loss): k2 gives ∇KL(π‖π_ref), k3 ∇KL(π_ref‖π)
    k2_loss, = torch.autograd.grad((logp.exp().detach() * kl_estimate(logp, ref, "k2")).sum(), theta, retain_graph=True)
    torch.testing.assert_close(k2_loss, true_grad)
    k3_loss, = torch.autograd.grad((logp.exp().detach() * kl_estimate(logp, ref, "k3")).sum(), theta, retain_graph=True)
    reverse, = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta)
    torch.testing.assert_close(k3_loss, reverse)
    assert float((k3_loss - true_grad).norm()) > 0.05 * float(true_grad.norm())


def test_rloo_approx_kl_is_per_token_like_every_agents():
    """The warning thresholds and target_kl are per token: a sequence loss reports the per-token k3 mean (a
    per-sequence value would be about T times larger and fire T times early)."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 10, generator=g, dtype=torch.float64) - 2
    new = old + 0.05 * torch.randn(4, 10, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[0, 6:] = False
    new[0, 6:] = float("nan")  # padding: never read
    _, stats = sequence_policy_loss(new, old, torch.ones(4, dtype=torch.float64), mask, 0.2)
    lr = (new - old)[mask]
    assert float(stats["approx_kl"]) == pytest.approx(float((torch.expm1(lr) - lr).mean()))
    _, token_stats = policy_loss(torch.where(mask, new, 0.0), old, torch.ones(4, 10, dtype=torch.float64), mask, 0.2)
    assert float(stats["approx_kl"]) == pytest.approx(float(token_stats["approx_kl"]))
