"""Multi-turn text envs at token level: the env's appended tokens extend the KV caches (equal to one parallel
forward), only agent tokens are actions (zero gradient at env tokens, no effect on other rows), per-turn
rewards and GAE through env tokens, every agent trains on them, and bad input fails clearly."""

import math
import string

import pytest
import torch
from helpers import rollout
from textrl.agents.grpo import GRPO, GRPOConfig
from textrl.agents.ppo import PPO, PPOConfig
from textrl.agents.reinforce_pp import ReinforcePP, ReinforcePPConfig
from textrl.agents.rloo import RLOO, RLOOConfig
from textrl.envs import KLPenalty
from textrl.envs.toy import CHAT_TEMPLATE, char_tokenizer, tiny_gpt2
from textrl.envs.turns import MultiTurnEnv, Reply, stop_ids_of
from transformers import LlamaConfig, LlamaForCausalLM

from textrl.advantages import gae, next_action_values, next_values_from
from textrl.lm.decoding import sequence_logprobs
from textrl.lm.generate import HFGenerator
from textrl.lm.policy import LMActorCritic
from textrl.parallel import Reducer


def chat_tokenizer():
    tok = char_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE  # the toy tokenizer has a chat template
    return tok


def no_template_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = None
    return tok


def tiny_llama(vocab: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
    return LlamaForCausalLM(cfg).eval()


class Echo(MultiTurnEnv):
    """Answers each turn with a message whose length depends on the reply (ragged appends), pays a per-turn
    reward and a final one."""

    metrics = ("echoes",)
    default_max_turns = 4

    def respond(self, state, reply):
        state["n"] = state.get("n", 0) + 1
        if state["n"] == 4:
            return Reply(reward=1.0 + len(reply) / 10, done=True, metrics={"echoes": 1})
        return Reply("ab" * (1 + (len(reply) + state["n"]) % 4), reward=0.1 * state["n"], metrics={"echoes": 1})


PROMPTS = ["hello", "good day", "hi", "what now"]


def echo_env(num_envs=4, **kw):
    kw.setdefault("max_new_tokens", 60)
    kw.setdefault("max_turn_tokens", 6)
    return Echo(num_envs, chat_tokenizer(), PROMPTS, **kw)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_extended_caches_equal_one_parallel_forward_across_turns(build):
    """Sampled log-probs (policy cache) and per-token reference log-probs (reference cache), both extended by
    the env's ragged appends, equal one parallel forward over the whole episodes; so do the batches of the two
    reference passes."""
    tok = chat_tokenizer()
    policy, ref = build(len(tok)), build(len(tok))
    torch.nn.init.normal_(ref.get_output_embeddings().weight, std=0.5)  # a reference unlike the policy
    batches = {}
    for how in ("per_token", "sequence"):
        env = KLPenalty(echo_env(), ref, kl_coef=0.1, reference_pass=how)
        batches[how] = ro = rollout(env, policy, rng=torch.Generator().manual_seed(3), seed=0)
    m = ro.action_mask
    appended = (ro.attention_mask[:, ro.response_start:].bool() & ~m).sum(1)
    assert int(ro.episode_stats["turns"].min()) >= 3 and appended.min() > 0  # 3+ turns, env tokens in every row
    turn_ends = (m & ~torch.roll(m, -1, 1))
    assert len({int(n) for n in appended}) > 1 or turn_ends.sum(1).unique().numel() > 1  # ragged across rows
    full = sequence_logprobs(policy, ro.input_ids, ro.attention_mask, ro.response_start)
    torch.testing.assert_close(ro.logprobs, torch.where(m, full, 0.0), atol=1e-5, rtol=0)
    ref_full = sequence_logprobs(ref, ro.input_ids, ro.attention_mask, ro.response_start)
    torch.testing.assert_close(batches["per_token"].ref_logprobs, torch.where(m, ref_full, 0.0), atol=1e-5, rtol=0)
    for field in ("input_ids", "action_mask", "ref_logprobs", "kl", "rewards", "scores"):
        torch.testing.assert_close(getattr(batches["per_token"], field), getattr(batches["sequence"], field),
                                   atol=1e-5, rtol=0)


def test_turns_rewards_and_masks():
    """Per-turn rewards at each turn's last agent token, the score = their sum, env tokens attended but not
    actions, terminated at the done turn, episode counts reported."""
    env = echo_env(max_new_tokens=200)
    ro = rollout(env, tiny_gpt2(len(env.tokenizer)), seed=1)
    m, att = ro.action_mask, ro.attention_mask[:, ro.response_start:].bool()
    assert bool((m <= att).all()) and bool((att & ~m).any())
    torch.testing.assert_close(ro.rewards.sum(1), ro.scores)
    assert torch.equal(ro.episode_stats["turns"], torch.full((4,), 4.0))  # done at the 4th turn
    assert torch.equal(ro.episode_stats["echoes"], torch.full((4,), 4.0))
    assert bool(ro.terminated.any(1).all()) and not bool(ro.truncated.any())
    for b in range(4):
        paid = ro.rewards[b].nonzero().squeeze(1)
        assert len(paid) == 4 and bool(m[b, paid].all())  # one reward per turn, at an agent token
        torch.testing.assert_close(ro.rewards[b, paid[:3]], torch.tensor([0.1, 0.2, 0.3]))
        ends = m[b] & ~torch.cat([m[b, 1:], torch.tensor([False])])  # each turn's last agent token
        assert torch.equal(ends.nonzero().squeeze(1), paid)
        text = env.tokenizer.decode(ro.input_ids[b][ro.attention_mask[b].bool()].tolist())
        assert text.count("<eos>u ") == 3 and text.startswith(("u ", "<pad>"))


def test_limits_end_episodes_truncated_and_cut_turns_are_answered():
    env = echo_env(max_new_tokens=60, max_turns=2)
    ro = rollout(env, tiny_gpt2(len(env.tokenizer)), seed=2)
    assert torch.equal(ro.episode_stats["turns"], torch.full((4,), 2.0))
    assert bool(ro.truncated.any(1).all())  # the 2nd turn is the last: truncated, its reward paid
    torch.testing.assert_close(ro.scores, torch.full((4,), 0.3))
    env = echo_env(max_new_tokens=24, max_turn_tokens=6)  # the budget runs out in the 2nd or 3rd turn
    ro = rollout(env, tiny_gpt2(len(env.tokenizer)), seed=2)
    assert bool(ro.truncated.any(1).all()) and int(ro.attention_mask[:, ro.response_start:].sum(1).max()) <= 24


def test_next_action_values_skip_env_tokens():
    values = torch.arange(1.0, 9.0).view(1, 8)
    last = torch.tensor([100.0])
    m = torch.tensor([[True, True, False, False, True, True, False, False]])
    got = next_action_values(values, last, m)
    # after column 1 (a turn's last token) comes column 4, the first token of the next turn
    assert got[0, 0] == 2 and got[0, 1] == 5 and got[0, 4] == 6 and got[0, 5] == 100
    contiguous = torch.tensor([[True] * 5 + [False] * 3])
    nv = next_action_values(values, last, contiguous)
    assert torch.equal(nv[:, :4], next_values_from(values, last)[:, :4])
    # γ = λ = 1 through env tokens: every agent token's return is the episode's summed reward
    rewards = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0]])
    term = torch.zeros_like(m)
    term[0, 5] = True
    zeros = torch.zeros_like(values)
    _, returns = gae(rewards, zeros, next_action_values(zeros, last * 0, m), term, torch.zeros_like(m), m, 1.0, 1.0)
    torch.testing.assert_close(returns, torch.tensor([[2.5, 2.5, 0, 0, 2.0, 2.0, 0, 0]]))


