"""Tiny local models and tokenizers for tests and toy tasks: nothing is downloaded."""

from __future__ import annotations

import string

import torch
from textrl.envs.text_gen import TextGenEnv, TextGenVectorEnv
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

__all__ = ["char_tokenizer", "tiny_gpt2", "tiny_model", "TINY_MODEL", "target_token_env", "TargetTokenEnv"]

SPECIALS = ["<pad>", "<eos>", "<unk>"]


#: the char tokenizer's chat template: each message as "<role initial> <content><eos>", then "a " for the assistant
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }} {{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}a {% endif %}")


def char_tokenizer(alphabet: str = string.ascii_lowercase + " .,!?") -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory: ids 0-2 are <pad>, <eos>, <unk>, then one id per char; with a
    tiny chat template (:data:`CHAT_TEMPLATE`), so multi-turn envs run on the tiny model too."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(dict.fromkeys(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 32, n_head: int = 2, n_positions: int = 128,
              seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 with dropout off (as every RLHF model must have)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=1,
                     pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


#: the model name under which `textrl.lm.models.load_causal_lm` builds :func:`tiny_model` in memory
#: (registered by ``import textrl`` with the toy env)
TINY_MODEL = "textrl/tiny-char-gpt2"


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    """The toy task's policy: a tiny GPT-2 over :func:`char_tokenizer`'s vocabulary."""
    return tiny_gpt2(len(char_tokenizer()), seed=seed)

TOY_PROMPTS = [
    "the cat sat on the", "once upon a time", "my favourite food is", "we went to the", "a quick brown fox",
    "she said hello to", "the sun rises over", "in the small town", "he opened the door and", "rain fell on the",
    "the old man and the", "they sang a song about", "under the bright moon", "a letter arrived from",
    "the river runs past", "at the end of the day",
]
TOY_EVAL_PROMPTS = [
    "the dog ran to the", "a bird sang in the", "we ate bread and", "the ship sailed to", "my friend told me",
    "a cold wind blew", "the children played", "she wrote a book about", "the market was full of",
    "he found a key in", "the train left at", "our garden has", "a storm came from", "the baker made",
    "snow covered the", "the lamp was lit by",
]


class TargetTokenScorer:
    """Reward = share of the completion's characters that are ``target`` (a toy task a tiny model can learn)."""

    def __init__(self, target: str = "e"):
        self.target = target

    def __call__(self, prompts, completions):
        return torch.tensor([c.count(self.target) / max(len(c), 1) for c in completions], dtype=torch.float32)


def target_token_env(
    num_envs: int,
    tokenizer=None,
    target: str = "e",
    prompts=None,
    max_new_tokens: int = 16,
    scorer=None,
    **kwargs,
):
    """``textrl/TargetToken-v0``: the tiny char-level model earns the share of ``target`` in its completion
    (or whatever ``scorer`` says, e.g. a trained reward model)."""
    kwargs.setdefault("eval_prompts", TOY_EVAL_PROMPTS)
    return TextGenVectorEnv(num_envs, tokenizer or char_tokenizer(), prompts or TOY_PROMPTS,
                            scorer or TargetTokenScorer(target), max_new_tokens=max_new_tokens, **kwargs)


class TargetTokenEnv(TextGenEnv):
    """The single-env form of ``textrl/TargetToken-v0`` (``gym.make``; ``gym.make_vec(..., vectorization_mode=
    "sync")``): one row of :func:`target_token_env`, numpy in and out."""

    vector_env = staticmethod(target_token_env)
