"""Continuous batching (issue 16): ``collect_episodes`` runs N episodes through an env of B < N rows, a slot
restarting on the next prompt as soon as its episode ends. Every episode must be what the policy would give
its prompt alone: its sampled log-probs are the log-probs of one parallel forward over its final sequence,
its score is its completion's, its prompt is the one it names — for single-turn rows, groups of k, the
per-token KL reference and a multi-turn env."""

import copy

import pytest
import torch
from helpers import DEVICE, reproducible
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
    with pytest.raises(TypeError, match="continuous batching needs a generator with admit"):
        collect_episodes(make(), object(), episodes=8)


@pytest.mark.parametrize("decoder", ["static", "compiled"])
def test_a_static_cache_runs_the_same_episodes_as_the_dynamic_one(decoder):
    """Continuous batching with a fixed-shape cache (what CUDA graphs need): 96 episodes through 4 slots give
    the dynamic cache's tokens and log-probs. The cache keeps its shapes: widened once at the first admit,
    then the columns of ended episodes are dropped in place whenever it is full, several times here. On
    TEXTRL_TEST_DEVICE (the GPU check: CUDA graphs replayed across admits and compactions)."""
    tok = char_tokenizer()
    model = policy_for(tok).to(DEVICE)
    runs = []
    for d in ("dynamic", decoder):
        env = TextGenVectorEnv(4, tok, PROMPTS, length_scorer, max_new_tokens=20, num_generations=2, device=DEVICE)
        gen = HFGenerator(model, temperature=0.9, rng=torch.Generator(DEVICE).manual_seed(0),
                          stop_ids=(tok.eos_token_id,), decoder=d)
        runs.append((collect_episodes(env, gen, episodes=96, seed=1), gen.forward))
    (a, _), (b, fast) = runs
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.action_mask, b.action_mask)
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
    assert_each_episode_is_its_own(b, model, temperature=0.9)
    assert fast.capacity == 128 and fast.compactions >= 2 and getattr(fast, "fallback", None) is None


def test_a_multi_turn_env_through_a_static_cache_is_the_dynamic_one():
    runs = []
    for d in ("dynamic", "static"):
        env = echo_env(2, max_new_tokens=40, max_turn_tokens=4)
        model = tiny_gpt2(len(env.unwrapped.tokenizer), seed=0)
        runs.append(collect_episodes(env, HFGenerator(model, rng=torch.Generator().manual_seed(0), decoder=d),
                                     episodes=12, seed=0))
    a, b = runs
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
    assert_each_episode_is_its_own(b, model)


def test_freed_slots_are_admitted_together_once_an_eighth_is_free():
    tok = char_tokenizer()
    model = policy_for(tok)
    env = KLPenalty(TextGenVectorEnv(16, tok, PROMPTS, length_scorer, max_new_tokens=12), tiny_gpt2(len(tok), seed=1),
                    kl_coef=0.1, reference_pass="per_token")
    gen = HFGenerator(model, rng=torch.Generator().manual_seed(0), stop_ids=(tok.eos_token_id,))
    admitted, ref_admitted = [], []
    for target, log in ((gen, admitted), (env.ref, ref_admitted)):
        real = target.admit
        target.admit = lambda rows, ids, mask, real=real, log=log: (log.append(rows.numel()), real(rows, ids, mask))[1]
    ro = collect_episodes(env, gen, episodes=40, seed=0)
    assert_each_episode_is_its_own(ro, model, env.ref.model)
    assert sum(admitted) == 24 and admitted == ref_admitted  # the reference admits the same rows (no re-prefill)
    # 2 of 16 free before an admit, except the last when fewer episodes are left to start
    assert min(admitted[:-1]) >= 2 and len(admitted) <= 12


def toy_run(path, *flags):
    from textrl.cli import resolve_train_config

    cfg, resume = resolve_train_config(["--env", "textrl/TargetToken-v0", "--output-dir", str(path), *flags]
                                       if "--resume" not in flags else list(flags))
    return cfg, resume


def metrics_of(path):
    import json

    return reproducible([json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()])