def _agents(policy_lm):
    return [
        PPO(PPOConfig(), policy=LMActorCritic(policy_lm)),
        RLOO(RLOOConfig(num_generations=2), policy=LMActorCritic(policy_lm, value_head=False)),
        GRPO(GRPOConfig(num_generations=2, loss_type="token"), policy=LMActorCritic(policy_lm, value_head=False),
             kl_coef=0.1),
        ReinforcePP(ReinforcePPConfig(), policy=LMActorCritic(policy_lm, value_head=False)),
    ]


def _logits_grad(agent, mb):
    """The loss's gradient with respect to the policy's logits ``[B, L, V]``."""
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["logits"] = output
    handle = agent.policy.lm.get_output_embeddings().register_forward_hook(keep)
    try:
        loss, _, _ = agent.loss(agent.policy, mb, 0.2)
        loss.backward()
    finally:
        handle.remove()
    agent.policy.zero_grad()
    return loss.detach(), captured["logits"].grad


@pytest.mark.parametrize("which", ["ppo", "rloo", "grpo", "reinforce++"])
def test_env_tokens_get_no_gradient_and_do_not_touch_other_rows(which):
    tok = chat_tokenizer()
    lm = tiny_gpt2(len(tok))
    agent = dict(zip(["ppo", "rloo", "grpo", "reinforce++"], _agents(lm), strict=True))[which]
    env = KLPenalty(echo_env(num_generations=2), tiny_gpt2(len(tok), seed=1), kl_coef=0.05,
                    reference_pass="sequence")
    ro = rollout(env, lm, seed=0)
    mb, _ = agent.prepare(ro, Reducer())
    loss, grad = _logits_grad(agent, mb)
    assert math.isfinite(float(loss)) and grad.abs().sum() > 0
    P = ro.response_start
    # the forward keeps the logits of the last T + 1 positions: index t predicts response column t
    env_cols = ro.attention_mask[:, P:].bool() & ~ro.action_mask  # (B, T)
    assert grad.shape[1] == env_cols.shape[1] + 1
    predicting = torch.cat([env_cols, torch.zeros_like(env_cols[:, :1])], 1)
    assert predicting.any() and torch.equal(grad[predicting], torch.zeros_like(grad[predicting]))
    # row 0's env tokens rewritten with other content: no other row's gradient (or loss term) changes
    other = dict(mb)
    ids = mb["input_ids"].clone()
    cols = torch.zeros_like(ids, dtype=torch.bool)
    cols[:, P:] = env_cols
    cols[1:] = False
    ids[cols] = torch.randint(3, len(tok), (int(cols.sum()),), generator=torch.Generator().manual_seed(0))
    other["input_ids"] = ids
    _, grad2 = _logits_grad(agent, other)
    assert not torch.equal(grad[0], grad2[0])
    torch.testing.assert_close(grad[1:], grad2[1:], atol=1e-7, rtol=0)


