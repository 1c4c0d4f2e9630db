"""The token-level text env, the KV-cached KL wrapper and the rollout helper, on tiny local models."""

import copy
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from helpers import rollout as text_rollout
from textrl.envs import KLPenalty, TextGenVectorEnv
from textrl.envs.toy import char_tokenizer, tiny_gpt2

import textrl  # noqa: F401  (registers textrl/TextGen-v0)
from textrl.lm.decoding import sequence_logprobs
from textrl.losses import kl_estimate

PROMPTS = ["hi", "hello there", "a", "what is the answer?", "good day, friend", "ok"]


def length_scorer(prompts, completions):
    return torch.tensor([float(len(c)) for c in completions])


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    policy = tiny_gpt2(len(tok), seed=0)
    with torch.no_grad():  # make EOS likely enough that rows end at different times
        policy.lm_head.weight[tok.eos_token_id] *= 4
    return policy, tiny_gpt2(len(tok), seed=1)


def make_env(tok, B=6, T=24, scorer=length_scorer, **kw):
    return TextGenVectorEnv(B, tok, PROMPTS, scorer, max_new_tokens=T, **kw)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_logprobs_equal_one_parallel_forward(tok, models, temperature):
    policy, ref = models
    env = KLPenalty(make_env(tok), ref, kl_coef=0.1, temperature=temperature)
    ro = text_rollout(env, policy, temperature=temperature, seed=3, rng=torch.Generator().manual_seed(0))
    lengths = ro.action_mask.sum(1)
    assert ro.terminated.any() and len(set(lengths.tolist())) > 2  # left padding + rows ending at different times
    assert (ro.prompt_mask == 0).any()
    P = ro.prompt_ids.shape[1]
    for model, cached in ((ref, ro.ref_logprobs), (policy, ro.logprobs)):
        full = sequence_logprobs(model, ro.input_ids, ro.attention_mask, P, temperature)
        torch.testing.assert_close(cached[ro.action_mask], full[ro.action_mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sequence_reference_pass_equals_the_per_token_one(tok, models, estimator):
    """reference_pass="sequence" (one parallel reference forward after the episode) gives the same batch as
    the KV-cached per-token reference, with one reference forward per 16 rows instead of one per token."""
    policy, ref = models
    ref = copy.deepcopy(ref)
    calls = []
    ref.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                              with_kwargs=True)
    batches = []
    for mode in ("per_token", "sequence"):
        calls.clear()
        env = KLPenalty(make_env(tok), ref, kl_coef=0.3, estimator=estimator, temperature=0.8, reference_pass=mode)
        batches.append(text_rollout(env, policy, temperature=0.8, seed=3, rng=torch.Generator().manual_seed(0)))
        n_calls = len(calls)
    a, b = batches
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.action_mask, b.action_mask) and a.terminated.any()
    for name in ("ref_logprobs", "kl", "rewards"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=0, msg=name)
    assert n_calls == 1  # 6 rows: one chunk, one forward
    with pytest.raises(ValueError, match="reference_pass must be"):
        KLPenalty(make_env(tok), ref, reference_pass="fused")


def test_reference_runs_one_token_per_step(tok, models):
    policy, ref = models
    ref = copy.deepcopy(ref)
    shapes = []
    ref.register_forward_hook(lambda m, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
                              with_kwargs=True)
    env = KLPenalty(make_env(tok, T=10, scorer=length_scorer), ref)
    ro = text_rollout(env, policy, seed=0)
    steps = int(ro.action_mask.any(0).sum())
    assert shapes[0][1] > 1  # one prefill over the prompts
    assert len(shapes) - 1 == steps - 1 and {w for _, w in shapes[1:]} == {1}  # then one token per step, none after
    rows = [b for b, _ in shapes[1:]]
    lengths = ro.action_mask.sum(1)
    live = [int((lengths > t + 1).sum()) for t in range(steps - 1)]  # rows generating after step t's extend
    assert all(n <= b <= 6 for n, b in zip(live, rows, strict=True)) and rows == sorted(rows, reverse=True)
    assert rows[-1] < 6 and lengths.min() < steps  # rows that ended left the cache