@pytest.mark.learning
def test_ppo_learns_through_slots_and_resumes_exactly(tmp_path):
    """``sampling.slots``: PPO's 16-completion batches through 4 env rows learn the toy task; a run stopped
    and resumed equals one that was not; slots = num_envs is the plain loop."""
    from textrl.train import train

    cfg, _ = toy_run(tmp_path / "slots", "--seed", "1", "--slots", "4")
    assert cfg.num_envs == 16
    result = train(cfg, quiet=True)
    assert result.after.mean >= 0.2 and result.after.mean - result.before.mean > 3 * max(result.after.se,
                                                                                       result.before.se)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(toy_run(straight, "--slots", "4", "--total-steps", "768", "--checkpoint-every", "1")[0], quiet=True)
    train(toy_run(split, "--slots", "4", "--total-steps", "512", "--checkpoint-every", "1")[0], quiet=True)
    train(*toy_run(None, "--resume", str(split), "--total-steps", "768"), quiet=True)
    assert metrics_of(straight) == metrics_of(split)
    plain = tmp_path / "plain"
    train(toy_run(plain, "--total-steps", "512")[0], quiet=True)
    train(toy_run(tmp_path / "all", "--slots", "16", "--total-steps", "512")[0], quiet=True)
    assert metrics_of(plain) == metrics_of(tmp_path / "all")
    assert metrics_of(plain) != metrics_of(straight)[:2]


def test_bad_slots_are_refused_before_any_model_loads():
    from textrl.config import SamplingConfig
    from textrl.lm.run import env_rows

    assert SamplingConfig(slots=4, decoder="compiled").slots == 4  # any decoder runs continuous batching
    with pytest.raises(ValueError, match="slots must be an integer >= 0, got -1"):
        SamplingConfig(slots=-1)
    cfg, _ = toy_run("unused", "--slots", "6")
    with pytest.raises(ValueError, match=r"at most num_envs=16 and a multiple of num_generations=4 .* got 6: "
                                         r"e.g. slots: 8"):
        env_rows(cfg, 1, 4)
    with pytest.raises(ValueError, match="runs on one process, and this run has 2"):
        env_rows(cfg, 2, 1)
    assert env_rows(cfg, 1, 2) == 6 and env_rows(toy_run("unused")[0], 2, 1) == 8
    cfg, _ = toy_run("unused", "--slots", "8", "--num-envs", "10", "--env-kwargs", "{num_generations: 4}")
    with pytest.raises(ValueError, match="num_envs=10 must be a multiple of num_generations=4"):
        env_rows(cfg, 1, 4)


def test_a_refused_slots_setting_deletes_nothing_with_overwrite(tmp_path):
    """The batch layout is checked before the run directory is touched: --overwrite of a finished run with a
    bad slots value leaves the run as it was. An agent without groups that asks the env for them
    (env_kwargs.num_generations) is checked too."""
    from textrl.train import train

    train(toy_run(tmp_path, "--total-steps", "256")[0], quiet=True)
    before = (tmp_path / "metrics.jsonl").read_text()
    cfg, _ = toy_run(tmp_path, "--overwrite", "--slots", "6", "--env-kwargs", "{num_generations: 4}")
    with pytest.raises(ValueError, match="a multiple of num_generations=4 .*got 6"):
        train(cfg, quiet=True)
    assert (tmp_path / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("decoder", ["auto", "static"])
def test_a_group_agent_trains_through_slots_with_its_groups_intact(tmp_path, decoder):
    """GRPO (4 completions per prompt) through 8 rows: groups restart together, so every batch reaches the
    agent grouped by prompt (its prepare refuses anything else) with num_envs rows; with `auto` (dynamic on
    the CPU) and the static cache."""
    from textrl.train import make_run

    cfg, _ = toy_run(tmp_path, "--agent", "grpo", "--slots", "8", "--total-steps", "256", "--decoder", decoder)
    run = make_run(cfg, quiet=True)
    assert run.base.num_envs == 8 and run.generator.decoder == {"auto": "dynamic"}.get(decoder, decoder)
    batch = run.collect()
    assert batch.input_ids.shape[0] == 16
    groups = batch.prompt_index.view(4, 4)
    assert torch.equal(groups, groups[:, :1].expand(4, 4))
    stats = run.update(batch, 1.0)
    assert "losses/policy" in stats