def test_every_agent_takes_finite_updates_on_a_multi_turn_env():
    tok = chat_tokenizer()
    for agent in _agents(tiny_gpt2(len(tok))):
        k = agent.num_generations
        env = KLPenalty(echo_env(num_generations=k), tiny_gpt2(len(tok), seed=1),
                        kl_coef=0.0 if agent.kl_in == "loss" else 0.05, reference_pass="sequence")
        params = [p for p in agent.policy.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=1e-2)
        mb, stats = agent.prepare(rollout(env, agent.policy.lm, seed=0), Reducer())
        loss, _, _ = agent.loss(agent.policy, mb, 0.2)
        loss.backward()
        opt.step()
        assert math.isfinite(float(loss.detach())), type(agent).__name__
        assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True)), type(agent).__name__


# --- bad input -----------------------------------------------------------------------------------
class Bad(MultiTurnEnv):
    answer = Reply("x")

    def respond(self, state, reply):
        return self.answer


@pytest.mark.parametrize("answer, error, match", [
    (3.0, TypeError, r"env Bad: respond\(\) for row 0 returned float; return textrl.envs.Reply"),
    (Reply(message=12), TypeError, "Reply.message must be a string or None, got int"),
    (Reply("x", reward=float("nan")), ValueError, "Reply.reward must be a finite number, got nan"),
    (Reply("x", reward="1"), ValueError, "Reply.reward must be a finite number"),
    (Reply("x", role="system"), ValueError, "Reply.role must be 'user' or 'tool'"),
    (Reply("x", metrics={"calls": 1}), ValueError, r"Reply.metrics has \['calls'\]"),
    (Reply("x" * 80), ValueError, "a user message of .* tokens cannot fit an episode of max_new_tokens=60; raise"),
])
def test_bad_replies_fail_at_the_first_turn_end(answer, error, match):
    env = Bad(2, chat_tokenizer(), PROMPTS, max_new_tokens=60, max_turn_tokens=3)
    env.answer = answer
    with pytest.raises(error, match=match):
        rollout(env, tiny_gpt2(len(env.tokenizer)), seed=0)


def test_bad_env_settings_fail_at_construction():
    with pytest.raises(ValueError, match="env Bad: the tokenizer has no chat template"):
        Bad(2, no_template_tokenizer(), PROMPTS)
    with pytest.raises(ValueError, match="env Bad: prompts is required"):
        Bad(2, chat_tokenizer())
    with pytest.raises(ValueError, match="env Bad: stop_token_ids is empty"):
        Bad(2, chat_tokenizer(), PROMPTS, stop_token_ids=[])
    with pytest.raises(ValueError, match="env Bad: max_turns must be a positive integer, got 0"):
        Bad(2, chat_tokenizer(), PROMPTS, max_turns=0)
    class NoState(Bad):
        def start(self, row):
            return row["prompt"]
    with pytest.raises(TypeError, match=r"env NoState: start\(\) for prompt row 0 returned str; return a dict"):
        NoState(2, chat_tokenizer(), PROMPTS)
    with pytest.raises(NotImplementedError, match="must define respond"):
        rollout(MultiTurnEnv(2, chat_tokenizer(), PROMPTS, max_turn_tokens=2), tiny_gpt2(34), seed=0)


