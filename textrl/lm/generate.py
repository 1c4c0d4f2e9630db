"""The generator protocol (how collection asks a model for tokens) and its reference implementation.

A generator is given its model and sampling config at construction; collection then calls ``prefill``
with the reset observation, ``sample`` once per step, ``extend`` with the columns to append, and ``finish``
at the end of the episode batch; a run checkpoints its ``rng_state``. ``extend`` takes any number of
columns per row, ragged (tested against one parallel forward), so tokens an env appends between the agent's
turns fit it; today's single-turn collection extends by the sampled token only. Faster generators (static
cache, compiled steps, continuous batching) implement the same methods and are tested against
:class:`HFGenerator`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from textrl.lm.decoding import CachedForward
from textrl.lm.sampling import TokenSampler
from textrl.lm.static import StaticForward
from textrl.shard import Shard

__all__ = ["Generator", "HFGenerator", "DECODERS", "resolve_decoder"]

#: how the generator advances the model (``sampling.decoder``): "dynamic" = a growing KV cache, one eager
#: forward per step (the reference implementation); "static" = a preallocated cache, eager; "compiled" = the
#: static cache with a compiled decode step (CUDA graphs on CUDA); "auto" = compiled on CUDA, dynamic elsewhere
DECODERS = ("auto", "dynamic", "static", "compiled")


def resolve_decoder(decoder: str, device: torch.device | str) -> str:
    """``decoder`` with "auto" resolved for ``device``."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {list(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        return "compiled" if torch.device(device).type == "cuda" else "dynamic"
    return decoder


class Generator(Protocol):
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Encode the prompts ``[B, L]`` (left-padded)."""

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens ``[B]`` and their log-probs ``[B]`` under the policy at the sampling temperature."""

    def extend(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Append columns ``[B, n]`` to every row's context (``mask`` False: nothing for that row there)."""

    def retire(self, ended: torch.Tensor) -> None:
        """Rows ``ended`` ``[B]`` (bool) get no more columns until the next prefill: the generator may stop
        computing them (their later samples are ignored). Optional: collection calls it where it exists."""

    def admit(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Start retired rows ``rows`` ``[k]`` on new left-padded prompts ``[k, L]`` while the other rows keep
        going. Optional: only continuous batching (:func:`~textrl.lm.collect.collect_episodes`) needs it."""

    def finish(self) -> None:
        """The episode batch is over (keeps data-parallel processes' random streams in step)."""

    def rng_state(self) -> torch.Tensor:
        """The state of the sampling random stream (checkpoints hold it)."""

    def load_rng_state(self, state: torch.Tensor) -> None: ...


class HFGenerator:
    """Token-by-token sampling from a Hugging Face causal LM with its KV cache (:class:`CachedForward`): one
    forward per step for the whole batch, never the prefix again, no host round trip per token.

    The log-prob returned with each token is that of the full temperature-scaled distribution (what the update
    recomputes); with top-k/top-p/min_new_tokens the sampling distribution is truncated, which makes the
    samples slightly off-policy — the same convention as TRL.

    ``decoder`` (see :data:`DECODERS`): "static" and "compiled" advance the model in a preallocated cache
    (:class:`~textrl.lm.static.StaticForward`, tested against the dynamic one); repeated prompts are prefilled
    once with any decoder. The dynamic decoder drops rows that have ended from its cache (:meth:`retire`), so
    completions of different lengths cost the rows still generating; the static ones keep their fixed shapes
    (what a captured CUDA graph needs). Every decoder runs continuous batching (:meth:`admit`).
    """

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 rng: torch.Generator | None = None, shard: Shard | None = None, min_new_tokens: int = 0,
                 stop_ids: tuple[int, ...] = (), decoder: str = "dynamic"):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        device = next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"
        self.decoder = resolve_decoder(decoder, device)
        self.forward = CachedForward(model) if self.decoder == "dynamic" else \
            StaticForward(model, compile=self.decoder == "compiled")
        self.sampler = TokenSampler(temperature, top_k, top_p, rng, shard, min_new_tokens, stop_ids)
        self.rows = 0

    @classmethod
    def from_config(cls, model: torch.nn.Module, sampling, rng: torch.Generator | None = None,
                    shard: Shard | None = None, stop_ids: tuple[int, ...] = ()) -> HFGenerator:
        """From a :class:`~textrl.config.SamplingConfig`."""
        return cls(model, sampling.temperature, sampling.top_k, sampling.top_p, rng, shard,
                   sampling.min_new_tokens, stop_ids, sampling.decoder)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.rows = input_ids.shape[0]
        self.forward.prefill(input_ids, attention_mask)

    @torch.no_grad()
    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.sampler(self.forward.next_logits)  # (B,)
        return tokens, self.forward.logprobs_of(tokens, self.sampler.temperature)

    def extend(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        self.forward.extend(tokens, mask)

    def retire(self, ended: torch.Tensor) -> None:
        self.forward.retire(ended)

    def admit(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Start retired rows ``rows`` on new prompts ``[k, L]`` while the others keep decoding (continuous
        batching; with any decoder)."""
        self.forward.admit(rows, input_ids, attention_mask)
        self.sampler.restart(rows, self.rows)

    def finish(self) -> None:
        self.sampler.sync(self.rows, self.forward.next_logits.device)

    def rng_state(self) -> torch.Tensor:
        return (self.sampler.rng or torch.default_generator).get_state()

    def load_rng_state(self, state: torch.Tensor) -> None:
        rng = self.sampler.rng or torch.default_generator
        if state.numel() != rng.get_state().numel():  # a CPU stream's state is 5056 bytes, a CUDA one's 16
            raise ValueError(f"the saved sampling stream is from another device type than this generator's "
                             f"({rng.device}): it cannot continue here")
        rng.set_state(state)
