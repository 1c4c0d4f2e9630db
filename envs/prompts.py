"""Prompts for text envs: loading them, and deciding which prompt each row gets at a reset."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textrl.shard import Shard

__all__ = ["load_prompts", "load_prompt_records", "prompt_rows", "prompt_text", "PromptSampler"]


def load_prompt_records(source: str | Path | Iterable[Any], key: str = "prompt") -> tuple[list[Any], dict[str, list]]:
    """``(prompts, columns)`` from a list of strings, a ``.txt`` file (one per line), a ``.jsonl`` file (one
    object per line) or any iterable of dicts (e.g. a ``datasets.Dataset``). A prompt is a string or a chat
    conversation (a list of ``{"role", "content"}`` messages, rendered with the policy's chat template); the
    dicts' other keys are the ``columns`` (a list per key, in prompt order) that reward functions receive as
    keyword arguments — e.g. the answer of a verifiable task."""
    rows = _rows(source, key)
    if not rows:
        raise ValueError(f"prompts: the prompt source {source!r} is empty; give at least one prompt")
    records = [r for r in rows if isinstance(r, dict)]
    if records and len(records) != len(rows):
        raise ValueError("prompts: mix of dicts and plain prompts; give every row as a dict or none")
    if records and any(key not in r for r in records):
        missing = next(i for i, r in enumerate(records) if key not in r)
        raise ValueError(f"prompts: row {missing} has no {key!r} column (its columns: {sorted(records[missing])}); "
                         f"every row needs one")
    prompts = [r[key] for r in records] if records else rows
    names = [k for k in records[0] if k != key] if records else []
    odd = next((i for i, r in enumerate(records) if set(r) != set(records[0])), None)
    if odd is not None:
        raise ValueError(f"prompts: row {odd} has the columns {sorted(records[odd])}, row 0 {sorted(records[0])}; "
                         "give every row the same columns")
    columns = {name: [r.get(name) for r in records] for name in names}
    bad = [i for i, p in enumerate(prompts) if not _is_prompt(p)]
    if bad:
        raise ValueError(f"prompts: entries {bad[:5]} are empty or neither a string nor a list of "
                         f"{{'role', 'content'}} messages (got {prompts[bad[0]]!r})")
    return prompts, columns


def _rows(source: Any, key: str) -> list[Any]:
    """The rows of a prompt source: file lines/objects, a columnar mapping's rows, a DataFrame's records."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"prompts: no such file {str(path)!r}")
        if path.suffix not in (".txt", ".jsonl", ".json"):
            raise ValueError(f"prompts: {str(path)!r} is not a .txt (one prompt per line), .jsonl (one object per "
                             "line) or .json (a list) file; load other formats with datasets.load_dataset and pass "
                             "the split (ds['train'])")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return list(json.loads(text))
        lines = [line for line in text.splitlines() if line.strip()]
        return [json.loads(line) for line in lines] if path.suffix == ".jsonl" else lines
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # a pandas DataFrame
        return source.to_dict(orient="records")
    if isinstance(source, Mapping):
        values = source.get(key) if not hasattr(source, "column_names") else None
        if isinstance(values, (list, tuple)):  # columnar: {"prompt": [...], "answer": [...]}
            lengths = {k: len(v) for k, v in source.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"prompts: the columns have different lengths {lengths}; give one value per row")
            return [{k: source[k][i] for k in source} for i in range(len(values))]
        raise ValueError(f"prompts: got a mapping with the keys {sorted(map(str, source))[:8]} (a DatasetDict?); "
                         f"pass one split (ds['train']), rows with a {key!r} key, or columns {{{key!r}: [...]}}")
    return list(source)


def _is_prompt(p: Any) -> bool:
    if isinstance(p, str):
        return bool(p)
    return (isinstance(p, (list, tuple)) and len(p) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in p))


def load_prompts(source: str | Path | Iterable[Any], key: str = "prompt") -> list[Any]:
    """The prompts of :func:`load_prompt_records` (strings or chat conversations), without the other columns."""
    return load_prompt_records(source, key)[0]


def prompt_rows(prompts: list[Any], columns: dict[str, list]) -> list[Any]:
    """Prompts back as rows that keep their columns (``{"prompt": …, column: …}``; plain prompts without columns)."""
    if not columns:
        return list(prompts)
    return [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]


def prompt_text(prompt: Any) -> str:
    """A prompt as text for reports: the string, the ``prompt`` of a row, or a conversation's last message."""
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt", "")
    if isinstance(prompt, (list, tuple)):
        return str(prompt[-1]["content"]) if prompt else ""
    return str(prompt)


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