def test_stop_ids_are_a_set():
    tok = chat_tokenizer()
    assert stop_ids_of(tok) == (tok.eos_token_id,)
    assert stop_ids_of(tok, [5, tok.eos_token_id]) == (tok.eos_token_id, 5)
    env = Echo(2, tok, PROMPTS, stop_token_ids=[tok.eos_token_id, tok.convert_tokens_to_ids("z")],
               max_new_tokens=60)
    assert env.stop_token_ids == (1, tok.convert_tokens_to_ids("z"))
    gen = HFGenerator(tiny_gpt2(len(tok)), stop_ids=env.stop_token_ids)
    ro = collect = rollout(env, gen.forward.model, seed=0)
    z = tok.convert_tokens_to_ids("z")
    ends = ro.action_mask & ~torch.cat([ro.action_mask[:, 1:], torch.zeros(2, 1, dtype=torch.bool)], 1)
    assert collect is ro and bool(((ro.tokens == z) & ro.action_mask <= ends).all())  # a "z" always ends a turn


# --- learning and the README's examples ------------------------------------------------------------
class ThreeTurnsOfE(MultiTurnEnv):
    """Three turns of at most 5 tokens with a user message between them; each turn earns a third of its share
    of "e" (the toy task, spread over turns: the rewards sit at three places in each row)."""

    default_max_turns = 3

    def respond(self, state, reply):
        state["turn"] = state.get("turn", 0) + 1
        reward = reply.count("e") / max(len(reply), 1) / 3
        return Reply("go on", reward=reward) if state["turn"] < 3 else Reply(reward=reward, done=True)


@pytest.mark.learning
def test_ppo_learns_across_turns(tmp_path):
    import gymnasium as gym

    from textrl.config import TrainConfig
    from textrl.train import train

    if "test/ThreeTurnsOfE-v0" not in gym.registry:
        gym.register("test/ThreeTurnsOfE-v0", vector_entry_point=ThreeTurnsOfE,
                     kwargs={"prompts": PROMPTS, "model": "textrl/tiny-char-gpt2", "max_turn_tokens": 5,
                             "max_new_tokens": 40})
    cfg = TrainConfig(env="test/ThreeTurnsOfE-v0", num_envs=16, total_steps=16 * 40 * 16, seed=0,
                      output_dir=str(tmp_path / "run"), agent_config={"learning_rate": 3e-3, "anneal_lr": False,
                                                                      "num_minibatches": 2},
                      kl={"coef": 0.001}, model={"bf16": False})
    result = train(cfg, quiet=True)
    scores = [h["reward/score_mean"] for h in result.history]
    assert result.history[0]["env/turns"] == 3.0
    assert sum(scores[:2]) / 2 < 0.1 and sum(scores[-3:]) / 3 > 0.3, scores


def test_readme_multi_turn_example_trains_and_logs_its_counts(tmp_path, monkeypatch):
    from helpers import run_readme_snippet

    result = run_readme_snippet("python-multi-turn", tmp_path, monkeypatch)["result"]
    assert result.updates == 8
    assert all(0 <= h["env/found"] <= 1 and 1 <= h["env/turns"] for h in result.history)
    assert any(h["env/turns"] > 1 for h in result.history)  # the env's replies made episodes go on


def test_readme_tool_use_example_runs_its_tool(tmp_path, monkeypatch):
    from helpers import run_readme_snippet

    ns = run_readme_snippet("python-tool-use", tmp_path, monkeypatch)
    tok = char_tokenizer(string.ascii_lowercase + " .,!?()")
    env = ns["WeatherDesk"](2, tok, [{"prompt": "is it raining in paris", "answer": "rain"}],
                            max_new_tokens=60)
    env.reset(seed=0)
    turns = [tok("weather(paris)", add_special_tokens=False)["input_ids"] + [1],
             tok("yes, rain", add_special_tokens=False)["input_ids"] + [1]]
    script, rewards, info = [t for turn in turns for t in turn], [], {}
    while script:
        token = 1 if bool(env.replying[0]) else script.pop(0)  # (the env writes its reply: actions ignored)
        _, reward, term, _, info = env.step(torch.tensor([token, 1]))
        rewards.append(float(reward[0]))
    text = tok.decode(env.input_ids[0][env.attention_mask[0].bool()].tolist())
    assert "<eos>t rain<eos>a " in text and sum(rewards) == 1.0 and bool(term[0])
    assert float(info["tool_calls"][0]) == 1
