"""REINFORCE++: its advantages in closed form, its loss written out, and learning on the toy task with
``--agent reinforce++`` as the only change on the command line."""

import json

import pytest
import torch
from helpers import rollout as text_rollout
from textrl.agents.reinforce_pp import ReinforcePP, ReinforcePPConfig
from textrl.envs import KLPenalty
from textrl.envs.toy import char_tokenizer, target_token_env, tiny_gpt2

import textrl  # noqa: F401
from textrl.cli import resolve_train_config
from textrl.lm.policy import LMActorCritic
from textrl.parallel import Reducer
from textrl.rollout import TokenRollout
from textrl.train import train


def handmade_rollout(rewards: list[list[float]], lengths: list[int]) -> TokenRollout:
    """Rows of the given lengths (EOS at the last token) over a 2-column prompt, per-token rewards as given."""
    B, T = len(lengths), len(rewards[0])
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    term = torch.tensor([[t == n - 1 for t in range(T)] for n in lengths])
    ids = torch.cat([torch.full((B, 2), 5), torch.where(mask, 7, 0)], 1)
    attn = torch.cat([torch.ones(B, 2, dtype=torch.long), mask.long()], 1)
    zeros = torch.zeros(B, T)
    return TokenRollout(ids, attn, 2, mask, zeros, zeros, torch.tensor(rewards), torch.zeros(B), zeros, term,
                        torch.zeros(B, T, dtype=torch.bool), torch.arange(B))


def test_advantages_are_returns_normalised_over_the_batch():
    """G_t = Σ_{s≥t} γ^{s−t} r_s per row, then (G − mean) / std over every real token of the batch."""
    rewards = [[-0.1, -0.2, 1.0, 0.0], [0.05, 2.0, 0.0, 0.0], [-0.3, 0.1, -0.2, 0.5]]
    ro = handmade_rollout(rewards, [3, 2, 4])
    for gamma in (1.0, 0.9):
        data, stats = ReinforcePP(ReinforcePPConfig(gamma=gamma)).prepare(ro, Reducer())
        returns = []  # by hand, row by row, over the real tokens only
        for row, n in zip(rewards, [3, 2, 4], strict=True):
            returns += [sum(gamma ** (s - t) * row[s] for s in range(t, n)) for t in range(n)]
        g = torch.tensor(returns, dtype=torch.float64)
        expected = (g - g.mean()) / torch.sqrt(g.var(unbiased=True) + 1e-8)
        adv = data["advantages"]
        torch.testing.assert_close(adv[ro.action_mask].double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.all(adv[~ro.action_mask] == 0)  # padding: no advantage
        assert stats["reward/return_mean"] == pytest.approx(float(g.mean()), abs=1e-6)
        if gamma == 1.0:  # the first token's return is the whole row's reward: score − β·Σ KL
            assert returns[0] == pytest.approx(sum(rewards[0][:3]))


def test_loss_is_the_token_level_clipped_surrogate():
    tok = char_tokenizer()
    torch.manual_seed(0)
    policy = LMActorCritic(tiny_gpt2(len(tok)), value_head=False)
    env = KLPenalty(target_token_env(num_envs=4, tokenizer=tok), tiny_gpt2(len(tok), seed=1), 0.05)
    agent = ReinforcePP(ReinforcePPConfig(), policy)
    ReinforcePP.check_env(env, agent.config)
    ro = text_rollout(env, policy.lm, seed=0)
    mb, _ = agent.prepare(ro, Reducer())
    with torch.no_grad():  # move the policy so the ratio is not 1
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss, terms, _ = agent.loss(policy, mb, 0.2)
    logp, _, _, _ = policy.evaluate_response(ro.input_ids, ro.attention_mask, ro.response_start)
    m, adv = ro.action_mask, mb["advantages"]
    ratio = torch.exp(logp[m] - ro.logprobs[m])
    by_hand = -torch.minimum(ratio * adv[m], ratio.clamp(0.8, 1.2) * adv[m]).mean()
    torch.testing.assert_close(loss, by_hand, atol=1e-5, rtol=1e-5)
    assert "losses/value" not in terms and "policy/entropy" in terms
    assert ReinforcePP.has_critic is False and ReinforcePP.kl_in == "reward" and agent.num_generations == 1


def test_bad_settings_and_envs_are_refused():
    import gymnasium as gym

    with pytest.raises(ValueError, match="gamma must lie in"):
        ReinforcePPConfig(gamma=1.5)
    with pytest.raises(TypeError, match="needs a text env"):
        ReinforcePP.check_env(gym.make_vec("CartPole-v1", num_envs=2), ReinforcePPConfig())
    with pytest.raises(ValueError, match="serves each prompt 1 time"):
        ReinforcePP.check_env(target_token_env(4, char_tokenizer()), ReinforcePPConfig(num_generations=2))


@pytest.mark.learning
def test_reinforce_pp_raises_the_toy_reward(tmp_path):
    cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--agent", "reinforce++", "--seed", "1",
                                   "--output-dir", str(tmp_path)])
    result = train(cfg, quiet=True)
    before, after = result.before, result.after
    assert after.mean >= 0.2, (before, after)  # a random policy scores ~0.03 (the bar RLOO and GRPO meet)
    assert after.mean - before.mean > 3 * max(after.se, before.se)
    m = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(x["policy/first_ratio_dev"] < 1e-4 for x in m)  # on-policy: ratio = 1 on the first minibatch
    assert all(x["reward/kl_coef"] == cfg.kl.coef for x in m)  # the KL stays in the reward
    assert "losses/value" not in m[-1] and {"reward/return_mean", "policy/entropy"} <= set(m[-1])


def test_agent_flag_is_the_only_cli_change(tmp_path, capfd):
    """``--agent reinforce_pp`` (the alias; ``reinforce++`` is what the other tests use) through the CLI's entry
    point (in this process)."""
    from textrl.cli import main

    out = tmp_path / "run"
    assert main(["train", "--env", "textrl/TargetToken-v0", "--agent", "reinforce_pp", "--total-steps", "512",
                 "--seed", "3", "--output-dir", str(out)]) == 0
    assert "held-out reward:" in capfd.readouterr().err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in lines] == [256, 512]
    assert "agent: reinforce++" in (out / "config.yaml").read_text()
