"""Reward scorers (HF reward model with its own tokenizer, token-level path), prompt sources, KL controllers
in the wrapper, and the offline pretrained models (SmolLM2 from GGUF, MiniLM)."""

import copy
import json

import pytest
import torch
from helpers import rollout as text_rollout
from textrl.envs import HFRewardModelScorer, KLPenalty, TextGenVectorEnv, load_prompts
from textrl.envs.toy import char_tokenizer, tiny_gpt2

from textrl.kl_control import AdaptiveKLController
from textrl.lm.decoding import sequence_logprobs
from textrl.lm.models import disable_dropout, load_causal_lm, load_tokenizer, minilm_path


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def minilm_scorer():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=1)
    return HFRewardModelScorer(disable_dropout(model), AutoTokenizer.from_pretrained(str(minilm_path())), batch_size=2)


def test_hf_reward_model_scorer_has_its_own_tokenizer_and_is_batch_invariant(tok, minilm_scorer):
    prompts = ["hello", "how are you", "tell me a story", "ok"]
    completions = ["world", "fine thanks, and you?", "once upon a time there was a cat", "sure"]
    scores = minilm_scorer(prompts, completions)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    one_by_one = torch.cat([minilm_scorer([p], [c]) for p, c in zip(prompts, completions, strict=True)])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=0)
    assert len(set(scores.tolist())) == 4  # it reads the text
    assert not minilm_scorer.model.training and not any(p.requires_grad for p in minilm_scorer.model.parameters())
    # plugged into the env: a char-level policy tokenizer, a WordPiece reward tokenizer
    env = TextGenVectorEnv(4, tok, prompts, minilm_scorer, max_new_tokens=4)
    ro = text_rollout(env, tiny_gpt2(len(tok)), seed=0)
    completions = tok.batch_decode([t[m].tolist() for t, m in zip(ro.tokens, ro.action_mask, strict=True)],
                                   skip_special_tokens=True)
    expected = minilm_scorer([prompts[i] for i in ro.prompt_index.tolist()], completions)
    torch.testing.assert_close(ro.scores, expected, atol=1e-5, rtol=0)


class CountToken:
    """Token-level scorer: how often token id ``target`` appears after the prompt (no decoding)."""

    token_level = True

    def __init__(self, target, prompt_len):
        self.target, self.prompt_len = target, prompt_len

    def __call__(self, input_ids, attention_mask):
        completion = input_ids[:, self.prompt_len:]
        return ((completion == self.target) & attention_mask[:, self.prompt_len:].bool()).sum(-1).float()


def test_token_level_scorer_matches_the_text_path(tok):
    target = tok.convert_tokens_to_ids("e")
    prompts = ["abc", "hello"]
    text_env = TextGenVectorEnv(8, tok, prompts, lambda p, c: torch.tensor([x.count("e") for x in c], dtype=torch.float),
                                max_new_tokens=12)
    token_env = TextGenVectorEnv(8, tok, prompts, CountToken(target, text_env.max_prompt_tokens), max_new_tokens=12)
    policy = tiny_gpt2(len(tok))
    a = text_rollout(text_env, policy, seed=4, rng=torch.Generator().manual_seed(1))
    b = text_rollout(token_env, policy, seed=4, rng=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.scores, b.scores)
    assert a.scores.sum() > 0


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    assert load_prompts([{"prompt": "x"}, {"prompt": "y"}]) == ["x", "y"]  # dataset-like rows
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="are empty or neither a string"):
        load_prompts(["ok", ""])


def test_adaptive_controller_drives_the_wrapper_beta(tok):
    policy, ref = tiny_gpt2(len(tok), seed=0), tiny_gpt2(len(tok), seed=1)
    ctl = AdaptiveKLController(0.1, target=0.01, horizon=100)
    env = KLPenalty(TextGenVectorEnv(4, tok, ["hi", "yo"], lambda p, c: torch.zeros(len(c)), max_new_tokens=6), ref, ctl)
    ro = text_rollout(env, policy, seed=0)
    kl = float((ro.kl.sum(1)).mean())
    assert kl > 0.01  # different models: KL well above target
    ctl.update(kl, n_steps=4)
    assert ctl.value > 0.1 and env.kl_coef == ctl.value
    ro2 = text_rollout(env, policy, seed=0)
    torch.testing.assert_close(ro2.rewards.sum(1), -ctl.value * ro2.kl.sum(1))


def test_smollm2_offline_cached_logprobs_match_parallel_forward():
    """The real pretrained chat model (Llama architecture: RoPE, GQA) through the env and the KL wrapper."""
    tok = load_tokenizer("smollm2-135m-instruct")
    policy = load_causal_lm("smollm2-135m-instruct").eval()
    assert tok.pad_token_id == tok.eos_token_id  # the GGUF tokenizer sets PAD = EOS: the env picks another PAD
    auto = TextGenVectorEnv(2, tok, ["Hi"], lambda p, c: torch.zeros(len(c)))
    assert auto.pad_token_id != auto.eos_token_id and "padding with token" in auto.pad_note
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("Say hi.", "Name a colour in one word, please.", "What is two plus two?")]
    env = KLPenalty(TextGenVectorEnv(3, tok, prompts, lambda p, c: torch.tensor([float(len(x)) for x in c]),
                                     max_new_tokens=12, pad_token_id=pad), copy.deepcopy(policy), temperature=0.8)
    ro = text_rollout(env, policy, temperature=0.8, seed=0)
    # the reference is a copy of the policy: k1 = 0 up to rounding (bitwise 0 on AVX2; on AVX-512 the BLAS kernels'
    # rounding follows the buffers' alignment, so two copies of the model differ run to run by ≤ 4e-6 measured)
    assert ro.kl.abs().max() < 1e-5, ro.kl
    full = sequence_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_ids.shape[1], 0.8)
    # 30 fp32 layers: measured max |diff| 2e-5 (summation order of cached vs parallel attention); tiny models meet 1e-5
    torch.testing.assert_close(ro.logprobs[ro.action_mask], full[ro.action_mask], atol=1e-4, rtol=0)
    assert (ro.prompt_mask == 0).any()  # prompts of different lengths: left padding exercised
