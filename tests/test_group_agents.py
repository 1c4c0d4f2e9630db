"""RLOO and GRPO: closed forms of their advantages and losses, grouped envs, learning on the toy task, and
swapping --agent as the only change on the CLI."""

import json

import pytest
import torch
from helpers import reproducible
from helpers import rollout as text_rollout
from textrl.agents.grpo import GRPO, GRPOConfig
from textrl.agents.rloo import RLOO, RLOOConfig
from textrl.envs import KLPenalty
from textrl.envs.toy import char_tokenizer, target_token_env, tiny_gpt2

import textrl  # noqa: F401
from textrl.advantages import group_normalise, leave_one_out
from textrl.cli import resolve_train_config
from textrl.lm.policy import LMActorCritic
from textrl.losses import aggregate, kl_estimate, sequence_policy_loss
from textrl.parallel import Reducer
from textrl.train import train


# --- advantages ----------------------------------------------------------------------------------
def test_leave_one_out_matches_its_definition():
    r = torch.tensor([1.0, 2.0, 4.0, 7.0, -1.0, 0.0, 0.5, 3.0])
    adv = leave_one_out(r, 4)
    expected = []
    for g in r.view(2, 4):
        for i in range(4):
            others = [float(g[j]) for j in range(4) if j != i]
            expected.append(float(g[i]) - sum(others) / 3)
    torch.testing.assert_close(adv, torch.tensor(expected))
    # the closed form k/(k-1)·(R - mean) and: advantages of a group sum to 0
    torch.testing.assert_close(adv.view(2, 4), 4 / 3 * (r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True)))
    torch.testing.assert_close(adv.view(2, 4).sum(1), torch.zeros(2), atol=1e-6, rtol=0)
    # k = 2: each sample's baseline is the other sample
    torch.testing.assert_close(leave_one_out(torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))


