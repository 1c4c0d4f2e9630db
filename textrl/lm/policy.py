"""The language-model actor-critic: a causal LM policy with (for agents with a critic) a scalar value head
on its shared trunk, optionally LoRA through peft. With LoRA the reference policy is the same weights with
the adapters disabled — no second copy in memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from textrl.lm.decoding import positions_from_mask
from textrl.lm.models import disable_dropout
from textrl.logprobs import logprobs_and_entropy

__all__ = ["LMActorCritic", "AdaptersOff", "add_lora"]


def add_lora(model: nn.Module, r: int, alpha: float, target_modules: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` with LoRA adapters of rank ``r`` (peft); ``target_modules=None`` uses peft's default
    for the architecture (GPT-2: c_attn; Llama: q_proj, v_proj). LoRA dropout is 0 (RLHF needs no dropout)."""
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise ValueError(f"lora_r must be > 0 to add LoRA, got {r}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=list(target_modules) if target_modules else None)
    return get_peft_model(model, cfg)


class AdaptersOff:
    """The reference policy of a LoRA model: the same forward with the adapters disabled.

    Deliberately not an ``nn.Module``: it owns no parameters, so nothing (a KL wrapper freezing its
    reference, an optimizer) can touch the policy's weights through it.
    """

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    @property
    def config(self) -> Any:
        """The model's config (what decoders read: its attention layers, e.g. for a shared prefix)."""
        return self.peft_model.config

    def __call__(self, **kwargs: Any):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)


class LMActorCritic(nn.Module):
    """Policy log-probs (at the sampling ``temperature``) and V(s) from one forward of a causal LM.

    The value head reads the last hidden state at each position: V(s_t) for the state ending at that
    token, i.e. the state in which the next token is chosen. ``value_head=False`` builds none (critic-free
    agents): values are then None and no hidden states are kept.

    The head starts at zero (V ≡ 0, so the first advantages are the returns, not noise) and reads the
    hidden state scaled by 1/√hidden. Pretrained trunks emit hidden states of norm ~√hidden·O(1) (SmolLM2:
    ~45 at width 576), so with a plain ``Linear`` one Adam step of size lr moves V by ~lr·hidden — 0.3 at
    lr 5e-4, larger than the whole spread of typical scores — and the critic never settles (measured:
    explained variance < 0 for a whole run). With the scale a step moves V by ~lr·√hidden.
    """

    def __init__(self, lm: nn.Module, critic: nn.Module | None = None, temperature: float = 1.0,
                 value_head: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.lm = disable_dropout(lm)
        self.temperature = float(temperature)
        # A separate critic trunk (TRL/OpenRLHF style: initialised from the policy or the reward model);
        # None = the value head reads the policy's own last hidden state (one forward, one copy).
        self.critic = disable_dropout(critic) if critic is not None else None
        self.value_head: nn.Linear | None = None
        if value_head:
            config = (critic if critic is not None else lm).config
            hidden = getattr(config, "hidden_size", None) or config.n_embd
            self.value_head = nn.Linear(hidden, 1)
            self.value_scale = 1.0 / math.sqrt(hidden)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def is_lora(self) -> bool:
        return hasattr(self.lm, "disable_adapter") and hasattr(self.lm, "peft_config")

    def reference(self) -> AdaptersOff | None:
        """The reference policy sharing these weights (LoRA), or None when a frozen copy is needed."""
        return AdaptersOff(self.lm) if self.is_lora else None

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0,
        response_start: int | None = None, **evaluate_kwargs: Any,
    ):
        """``[B, L]`` → logits ``[B, L, V]`` (only the last ``logits_to_keep`` positions if > 0) and values
        ``[B, L]``; with ``response_start``, :meth:`evaluate_response`'s outputs. Agents call the latter
        through the module's ``__call__`` so that a DDP wrapper (accelerate's ``prepare``) sees the forward
        and synchronises the gradients."""
        if response_start is not None:
            return self.evaluate_response(input_ids, attention_mask, response_start, **evaluate_kwargs)
        return self.logits_and_values(input_ids, attention_mask, logits_to_keep)

    def logits_and_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = attention_mask.long()
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        positions = positions_from_mask(mask)
        head_reads_lm = self.value_head is not None and self.critic is None
        out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                      output_hidden_states=head_reads_lm, **extra)
        if self.value_head is None:
            return out.logits, None
        if self.critic is None:
            hidden = out.hidden_states[-1]
        else:
            hidden = self.critic(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 output_hidden_states=True).hidden_states[-1]
        hidden = hidden.to(self.value_head.weight.dtype) * self.value_scale
        return out.logits, self.value_head(hidden).squeeze(-1)

    def evaluate_response(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int,
        entropy_grad: bool = False,
        with_entropy: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """For the response in columns ``>= response_start`` (T of them): log π(a_t|s_t) ``[B, T]`` at the
        temperature, the entropy ``[B, T]`` (see :func:`~textrl.logprobs.logprobs_and_entropy` for
        ``entropy_grad``/``with_entropy``), V(s_t) ``[B, T]`` and the value after the last column V(s_T)
        ``[B]`` (the last two None without a value head)."""
        T = input_ids.shape[1] - response_start
        # logits of the last T + 1 positions only: the prompt's other positions predict nothing we need
        logits, values = self.logits_and_values(input_ids, attention_mask, logits_to_keep=T + 1)
        logits = logits[:, -(T + 1) : -1]  # (B, T, V): position t predicts column t
        logprobs, entropy = logprobs_and_entropy(logits, input_ids[:, response_start:], self.temperature,
                                                 with_entropy, entropy_grad)
        if values is None:
            return logprobs, entropy, None, None
        v = values[:, response_start - 1 :].float()  # (B, T + 1): V(s_t) for t = 0..T
        return logprobs, entropy, v[:, :-1], v[:, -1]

    @torch.no_grad()
    def evaluate_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                       with_entropy: bool = True, rows: int = 16) -> tuple:
        """:meth:`evaluate_response` without gradient over a whole batch, in chunks of ``rows`` (bounds the
        ``[rows, T, V]`` logits); the chunks' outputs concatenated."""
        chunks = [self.evaluate_response(input_ids[i:i + rows], attention_mask[i:i + rows], response_start,
                                         with_entropy=with_entropy) for i in range(0, input_ids.shape[0], rows)]
        return tuple(torch.cat(parts) if parts[0] is not None else None for parts in zip(*chunks, strict=True))
