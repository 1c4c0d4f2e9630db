"""Tiny local models and tokenizers for tests and toy tasks: nothing is downloaded."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

__all__ = ["char_tokenizer", "tiny_gpt2"]

SPECIALS = ["<pad>", "<eos>", "<unk>"]


def char_tokenizer(alphabet: str = string.ascii_lowercase + " .,!?") -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory: ids 0-2 are <pad>, <eos>, <unk>, then one id per char."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(dict.fromkeys(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 32, n_head: int = 2, n_positions: int = 128,
              seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 with dropout off (as every RLHF model must have)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=1,
                     pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()