def test_group_normalisation_closed_form_and_zero_variance_group():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_normalise(r, 4, "group", eps=1e-4)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    std = ((g - 2.5) ** 2).sum().div(3).sqrt()  # Bessel-corrected, as TRL
    torch.testing.assert_close(adv[:4], (g - 2.5) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # all equal: no signal, no 0/0
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(group_normalise(r, 4, "none"), torch.cat([g - 2.5, torch.zeros(4)]))
    torch.testing.assert_close(group_normalise(r, 4, "batch", eps=0.0), torch.cat([g - 2.5, torch.zeros(4)]) / r.std())


@pytest.mark.parametrize("bad, match", [
    (lambda: leave_one_out(torch.zeros(6), 4), "does not split into groups of 4"),
    (lambda: leave_one_out(torch.zeros(4), 1), "group_size must be an integer >= 2"),
    (lambda: group_normalise(torch.zeros(4, 2), 2), "must be 1-D"),
    (lambda: group_normalise(torch.zeros(4), 2, "std"), "scale must be"),
])
def test_group_advantages_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# --- losses ---------------------------------------------------------------------------------------
def test_sequence_policy_loss_is_one_ratio_per_completion():
    torch.manual_seed(0)
    old = torch.randn(3, 5)
    new = (old + 0.1 * torch.randn(3, 5)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, stats = sequence_policy_loss(new, old, adv, mask, clip_range=0.05)
    ratios = [torch.exp((new[i] - old[i])[mask[i]].sum()) for i in range(3)]
    naive = torch.stack([torch.maximum(-a * r, -a * r.clamp(0.95, 1.05)) for a, r in zip(adv, ratios, strict=True)]).mean()
    torch.testing.assert_close(loss, naive)
    loss.backward()
    assert torch.all(new.grad[~mask] == 0)  # padding gets no gradient
    assert stats["clipfrac"] == pytest.approx(float(sum(abs(r - 1) > 0.05 for r in ratios)) / 3)


def test_sequence_aggregation_weighs_rows_equally():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert float(aggregate(x, mask, "token")) == pytest.approx(9 / 5)
    assert float(aggregate(x, mask, "sequence")) == pytest.approx((1 + 5) / 2)
    with pytest.raises(ValueError, match="aggregation must be"):
        aggregate(x, mask, "batch")


def test_grpo_kl_term_value_and_gradient_by_hand():
    """β·k3 with k3 = exp(ref − logp) − (ref − logp) − 1; d k3 / d logp = 1 − exp(ref − logp)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[True, True, False]])
    k3 = aggregate(kl_estimate(logp, ref, "k3"), mask, "sequence")
    d = [-0.5, 1.0]  # ref - logp at the real tokens
    by_hand = sum(torch.exp(torch.tensor(x)).item() - x - 1 for x in d) / 2
    assert float(k3.detach()) == pytest.approx(by_hand, rel=1e-6)
    k3.backward()
    grad_by_hand = [(1 - torch.exp(torch.tensor(x)).item()) / 2 for x in d] + [0.0]
    torch.testing.assert_close(logp.grad, torch.tensor([grad_by_hand]))


def test_grpo_loss_equals_paper_formula_on_a_batch():
    """The agent's minibatch loss == the paper's objective written out per completion and token."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    policy = LMActorCritic(tiny_gpt2(len(tok)))
    env = KLPenalty(target_token_env(num_envs=4, tokenizer=tok, num_generations=2), tiny_gpt2(len(tok), seed=1), 0.0)
    agent = GRPO(GRPOConfig(num_generations=2, learning_rate=1e-3), policy, kl_coef=0.3)
    GRPO.check_env(env, agent.config)
    ro = text_rollout(env, policy.lm, seed=0)
    mb, _ = agent.prepare(ro, Reducer())
    loss, terms, _ = agent.loss(policy, mb, 0.2)
    logp, _, _, _ = policy.evaluate_response(ro.input_ids, ro.attention_mask, ro.prompt_ids.shape[1])
    r = ro.scores
    adv = [(r[i] - r[2 * (i // 2): 2 * (i // 2) + 2].mean()) / (r[2 * (i // 2): 2 * (i // 2) + 2].std() + 1e-4)
           for i in range(4)]
    per_seq = []
    for i in range(4):
        m = ro.action_mask[i]
        ratio = torch.exp(logp[i][m] - ro.logprobs[i][m])
        surr = torch.minimum(ratio * adv[i], ratio.clamp(0.8, 1.2) * adv[i])
        d = ro.ref_logprobs[i][m] - logp[i][m]
        k3 = torch.exp(d) - d - 1
        per_seq.append((-surr + 0.3 * k3).mean())
    torch.testing.assert_close(loss, torch.stack(per_seq).mean(), atol=1e-5, rtol=1e-5)
    assert "losses/kl" in terms


# --- grouped env and agent wiring --------------------------------------------------------------
def test_env_serves_each_prompt_k_times_in_contiguous_rows():
    tok = char_tokenizer()
    env = target_token_env(num_envs=8, tokenizer=tok, num_generations=4)
    for seed in range(3):
        _, info = env.reset(seed=seed)
        groups = info["prompt_index"].view(2, 4)
        assert torch.all(groups == groups[:, :1])
    with pytest.raises(ValueError, match="must be a multiple of num_generations=3"):
        target_token_env(num_envs=8, tokenizer=tok, num_generations=3)
    with pytest.raises(ValueError, match="whole groups"):
        env.reset(options={"reset_mask": torch.tensor([True, False] * 4)})


@pytest.mark.parametrize("cls, cfg_cls", [(RLOO, RLOOConfig), (GRPO, GRPOConfig)])
def test_bad_group_settings_fail_before_training(cls, cfg_cls):
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        cfg_cls(num_generations=1)
    with pytest.raises(ValueError, match="not a multiple of num_generations=4"):
        cfg_cls(num_generations=4).check_batch(6)
    with pytest.raises(ValueError, match="serves each prompt 1 time"):
        cls.check_env(target_token_env(num_envs=8, tokenizer=tok), cfg_cls(num_generations=4))
    with pytest.raises(TypeError, match="needs a text env"):
        import gymnasium as gym
        cls.check_env(gym.make_vec("CartPole-v1", num_envs=4), cfg_cls())


def test_group_agents_do_not_train_a_critic(tmp_path):
    """Critic-free agents get no value head built (nor a critic), so nothing of one is trained or saved."""
    from textrl.train import make_run

    cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--agent", "rloo", "--value-model", "policy",
                                   "--output-dir", str(tmp_path)])
    run = make_run(cfg, quiet=True)
    policy, learner = run.policy, run.learner
    assert RLOO.has_critic is False and policy.value_head is None and policy.critic is None
    head = {id(p) for n, p in policy.named_parameters() if n.startswith(("value_head", "critic"))}
    assert not head & {id(p) for p in learner.params}
    assert not any(k.startswith("value_head") for k in learner.state_dict()["model"])
    # the policy built for PPO has one
    ppo_cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--output-dir", str(tmp_path / "ppo")])
    assert make_run(ppo_cfg, quiet=True).policy.value_head is not None
    # a policy built with a head by hand (Python API): the critic-free agent freezes it, so nothing trains it
    from textrl.parallel import Learner

    tok = char_tokenizer()
    policy = LMActorCritic(tiny_gpt2(len(tok)))
    learner = Learner.for_agent(RLOO(RLOOConfig(), policy))
    assert not {id(p) for p in policy.value_head.parameters()} & {id(p) for p in learner.params}


def test_cli_rejects_bad_group_combination(tmp_path):
    with pytest.raises(ValueError, match="num_envs=16 is not a multiple of num_generations=3"):
        cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--agent", "grpo", "--num-generations", "3",
                                       "--output-dir", str(tmp_path)])
        train(cfg, quiet=True)


# --- learning -----------------------------------------------------------------------------------
@pytest.mark.learning
@pytest.mark.parametrize("agent", ["rloo", "grpo"])
def test_agent_raises_the_toy_reward(tmp_path, agent):
    cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--agent", agent, "--seed", "1",
                                   "--output-dir", str(tmp_path)])
    result = train(cfg, quiet=True)
    before, after = result.before, result.after
    assert after.mean >= 0.2, (before, after)  # a random policy scores ~0.03
    assert after.mean - before.mean > 3 * max(after.se, before.se)
    m = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(x["policy/first_ratio_dev"] < 1e-4 for x in m)  # on-policy: ratio = 1 on the first minibatch
    assert {"reward/score_mean", "policy/kl_ref", "policy/entropy", "losses/policy", "reward/group_std"} <= set(m[-1])
    assert "losses/value" not in m[-1]
    # RLOO keeps the KL in the env's reward (the run's kl_coef); GRPO moves it into its loss (env β = 0)
    assert all(x["reward/kl_coef"] == (0.0 if agent == "grpo" else cfg.kl.coef) for x in m)
    assert ("losses/kl" in m[-1]) == (agent == "grpo")


