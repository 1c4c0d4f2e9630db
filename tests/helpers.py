"""Shared test helpers: a rollout of a text env with a causal LM through the public collection API."""

import torch

from textrl.lm.collect import collect_tokens
from textrl.lm.generate import HFGenerator
from textrl.rollout import TokenRollout


def rollout(env, model, temperature: float = 1.0, seed: int | None = None, rng: torch.Generator | None = None,
            **sampling) -> TokenRollout:
    """``collect_tokens`` with an :class:`HFGenerator` over ``model`` (a Hugging Face causal LM)."""
    return collect_tokens(env, HFGenerator(model, temperature, rng=rng, **sampling), seed=seed)
