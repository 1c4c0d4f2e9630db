"""Continuous batching (issue 16): ``collect_episodes`` runs N episodes through an env of B < N rows, a slot
restarting on the next prompt as soon as its episode ends. Every episode must be what the policy would give
its prompt alone: its sampled log-probs are the log-probs of one parallel forward over its final sequence,
its score is its completion's, its prompt is the one it names — for single-turn rows, groups of k, the
per-token KL reference and a multi-turn env."""

import copy

import pytest
import torch
from test_multi_turn import echo_env
from test_text_env import PROMPTS, length_scorer
from textrl.envs import KLPenalty, TextGenVectorEnv
from textrl.envs.toy import char_tokenizer, tiny_gpt2

from textrl.lm.collect import collect_episodes, collect_tokens
from textrl.lm.decoding import sequence_logprobs
from textrl.lm.generate import HFGenerator


def policy_for(tok, seed=0):
    model = tiny_gpt2(len(tok), seed=seed)
    with torch.no_grad():  # EOS likely enough that episodes end at very different steps
        model.lm_head.weight[tok.eos_token_id] *= 4
    return model


def assert_each_episode_is_its_own(ro, model, ref=None, temperature=1.0):
    P = ro.response_start
    full = sequence_logprobs(model, ro.input_ids, ro.attention_mask, P, temperature)
    torch.testing.assert_close(ro.logprobs[ro.action_mask], full[ro.action_mask], atol=1e-5, rtol=0)
    if ref is not None:
        full_ref = sequence_logprobs(ref, ro.input_ids, ro.attention_mask, P, temperature)
        torch.testing.assert_close(ro.ref_logprobs[ro.action_mask], full_ref[ro.action_mask], atol=1e-5, rtol=0)
    ends = (ro.terminated | ro.truncated).sum(1)
    assert ends.tolist() == [1] * ro.input_ids.shape[0]  # every row is one finished episode


def test_episodes_through_fewer_slots_are_each_what_the_policy_gives_its_prompt():
    tok = char_tokenizer()
    model = policy_for(tok)
    env = TextGenVectorEnv(3, tok, PROMPTS, length_scorer, max_new_tokens=20)
    gen = HFGenerator(model, temperature=0.9, rng=torch.Generator().manual_seed(0), min_new_tokens=2,
                      stop_ids=(tok.eos_token_id,))
    calls = []
    model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape), with_kwargs=True)
    ro = collect_episodes(env, gen, episodes=9, seed=1)
    assert ro.input_ids.shape[0] == 9 and ro.prompt_index.shape == (9,)
    assert_each_episode_is_its_own(ro, model, temperature=0.9)
    lengths = ro.action_mask.sum(1)
    assert len(set(lengths.tolist())) > 2 and lengths.min() >= 2  # varied; min_new_tokens held per episode
    P = ro.response_start
    for r in range(9):  # the prompt a row names is the prompt in its columns; its score is its completion's
        prompt = tok.decode(ro.input_ids[r, :P][ro.attention_mask[r, :P].bool()])
        assert prompt == PROMPTS[int(ro.prompt_index[r])]
        completion = tok.decode(ro.input_ids[r, P:][ro.action_mask[r]], skip_special_tokens=True)
        assert float(ro.scores[r]) == float(len(completion))
    # 9 episodes in fewer steps than three batches of 3 that each wait for their longest row
    decode_steps = sum(1 for shape in calls if shape[1] == 1)
    batches = lengths.view(3, 3).max(1).values.sum()  # (not the same draws, but the same order of magnitude)
    assert decode_steps < int(lengths.sum())
    assert decode_steps <= int(batches) + 20


def test_groups_restart_together_and_the_per_token_reference_follows():
    tok = char_tokenizer()
    model, ref = policy_for(tok), tiny_gpt2(len(tok), seed=1)
    env = KLPenalty(TextGenVectorEnv(4, tok, PROMPTS, length_scorer, max_new_tokens=16, num_generations=2),
                    copy.deepcopy(ref), kl_coef=0.1, reference_pass="per_token")
    gen = HFGenerator(model, rng=torch.Generator().manual_seed(3))
    ro = collect_episodes(env, gen, episodes=8, seed=2)
    assert_each_episode_is_its_own(ro, model, ref)
    groups = ro.prompt_index.view(4, 2)  # episodes in the order they started: groups of 2 stay together
    assert torch.equal(groups[:, 0], groups[:, 1])


def test_a_multi_turn_env_restarts_its_slots_with_new_conversations():
    env = echo_env(2, max_new_tokens=40, max_turn_tokens=4)
    model = tiny_gpt2(len(env.unwrapped.tokenizer), seed=0)
    ro = collect_episodes(env, HFGenerator(model, rng=torch.Generator().manual_seed(0)), episodes=5, seed=0)
    assert_each_episode_is_its_own(ro, model)
    env_tokens = ro.attention_mask[:, ro.response_start:].bool() & ~ro.action_mask
    assert env_tokens.any(1).all()  # every episode has the env's replies between the agent's turns


def test_as_many_episodes_as_rows_is_the_plain_loop_and_bad_requests_are_refused():
    tok = char_tokenizer()
    model = policy_for(tok)
    make = lambda: TextGenVectorEnv(4, tok, PROMPTS, length_scorer, max_new_tokens=12, num_generations=2)  # noqa: E731
    a = collect_episodes(make(), HFGenerator(model, rng=torch.Generator().manual_seed(5)), episodes=4, seed=0)
    b = collect_tokens(make(), HFGenerator(model, rng=torch.Generator().manual_seed(5)), seed=0)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logprobs, b.logprobs)
    with pytest.raises(ValueError, match="episodes must be >= the env's 4 rows and a multiple of num_generations=2"):
        collect_episodes(make(), HFGenerator(model), episodes=7)
    with pytest.raises(TypeError, match="sampling.decoder: dynamic"):
        collect_episodes(make(), HFGenerator(model, decoder="static"), episodes=8)
