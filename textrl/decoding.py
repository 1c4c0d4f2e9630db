"""Incremental decoding with a KV cache, shared by the policy rollout and the reference in the KL wrapper.

A :class:`CachedDecoder` runs one ``prefill`` over (left-padded) prompts, then one forward of **one token
per row** per ``step``: the prefix is never encoded again. It keeps its own attention mask in cache layout
(one column per cached position) so that rows may be ended (fed a masked pad) or re-prefilled
independently of how the env lays out its token buffer.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

__all__ = ["CachedDecoder", "positions_from_mask", "sequence_logprobs"]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the i-th real token of a row gets position i. ``[B, L]``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CachedDecoder:
    """Next-token log-probabilities of a causal LM, advanced one token at a time.

    Args:
        model: a Hugging Face causal LM (anything accepting ``input_ids, attention_mask, position_ids,
            past_key_values, use_cache`` and returning ``.logits``).
        temperature: logits are divided by it before the softmax, so the log-probs are those of the
            distribution that was (or would be) sampled.
    """

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.model = model
        self.temperature = float(temperature)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, C) cache-layout attention mask
        self.next_logits: torch.Tensor | None = None  # (B, V) temperature-scaled logits for the next token

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode ``[B, L]`` left-padded prefixes; returns the next-token logits ``[B, V]`` (temperature-scaled)."""
        used = attention_mask.bool().any(0).nonzero()
        if used.numel() == 0:
            raise ValueError("prefill: every row is empty (attention_mask is all 0)")
        start, end = int(used[0]), int(used[-1]) + 1  # drop columns that are padding in every row
        ids, mask = input_ids[:, start:end], attention_mask[:, start:end].long()
        self.cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.mask = mask
        # Each row's next token is predicted at its own last real column (rows reset by mask may end earlier).
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # (B,)
        rows = torch.arange(mask.shape[0], device=mask.device)
        self.next_logits = out.logits[rows, last].float() / self.temperature  # (B, V)
        return self.next_logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``tokens`` ``[B]``); rows with ``valid=False`` append a masked slot.

        Returns the next-token logits ``[B, V]``.
        """
        assert self.mask is not None, "prefill first"
        valid = valid.to(self.mask.device)
        positions = self.mask.sum(-1, keepdim=True) - 1 + valid.long().unsqueeze(-1)  # (B, 1)
        self.mask = torch.cat([self.mask, valid.long().unsqueeze(-1)], dim=-1)  # (B, C + 1)
        out = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next_logits = out.logits[:, -1].float() / self.temperature
        return self.next_logits

    def logprobs_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(token) under the current next-token distribution, ``[B]``."""
        assert self.next_logits is not None, "prefill first"
        chosen = self.next_logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B,)
        return chosen - torch.logsumexp(self.next_logits, dim=-1)  # no (B, V) log-softmax tensor


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float = 1.0,
    chunk_rows: int = 16,
) -> torch.Tensor:
    """One parallel forward over full sequences: log p(x_t | x_<t) for every response position.

    ``input_ids`` ``[B, L]`` holds left-padded prompts in columns ``< response_start`` and the response
    after; returns ``[B, L - response_start]``. This is the sequence-level path (what TRL does after
    ``generate``) and the reference the KV-cached path is tested against.
    """
    out = []
    T = input_ids.shape[1] - response_start
    for i in range(0, input_ids.shape[0], chunk_rows):  # bounds the [rows, T, V] logits
        ids, mask = input_ids[i : i + chunk_rows], attention_mask[i : i + chunk_rows].long()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                       logits_to_keep=T + 1).logits
        logits = logits[:, -(T + 1) : -1].float()  # (b, T, V): position t predicts column response_start + t
        if temperature != 1.0:
            logits = logits / temperature
        chosen = logits.gather(-1, ids[:, response_start:].unsqueeze(-1)).squeeze(-1)
        out.append(chosen - torch.logsumexp(logits, dim=-1))
    return torch.cat(out)
