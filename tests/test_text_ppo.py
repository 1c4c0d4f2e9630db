"""PPO on language models end to end, on the toy text task with a tiny local model."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import reproducible
from helpers import rollout as text_rollout
from safetensors.torch import load_file
from textrl.agents.ppo import PPO, PPOConfig
from textrl.envs import KLPenalty
from textrl.envs.toy import char_tokenizer, target_token_env, tiny_gpt2

import textrl  # noqa: F401
from textrl.cli import resolve_train_config
from textrl.lm.build import build_policy
from textrl.lm.policy import LMActorCritic, add_lora
from textrl.loop import loop
from textrl.parallel import Learner, Reducer
from textrl.rollout import TokenRollout
from textrl.train import make_run, train


def ppo(config, policy):
    """A PPO agent on ``policy`` and the learner that updates it (single process, plain torch)."""
    agent = PPO(config, policy)
    return agent, Learner.for_agent(agent)


def toy_cfg(tmp_path, *flags):
    cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--output-dir", str(tmp_path), *flags])
    return cfg


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.learning
def test_ppo_raises_the_toy_reward(tmp_path):
    result = train(toy_cfg(tmp_path, "--seed", "1"), quiet=True)
    before, after = result.before, result.after
    assert after.mean >= 0.2, (before, after)  # a random policy scores ~0.03
    assert after.mean - before.mean > 3 * max(after.se, before.se)
    m = metrics(tmp_path)
    assert all(x["policy/first_ratio_dev"] < 1e-5 for x in m)  # ratio = 1 on the first minibatch
    assert all(x["policy/rollout_logprob_diff"] < 1e-4 for x in m)  # sampled == recomputed log-probs
    required = {"reward/score_mean", "policy/kl_ref", "policy/entropy", "policy/approx_kl", "policy/clipfrac",
                "losses/policy", "losses/value", "value/explained_variance", "time/tokens_per_s",
                "time/collect_s", "time/update_s"}
    assert required <= set(m[-1])
    for name in ("curves.png", "samples.md", "config.yaml"):
        assert (tmp_path / name).is_file()
    assert "**Before:**" in (tmp_path / "samples.md").read_text()


def test_the_first_ratio_stays_1_with_bf16_autocast(tmp_path):
    """bf16 autocast in the update (``model.bf16``): the sampled log-probs (fp32) and the update's (bf16) differ,
    and the first minibatch's ratio is still exactly 1 — the old log-probs are the update's own forward."""
    train(toy_cfg(tmp_path, "--bf16", "true", "--total-steps", "512"), quiet=True)
    m = metrics(tmp_path)
    assert len(m) == 2 and all(x["policy/rollout_logprob_diff"] > 1e-4 for x in m)  # bf16 changed the numbers
    assert all(x["policy/first_ratio_dev"] < 1e-6 for x in m), [x["policy/first_ratio_dev"] for x in m]


def test_frozen_reference_is_bitwise_unchanged_and_policy_moves(tmp_path):
    run = make_run(toy_cfg(tmp_path, "--total-steps", "512"), quiet=True)
    seen = {"ref": run.reference, "ref0": copy.deepcopy(run.reference.state_dict()),
            "policy0": copy.deepcopy(run.policy.lm.state_dict()), "policy": run.policy}
    loop(run)
    for k, v in seen["ref"].state_dict().items():
        assert torch.equal(v, seen["ref0"][k]), k
    assert not seen["ref"].training and not any(p.requires_grad for p in seen["ref"].parameters())
    moved = [k for k, v in seen["policy"].lm.state_dict().items() if not torch.equal(v, seen["policy0"][k])]
    assert moved


def test_lora_reference_is_the_policy_with_adapters_off(tmp_path):
    tok = char_tokenizer()
    base = tiny_gpt2(len(tok))
    for p in base.parameters():
        p.requires_grad_(False)
    frozen0 = {k: v.clone() for k, v in base.state_dict().items()}
    policy = LMActorCritic(add_lora(base, r=4, alpha=8))
    ref = policy.reference()
    assert ref is not None and policy.is_lora
    env = KLPenalty(target_token_env(8, tok), ref, kl_coef=0.01)
    ro = text_rollout(env, policy.lm, seed=0)
    assert torch.all(ro.kl == 0)  # LoRA B starts at 0: adapters off == on
    agent, learner = ppo(PPOConfig(learning_rate=1e-2, num_minibatches=2), policy)
    learner.update(agent, ro, 1.0)
    ro2 = text_rollout(env, policy.lm, seed=0)
    assert ro2.kl[ro2.action_mask].abs().sum() > 0  # the adapters moved the policy away from the reference
    for k, v in policy.lm.get_base_model().state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen0[k.replace("base_layer.", "")]), k
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    policy.lm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def _pad_rollout(ro: TokenRollout, left: int, right: int, pad: int) -> TokenRollout:
    """The same batch with extra all-padding prompt columns on the left and response columns on the right."""
    B = ro.tokens.shape[0]

    def cat(x, n_left=0, n_right=0, fill=0):
        parts = [torch.full((B, n_left), fill, dtype=x.dtype)] if n_left else []
        parts += [x] + ([torch.full((B, n_right), fill, dtype=x.dtype)] if n_right else [])
        return torch.cat(parts, 1)

    return TokenRollout(cat(ro.input_ids, left, right, pad), cat(ro.attention_mask, left, right),
                        ro.response_start + left, cat(ro.action_mask, 0, right, False), cat(ro.logprobs, 0, right),
                        cat(ro.ref_logprobs, 0, right), cat(ro.rewards, 0, right), ro.scores, cat(ro.kl, 0, right),
                        cat(ro.terminated, 0, right, False), cat(ro.truncated, 0, right, False), ro.prompt_index)


def test_update_is_invariant_to_padding():
    tok = char_tokenizer()
    env = KLPenalty(target_token_env(8, tok), tiny_gpt2(len(tok), seed=1), kl_coef=0.01)
    policy = LMActorCritic(tiny_gpt2(len(tok)))
    ro = text_rollout(env, policy.lm, seed=0)
    results = []
    for padded in (ro, _pad_rollout(ro, left=3, right=5, pad=tok.pad_token_id)):
        p = copy.deepcopy(policy)
        agent, learner = ppo(PPOConfig(num_minibatches=1, num_epochs=2), p)
        torch.manual_seed(0)
        stats = learner.update(agent, padded, 1.0)
        results.append((stats, {k: v.detach().clone() for k, v in p.named_parameters()}))
    (s1, w1), (s2, w2) = results
    for key in ("losses/policy", "losses/value", "policy/entropy", "value/explained_variance"):
        assert s1[key] == pytest.approx(s2[key], rel=1e-4, abs=1e-6), key
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    train(toy_cfg(straight, "--total-steps", "1024", "--checkpoint-every", "2"), quiet=True)
    split = tmp_path / "split"
    train(toy_cfg(split, "--total-steps", "512", "--checkpoint-every", "2"), quiet=True)  # 2 updates, stop
    cfg, resume = resolve_train_config(["--resume", str(split), "--total-steps", "1024"])
    # the first run's LR/clip schedules were for 512 steps; both runs here use constant schedules (preset)
    train(cfg, resume=resume, quiet=True)
    a, b = metrics(straight), metrics(split)
    assert [m["global_step"] for m in b] == [256, 512, 768, 1024]
    assert reproducible(a) == reproducible(b)
    ckpt = split / "checkpoint"
    assert (ckpt / "policy" / "model.safetensors").is_file() and (ckpt / "value_head.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(ckpt / "policy")  # plain transformers reads it
    trained = load_file(str(ckpt / "model.safetensors"))
    torch.testing.assert_close(reloaded.transformer.h[0].attn.c_attn.weight,
                               trained["lm.transformer.h.0.attn.c_attn.weight"])


def test_text_cli_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "textrl", "train", "--env", "textrl/TargetToken-v0", "--agent", "ppo",
         "--total-steps", "512", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "held-out reward:" in proc.stderr and "->" in proc.stderr
    m = metrics(tmp_path)
    assert [x["global_step"] for x in m] == [256, 512] and "reward/score_mean" in m[-1]


def test_backward_and_clipping_go_through_accelerate(tmp_path, monkeypatch):
    from accelerate import Accelerator

    calls = {"backward": 0, "clip": 0}
    real_backward, real_clip = Accelerator.backward, Accelerator.clip_grad_norm_

    def backward(self, loss, **kw):
        calls["backward"] += 1
        return real_backward(self, loss, **kw)

    def clip(self, params, max_norm, **kw):
        calls["clip"] += 1
        return real_clip(self, params, max_norm, **kw)

    monkeypatch.setattr(Accelerator, "backward", backward)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)
    train(toy_cfg(tmp_path, "--total-steps", "256"), quiet=True)  # 1 update x 4 epochs x 2 minibatches
    assert calls == {"backward": 8, "clip": 8}


def test_separate_value_model_from_the_policy_or_a_path(tmp_path):
    """value_model: "policy" = a trainable copy of the policy's trunk; a path = a critic loaded from there;
    the policy's own weights are not the critic's, and the checkpoint holds the critic in HF layout."""
    cfg = toy_cfg(tmp_path / "run", "--value-model", "policy", "--total-steps", "512", "--lora-r", "4")
    tokenizer, policy, _ = build_policy(cfg, torch.device("cpu"))
    assert policy.critic is not None
    assert not {id(p) for p in policy.critic.parameters()} & {id(p) for p in policy.lm.parameters()}
    critic0 = {k: v.clone() for k, v in policy.critic.state_dict().items()}
    result = train(cfg, quiet=True)
    assert result.updates == 2
    saved = load_file(str(tmp_path / "run" / "checkpoint" / "critic" / "model.safetensors"))
    assert any(not torch.equal(saved[k], critic0[k]) for k in saved if k in critic0)  # the critic trained
    m = metrics(tmp_path / "run")
    assert all(x["policy/first_ratio_dev"] < 1e-5 for x in m) and "value/explained_variance" in m[-1]

    # a critic initialised from a saved model (e.g. a reward model) by path
    tiny_gpt2(len(tokenizer), seed=7).save_pretrained(tmp_path / "rm")
    cfg2 = toy_cfg(tmp_path / "run2", "--value-model", str(tmp_path / "rm"), "--total-steps", "256")
    _, policy2, _ = build_policy(cfg2, torch.device("cpu"))
    ref = tiny_gpt2(len(tokenizer), seed=7)
    torch.testing.assert_close(policy2.critic.transformer.wte.weight, ref.transformer.wte.weight)
    # a critic with a smaller vocabulary cannot read the policy's token ids
    tiny_gpt2(8).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="vocabulary of 8 tokens"):
        build_policy(toy_cfg(tmp_path / "run3", "--value-model", str(tmp_path / "small")), torch.device("cpu"))


def test_text_episodes_never_bootstrap_past_the_paid_score():
    """The score is paid at a completion's last token whether it hit EOS or max_new_tokens, so the return of
    the last token is its reward — never reward + V(s_T) (that would add a guess of a score already paid)."""
    tok = char_tokenizer()
    env = KLPenalty(target_token_env(8, tok), tiny_gpt2(len(tok), seed=1), kl_coef=0.0)
    policy = LMActorCritic(tiny_gpt2(len(tok)))
    torch.nn.init.constant_(policy.value_head.bias, 5.0)  # V ≡ 5 everywhere: a bootstrap would show
    ro = text_rollout(env, policy.lm, seed=0)
    assert ro.truncated.any()  # most toy completions run to max_new_tokens
    agent = PPO(PPOConfig(num_minibatches=1, gae_lambda=1.0), policy)
    data, _ = agent.prepare(ro, Reducer())
    last = ro.action_mask.long().cumsum(1).argmax(1)  # index of each row's last real token
    rows = torch.arange(8)
    torch.testing.assert_close(data["returns"][rows, last], ro.rewards[rows, last])
    # λ = 1, γ = 1: every return is the sum of the rewards still to come (the score), at every token
    future = ro.rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(data["returns"][ro.action_mask], future[ro.action_mask], atol=1e-5, rtol=1e-5)


def test_evaluation_averages_several_answers_per_prompt(tmp_path):
    """eval_generations = k: each held-out prompt's score is the mean of k answers; the SE is over prompts."""
    from textrl.envs.toy import TOY_EVAL_PROMPTS

    from textrl.lm.build import build_text_env
    from textrl.lm.evaluate import evaluate_heldout

    def evaluate(cfg, policy, ref, tok, device, prompts, samples):
        env = build_text_env(cfg, tok, device).unwrapped
        return evaluate_heldout(env, policy.lm, ref, prompts, sampling=cfg.sampling, kl=cfg.kl,
                                generations=cfg.eval.generations, samples=samples, seed=cfg.seed)

    cfg = toy_cfg(tmp_path, "--eval-generations", "3")
    tok, policy, ref = build_policy(cfg, torch.device("cpu"))
    res = evaluate(cfg, policy, ref, tok, torch.device("cpu"), list(TOY_EVAL_PROMPTS), 2)
    assert len(res.scores) == len(TOY_EVAL_PROMPTS) and len(res.samples) == 2
    s = torch.tensor(res.scores, dtype=torch.float64)
    assert res.mean == pytest.approx(float(s.mean())) and res.se == pytest.approx(float(s.std() / len(s) ** 0.5))
    assert abs(res.kl) < 1e-5  # the policy is still the reference (sampled vs parallel forward: fp32 noise)
    # the 3 answers of a prompt differ: its mean is not one answer's score repeated
    single = evaluate(toy_cfg(tmp_path), policy, ref, tok, torch.device("cpu"), list(TOY_EVAL_PROMPTS), 2)
    assert len(single.scores) == len(res.scores) and single.scores != res.scores
    with pytest.raises(ValueError, match="eval_generations must be an integer >= 1"):
        toy_cfg(tmp_path, "--eval-generations", "0")


def test_value_head_starts_at_zero_and_reads_scaled_hidden_states():
    """V ≡ 0 at initialisation (first advantages = returns, not noise), and one unit of weight change moves V by
    |h|/√hidden, not |h|: pretrained trunks' hidden states have norm ~√hidden."""
    tok = char_tokenizer()
    policy = LMActorCritic(tiny_gpt2(len(tok)))
    ids = torch.randint(3, len(tok), (2, 7))
    _, values = policy(ids, torch.ones_like(ids))
    assert torch.equal(values, torch.zeros(2, 7))
    with torch.no_grad():
        policy.value_head.weight.fill_(1.0)
        _, v = policy(ids, torch.ones_like(ids))
        h = policy.lm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(v, h.sum(-1) / policy.lm.config.n_embd ** 0.5)
