"""Prompts for text envs: loading them, and deciding which prompt each row gets at a reset."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textrl.shard import Shard

__all__ = ["load_prompts", "PromptSampler"]


def load_prompts(source: str | Path | Iterable[Any], key: str = "prompt") -> list[str]:
    """Prompts from a list of strings, a ``.txt`` file (one per line), a ``.jsonl`` file (``{"prompt": ...}``
    per line) or any iterable of dicts (e.g. a ``datasets.Dataset``)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"prompts: no such file {str(path)!r}")
        if path.suffix == ".jsonl":
            prompts = [json.loads(line)[key] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = [p[key] if isinstance(p, dict) else p for p in source]
    if not prompts:
        raise ValueError(f"prompts: the prompt source {source!r} is empty; give at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"prompts: entries {bad[:5]} are empty or not strings")
    return prompts


class PromptSampler:
    """Which prompt each row of a text env answers after a reset.

    Args:
        num_prompts: how many prompts there are to draw from.
        num_rows: the env's rows.
        order: "random" (uniform draws from the env's seeded RNG) or "sequential" (cycle through in order).
        num_generations: k: each drawn prompt fills k contiguous rows (rows i·k … i·k + k − 1 form group i), so
            group baselines (RLOO, GRPO) are exact. ``num_rows`` must be a multiple of k and a partial reset
            must cover whole groups.
        shard: ``(offset, total)`` or a :class:`~textrl.shard.Shard`: the env holds rows
            ``offset … offset + num_rows − 1`` of a batch of ``total`` rows (a data-parallel run). A full reset
            draws the prompts of the whole batch and keeps its rows, so the union of the shards equals the
            unsharded batch of the same seed (a partial reset draws for its own rows).
    """

    def __init__(self, num_prompts: int, num_rows: int, order: str = "random", num_generations: int = 1,
                 shard: Shard | tuple[int, int] | None = None):
        if order not in ("random", "sequential"):
            raise ValueError(f"prompt_order must be 'random' or 'sequential', got {order!r}")
        k = num_generations
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"num_generations must be a positive integer, got {k!r}")
        if num_rows % k:
            raise ValueError(f"num_envs={num_rows} must be a multiple of num_generations={k} "
                             "(each prompt fills k contiguous rows)")
        self.shard = shard if isinstance(shard, Shard) else Shard(*(shard or (0, None)))
        s = self.shard
        if s.sharded and (s.offset + num_rows > s.total or s.offset % k or s.total % k):
            raise ValueError(f"shard: rows {s.offset}..{s.offset + num_rows - 1} must lie in the global batch of "
                             f"{s.total} and start and end on whole groups of num_generations={k}")
        self.num_prompts, self.num_rows, self.order, self.num_generations = num_prompts, num_rows, order, k
        self._next = 0  # sequential order: the next prompt

    def state_dict(self) -> dict[str, int]:
        """The position in sequential order (random draws come from the env's RNG, checkpointed with the env)."""
        return {"next": self._next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._next = int(state.get("next", 0))

    def check_reset_mask(self, reset_mask: torch.Tensor) -> None:
        k = self.num_generations
        if k > 1 and not bool((reset_mask.view(-1, k) == reset_mask.view(-1, k)[:, :1]).all()):
            raise ValueError(f"options['reset_mask'] must reset whole groups of num_generations={k} rows")

    def draw(self, rows: int, rng: np.random.Generator, full: bool) -> torch.Tensor:
        """Prompt indices ``[rows]`` for ``rows`` rows being reset (``full``: every row of the env)."""
        k = self.num_generations
        n = rows // k  # prompts to draw: one per group
        shard = self.shard if full else Shard()
        draws = shard.total // k if shard.sharded else n
        if self.order == "sequential":
            picks = (torch.arange(draws) + self._next) % self.num_prompts
            self._next = int(picks[-1] + 1) if draws else self._next
        else:
            picks = torch.as_tensor(rng.integers(0, self.num_prompts, size=draws))
        if shard.sharded:
            picks = picks[shard.offset // k:][:n]
        return picks.repeat_interleave(k)