def test_kl_is_zero_when_policy_is_reference_and_rewards_are_score_at_last_token(tok, models):
    policy, _ = models
    env = KLPenalty(make_env(tok), copy.deepcopy(policy), kl_coef=0.5)
    ro = text_rollout(env, policy, seed=1)
    assert torch.all(ro.kl == 0)
    last = ro.action_mask.long().cumsum(1).argmax(1)  # index of each row's last real token
    expected = torch.zeros_like(ro.rewards)
    expected[torch.arange(6), last] = ro.scores
    torch.testing.assert_close(ro.rewards, expected)
    # the score is the scorer's: completion length in characters (EOS is not decoded)
    decoded = tok.batch_decode([t[m].tolist() for t, m in zip(ro.tokens, ro.action_mask, strict=True)], skip_special_tokens=True)
    assert ro.scores.tolist() == [float(len(d)) for d in decoded]
    assert torch.all(ro.tokens[~ro.action_mask] == tok.pad_token_id)  # padding after the end
    assert torch.all(ro.rewards[~ro.action_mask] == 0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_reward_sign_and_size(tok, models, estimator):
    policy, ref = models
    beta = 0.2
    env = KLPenalty(make_env(tok), ref, kl_coef=beta, estimator=estimator)
    ro = text_rollout(env, policy, seed=2)
    m = ro.action_mask
    hand = kl_estimate(ro.logprobs, ro.ref_logprobs, estimator)
    torch.testing.assert_close(ro.kl[m], hand[m])
    if estimator == "k1":
        torch.testing.assert_close(ro.kl[m], ro.logprobs[m] - ro.ref_logprobs[m])
    torch.testing.assert_close(ro.rewards.sum(1), ro.scores - beta * ro.kl.sum(1))


def test_same_seed_same_prompts_and_samples(tok, models):
    policy, ref = models
    runs = [text_rollout(KLPenalty(make_env(tok), ref), policy, seed=5, rng=torch.Generator().manual_seed(9))
            for _ in range(2)]
    assert torch.equal(runs[0].prompt_index, runs[1].prompt_index)
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    other = text_rollout(KLPenalty(make_env(tok), ref), policy, seed=6, rng=torch.Generator().manual_seed(9))
    assert not torch.equal(runs[0].prompt_index, other.prompt_index)


def test_reset_mask_resets_only_masked_rows(tok):
    env = make_env(tok, B=4, T=5)
    obs, _ = env.reset(seed=0)
    a = torch.full((4,), tok.convert_tokens_to_ids("a"))
    env.step(a)
    obs, *_ = env.step(a)  # observations are copies: the latest one holds the two tokens
    before = obs["input_ids"].clone()
    mask = np.array([True, False, True, False])
    obs, info = env.reset(options={"reset_mask": mask})
    assert env.num_generated.tolist() == [0, 2, 0, 2]
    assert torch.equal(obs["input_ids"][1], before[1]) and torch.equal(obs["input_ids"][3], before[3])
    P = env.max_prompt_tokens
    assert torch.all(obs["input_ids"][[0, 2], P:] == tok.pad_token_id)
    with pytest.raises(ValueError, match="reset_mask"):
        env.reset(options={"reset_mask": np.array([True, False])})


def test_termination_truncation_and_missing_eos_penalty(tok):
    env = make_env(tok, B=2, T=3, missing_eos_penalty=10.0)
    env.reset(seed=0)
    a, eos = tok.convert_tokens_to_ids("a"), tok.eos_token_id
    _, r, term, trunc, info = env.step(torch.tensor([eos, a]))
    assert term.tolist() == [True, False] and r.tolist() == [0.0, 0.0]
    _, r, term, trunc, info = env.step(torch.tensor([a, a]))
    assert info["valid"].tolist() == [False, True] and r[0] == 0  # ended row: masked, reward 0
    _, r, term, trunc, info = env.step(torch.tensor([a, a]))
    assert trunc.tolist() == [False, True] and not term[1]
    assert r[1].item() == 3.0 - 10.0  # "aaa" scores 3, minus the missing-EOS penalty


def test_pad_equal_to_eos_gets_another_pad_and_says_so(tok):
    same = char_tokenizer()
    same.pad_token = same.eos_token
    env = make_env(same)  # PAD == EOS in the tokenizer (SmolLM2): another special token pads, and the env says so
    assert env.pad_token_id not in (None, env.eos_token_id) and str(env.pad_token_id) in env.pad_note
    assert make_env(tok).pad_note is None  # a tokenizer with its own PAD keeps it
    with pytest.raises(ValueError, match=r"pad_token_id=1 equals eos_token_id=1.*leave pad_token_id unset"):
        make_env(same, pad_token_id=same.eos_token_id)  # given explicitly: an error, not a silent change
    env = make_env(same, pad_token_id=same.convert_tokens_to_ids("<unk>"))
    assert env.pad_token_id != env.eos_token_id and env.pad_note is None
    obs, _ = env.reset(seed=0)
    out = env.step(torch.full((env.num_envs,), env.eos_token_id))
    assert out[2].all()  # EOS still ends rows (it is not padding)


def test_prompt_rows_with_columns_and_chat_messages_reach_the_scorer():
    from transformers import PreTrainedTokenizerFast

    chat = char_tokenizer()
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}!{% endif %}"
    seen = {}

    def scorer(prompts, completions, answer):
        seen.update(prompts=prompts, answer=answer)
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    rows = [{"prompt": [{"role": "user", "content": "ab"}], "answer": "c", "id": 0},
            {"prompt": "de", "answer": "f", "id": 1}]
    env = TextGenVectorEnv(2, chat, rows, scorer, max_new_tokens=2, prompt_order="sequential",
                           eval_prompts=rows)
    assert isinstance(chat, PreTrainedTokenizerFast) and env.columns == {"answer": ["c", "f"], "id": [0, 1]}
    obs, _ = env.reset(seed=0)
    ids = obs["input_ids"][0][obs["attention_mask"][0].bool()].tolist()
    assert chat.decode(ids) == "ab!"  # the conversation went through the chat template; the string did not
    c, eos = chat.convert_tokens_to_ids("c"), env.eos_token_id
    env.step(torch.tensor([c, c]))
    _, reward, *_ = env.step(torch.tensor([eos, eos]))
    assert seen["answer"] == ["c", "f"] and seen["prompts"][1] == "de" and reward.tolist() == [1.0, 0.0]
    assert env.eval_prompts == rows  # held-out rows keep their columns (see with_prompts)
    with pytest.raises(ValueError, match="row 1 has no 'prompt' column"):
        TextGenVectorEnv(2, chat, [{"prompt": "a"}, {"text": "b"}], scorer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompts": []}, "empty"),
        ({"prompts": ["x" * 50], "max_prompt_tokens": 10}, "prompt #0 has 50 tokens, more than max_prompt_tokens=10"),
        ({"context_length": 16}, "exceeds the model's context_length=16"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"scorer": 42}, "scorer must be callable"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer .*number of logits.*got 0"),
        ({"scorer": "no colon"}, "scorer: expected 'module:attribute', got 'no colon'"),
    ],
)
def test_bad_construction(tok, kwargs, match):
    args = {"prompts": PROMPTS, "scorer": length_scorer, "max_new_tokens": 8, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        TextGenVectorEnv(4, tok, **args)


@pytest.mark.parametrize(
    "action, match",
    [
        (torch.tensor([0, 1, 2, 999]), "token id 999 is outside the vocabulary \\[0, 34\\).*vocab_size=its number of logits"),
        (torch.tensor([0, 1, -1, 2]), "token id -1"),
        (torch.tensor([1, 2]), "shape \\(4,\\)"),
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), "integer token ids"),
    ],
)
def test_bad_actions(tok, action, match):
    env = make_env(tok, B=4)
    env.reset(seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        env.step(action)


def test_a_model_with_more_logits_than_tokens_acts_with_every_id_it_can_sample(tok):
    """Qwen2 pads its 151,665 tokens to 151,936 logits; here a tiny GPT-2 has 16 logits past the 34 tokens. Its
    samples land there about a third of the time: with ``vocab_size`` (what ``textrl train`` and ``eval`` pass,
    see ``fit_vocabulary``) they are actions that decode to nothing; the spaces say so, and so do the env's copies."""
    policy = tiny_gpt2(len(tok) + 16, seed=0)
    seen = []
    env = make_env(tok, B=6, T=12, scorer=lambda p, c: (seen.extend(c), length_scorer(p, c))[1])
    with pytest.raises(ValueError, match="outside the vocabulary \\[0, 34\\)"):
        text_rollout(env, policy, seed=0)
    env.fit_vocabulary(len(tok) + 16)
    assert env.single_action_space.n == 50 and env.single_observation_space["input_ids"].high.max() == 49
    assert make_env(tok, B=6, T=12, vocab_size=20).vocab_size == len(tok)  # (never narrower than the tokenizer)
    seen.clear()
    ro = text_rollout(env, policy, seed=0)
    P = ro.prompt_ids.shape[1]
    response = ro.input_ids[:, P:][ro.action_mask]
    assert (response >= len(tok)).any() and (response < len(tok)).any()
    ids = ro.input_ids[:, P:].tolist()
    kept = [tok.decode([i for i, m in zip(row, mask, strict=True) if m and i < len(tok)], skip_special_tokens=True)
            for row, mask in zip(ids, ro.action_mask.tolist(), strict=True)]
    assert sorted(seen) == sorted(kept)  # (the padded ids decode to nothing)
    assert env.with_prompts(PROMPTS[:2]).vocab_size == 50
    env.fit_vocabulary(40)
    assert env.vocab_size == 50  # (never narrowed)

    class TokenLevel:  # a token-level scorer (a reward model reading ids) is not handed the ids past the tokenizer's
        token_level, most = True, 0

        def __call__(self, ids, mask):
            self.most = max(self.most, int(ids[mask.bool()].max()))
            return mask.sum(1).float()

    scorer = TokenLevel()
    env = make_env(tok, B=6, T=12, scorer=scorer, vocab_size=len(tok) + 16)
    ro = text_rollout(env, policy, seed=1)
    assert (ro.input_ids[:, P:][ro.action_mask] >= len(tok)).any() and 0 < scorer.most < len(tok)


@pytest.mark.parametrize(
    "scorer, match",
    [
        (lambda p, c: torch.zeros(len(c) + 1), "returned 2 scores for 1 completions"),
        (lambda p, c: torch.full((len(c),), float("nan")), "non-finite"),
        (lambda p, c: [float("inf")] * len(c), "non-finite"),
    ],
)
def test_bad_scorer_output(tok, scorer, match):
    env = make_env(tok, B=1, T=2, scorer=scorer)
    env.reset(seed=0)
    a = torch.tensor([tok.convert_tokens_to_ids("a")])
    env.step(a)
    with pytest.raises(ValueError, match=match):
        env.step(a)


def test_kl_wrapper_requires_the_logprob_with_the_action(tok, models):
    env = KLPenalty(make_env(tok), models[1])
    env.reset(seed=0)
    with pytest.raises(TypeError, match="log-prob"):
        env.step(torch.zeros(6, dtype=torch.long))


def test_registered_ids_single_env_passes_check_env_and_make_vec(tok):
    env = gym.make("textrl/TextGen-v0", tokenizer=tok, prompts=PROMPTS, scorer=length_scorer, max_new_tokens=6)
    check_env(env.unwrapped, skip_render_check=True)
    envs = gym.make_vec("textrl/TextGen-v0", num_envs=3, tokenizer=tok, prompts=PROMPTS, scorer=length_scorer)
    assert isinstance(envs, TextGenVectorEnv) and envs.num_envs == 3


def test_readme_custom_env_snippet_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = re.search(r"<!-- custom-env-start -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(snippet.strip().splitlines()) < 25
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["reward"].shape == (4,)
    assert namespace["terminated"].dtype == torch.bool


def test_partial_reset_keeps_the_reference_state_of_running_rows(tok, models):
    policy, ref = models
    env = KLPenalty(make_env(tok, B=4, T=8), ref)
    env.reset(seed=0)
    a = torch.full((4,), tok.convert_tokens_to_ids("e"))
    for _ in range(3):
        env.step({"token": a, "logprob": torch.zeros(4)})
    before = env.ref.next_logits.clone()
    obs, _ = env.reset(options={"reset_mask": np.array([True, False, True, False])})
    torch.testing.assert_close(env.ref.next_logits[[1, 3]], before[[1, 3]], atol=1e-5, rtol=0)
    fresh = KLPenalty(make_env(tok, B=4, T=8), ref)
    fresh_logits = fresh.ref.prefill(obs["input_ids"][[0, 2]], obs["attention_mask"][[0, 2]])
    torch.testing.assert_close(env.ref.next_logits[[0, 2]], fresh_logits, atol=1e-5, rtol=0)


def test_top_k_and_top_p_restrict_sampling():
    from textrl.lm.sampling import sample_from_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.all(sample_from_logits(logits, top_k=1, generator=g) == 0)
    assert set(sample_from_logits(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_from_logits(logits, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 + 0.3 crosses 0.7
    assert set(sample_from_logits(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_from_logits(logits, generator=g).tolist()) == {0, 1, 2, 3}
    # the sampler draws from softmax(logits) exactly: empirical frequencies of 40 000 draws
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = sample_from_logits(probs.log().expand(40_000, 4), generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=4).double() / 40_000
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)  # SE <= 0.0025 per cell: 4 SE


def test_score_scale_bias_and_clip(tok):
    env = make_env(tok, B=2, T=1, scorer=lambda p, c: torch.tensor([100.0, -100.0]), score_scale=0.5,
                   score_bias=1.0, score_clip=5.0)
    env.reset(seed=0)
    _, r, *_ = env.step(torch.tensor([tok.eos_token_id] * 2))
    assert r.tolist() == [5.0, -5.0]
    env = make_env(tok, B=2, T=1, scorer=lambda p, c: torch.tensor([2.0, -4.0]), score_scale=0.5, score_bias=1.0)
    env.reset(seed=0)
    _, r, *_ = env.step(torch.tensor([tok.eos_token_id] * 2))
    assert r.tolist() == [2.0, -1.0]