def test_swapping_agent_is_the_only_cli_change(tmp_path, capfd):
    """The same command line with only --agent changed runs each agent end to end (the CLI's entry point in
    this process; tests/test_text_ppo.py runs it as a subprocess)."""
    from textrl.cli import main

    base = ["train", "--env", "textrl/TargetToken-v0", "--total-steps", "512", "--seed", "3"]
    for agent in ("ppo", "rloo", "grpo"):
        out = tmp_path / agent
        capfd.readouterr()
        assert main([*base, "--agent", agent, "--output-dir", str(out)]) == 0
        assert "held-out reward:" in capfd.readouterr().err
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [x["global_step"] for x in lines] == [256, 512]
        assert f"agent: {agent}" in (out / "config.yaml").read_text()


def test_group_agent_resume_reproduces_an_uninterrupted_run(tmp_path):
    def run(out, steps, *extra):
        cfg, resume = resolve_train_config([*extra, "--total-steps", str(steps)] if extra else
                                           ["--env", "textrl/TargetToken-v0", "--agent", "grpo", "--seed", "2",
                                            "--checkpoint-every", "2", "--total-steps", str(steps),
                                            "--output-dir", str(out)])
        train(cfg, resume=resume, quiet=True)

    run(tmp_path / "straight", 1024)
    run(tmp_path / "split", 512)
    run(tmp_path / "split", 1024, "--resume", str(tmp_path / "split"))
    read = lambda d: reproducible([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()])  # noqa: E731
    a, b = read(tmp_path / "straight"), read(tmp_path / "split")
    assert [m["global_step"] for m in b] == [256, 512, 768, 1024]
    assert a == b
