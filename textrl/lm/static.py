"""A causal LM advanced in a preallocated (static) KV cache, with an optionally compiled decode step.

:class:`StaticForward` has :class:`~textrl.lm.decoding.CachedForward`'s interface and layout (one cache
column per step for every row, masked slots for rows without a token there, a cache-layout attention mask,
positions that skip the masked columns), so the two give the same tokens and log-probs; it is tested against
it. What differs is where the keys and values live: one transformers ``StaticCache`` of ``B`` rows ×
``capacity`` columns, allocated for the first batch and reset (not reallocated) for each later one, so the
one-column decode step has the same shapes and tensor addresses at every call. ``compile=True`` compiles that
step with ``torch.compile`` (``mode="reduce-overhead"`` on CUDA: CUDA-graph capture; the default mode
elsewhere); prefill and multi-column extends run eagerly. Recompiles are bounded: ``capacity`` is the env's
buffer width rounded up to a multiple of :data:`BUCKET`, and a batch of another size or width gets its own
cache (and compile) once.

Repeated prompts (k completions per prompt) are prefilled once, and so is a long enough beginning all prompts
share (a system prompt): the prefill runs in a dynamic cache (:func:`~textrl.lm.decoding.prefill_shared`)
whose rows are then written to the static one.

Continuous batching (:meth:`StaticForward.admit`) keeps the shapes too: a row that starts a new prompt gets
that prompt's keys and values written into its own row of the cache, in the columns just before the next
one (its old episode's columns are dead), and a mask that hides the rest of its row; no other row is copied.
Every step still appends one column for all rows, so when the cache is full its leading columns that no live
row attends to (those of episodes that ended) are dropped by shifting the columns left in place
(:meth:`StaticForward._compact`); the first admit widens the cache once to the env's buffer width plus a
bucket, so a compaction frees at least a bucket of columns. Positions come from the mask's counts, so a
shift changes no row's tokens.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import StaticCache

from textrl.lm.decoding import (
    admitted,
    cache_kwarg,
    full_attention,
    logits_after_last,
    prefill_shared,
    trim_padding,
)
from textrl.logprobs import token_logprobs

__all__ = ["StaticForward", "BUCKET", "full_attention"]

#: cache widths are rounded up to a multiple of this, so a run's batches share one compiled step
BUCKET = 64


def _bucketed(width: int) -> int:
    """``width`` rounded up to a multiple of :data:`BUCKET`."""
    return -(-width // BUCKET) * BUCKET


def _counts_columns(layer: Any) -> bool:
    """Whether a cache layer keeps a count of the columns written (``cumulative_length``), which moving its
    columns must adjust."""
    return hasattr(layer, "cumulative_length")


def _positioned(layer: Any) -> bool:
    """Whether a cache layer's writes say their columns (``cache_kwargs["cache_position"]``: transformers before
    5, whose models take ``cache_position``); from 5 the layers count the columns themselves."""
    return "cache_kwargs" in inspect.signature(layer.update).parameters


def _write_first(layer: Any, keys: torch.Tensor, values: torch.Tensor, positioned: bool) -> None:
    """Write ``keys``/``values`` ``[B, h, n, d]`` into a reset static cache layer's first ``n`` columns
    (``positioned``: :func:`_positioned` of the cache's layers)."""
    if positioned:
        layer.update(keys, values, {"cache_position": torch.arange(keys.shape[-2], device=keys.device)})
    else:
        layer.update(keys, values)


def _initialize_like(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Allocate a static cache layer's tensors for states shaped and typed like ``keys``/``values``."""
    if len(inspect.signature(layer.lazy_initialization).parameters) == 1:  # (before transformers 5: keys only)
        layer.lazy_initialization(keys)
    else:
        layer.lazy_initialization(keys, values)


class StaticForward:
    """Next-token logits of a causal LM, advanced column by column in a static KV cache.

    Args:
        model: a Hugging Face causal LM whose attention supports ``StaticCache`` (Llama, Qwen2, GPT-2, ... —
            what ``generate(cache_implementation="static")`` needs).
        compile: compile the one-column decode step (``torch.compile``; CUDA graphs on CUDA).
        share_prefixes: prefill repeated prompts, and a beginning all prompts share, once (see the module docstring).
    """

    def __init__(self, model: torch.nn.Module, compile: bool = False, share_prefixes: bool = True):
        self.model, self.cache_kwarg, self.share_prefixes = model, cache_kwarg(model), share_prefixes
        self.compile = compile
        self.cache: StaticCache | None = None
        self.mask: torch.Tensor | None = None  # (B, capacity) cache-layout attention mask, 0 beyond `used`
        self.used = 0  # columns written so far
        self.next_logits: torch.Tensor | None = None  # (B, V)
        self.prefill_rows = 0  # (as CachedForward's)
        self.prefill_shared = 0
        self.prefix = None  # (as CachedForward's)
        self._step = None  # the (compiled) one-column step of the current cache
        self.fallback: str | None = None  # why the compiled step gave way to the eager one (None: it did not)
        self.ended: torch.Tensor | None = None  # (B,) rows retired and not admitted since (None: none)
        self.compactions = 0  # how many times full columns were dropped (continuous batching)
        self._full_attention: bool | None = None  # (full_attention(model), asked at the first admit)
        self._positioned = False  # (set with each new cache: see _where)

    @property
    def capacity(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def _cache_for(self, rows: int, width: int, device: torch.device) -> None:
        """A static cache of ``rows`` × ``width`` columns (bucketed): the current one, reset, when it fits."""
        capacity = _bucketed(width)
        if self.cache is not None and self.mask.shape[0] == rows and self.capacity >= capacity:
            self.cache.reset()
            self.mask.zero_()
            return
        if getattr(self.model, "config", None) is None:
            raise TypeError(f"decoder: a static cache needs a Hugging Face model with a .config; "
                            f"{type(self.model).__name__} has none. Use sampling.decoder: dynamic")
        self._allocate(rows, capacity, device)

    def _allocate(self, rows: int, capacity: int, device: torch.device) -> None:
        """A new, empty cache and mask of ``rows`` × ``capacity`` columns, and the decode step for them."""
        self.cache = StaticCache(config=self.model.config, max_cache_len=capacity)
        self._positioned = _positioned(self.cache.layers[0])  # (transformers before 5: forwards say where they write)
        self.mask = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        self._step = self._new_step()

    def _new_step(self) -> Any:
        """The decode step for a new cache: compiled, unless not asked for or a compile already failed (the
        eager step then, as for the old cache)."""
        return self._compiled_step() if self.compile and self.fallback is None else self._forward

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor,
                admit: bool = False) -> tuple[list, torch.Tensor, torch.Tensor]:
        """Prefill ``[b, n]`` trimmed prefixes in a scratch dynamic cache (repeated prefixes and a shared
        beginning once: :func:`~textrl.lm.decoding.prefill_shared`; an ``admit``'s from the batch's shared
        beginning: :func:`~textrl.lm.decoding.admitted`): per layer ``(keys, values)`` ``[b, h, c, d]``, their mask
        ``[b, c]`` (``c ≤ n``) and the next-token logits ``[b, V]``."""
        if admit:
            done = admitted(self, ids, mask)
        else:
            done = prefill_shared(self.model, self.cache_kwarg, ids, mask, self.share_prefixes)
            self.prefix = done.prefix
        self.prefill_rows, self.prefill_shared = done.rows, done.shared
        return [(layer.keys, layer.values) for layer in done.cache.layers], done.mask, done.logits

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode ``[B, L]`` left-padded prefixes in a cache wide enough for the ``L`` columns (the env's whole
        buffer: prompt and response columns); returns the next-token logits ``[B, V]``."""
        start, ids, mask = trim_padding(input_ids, attention_mask)
        self._cache_for(mask.shape[0], input_ids.shape[1] - start, mask.device)
        kv, mask, logits = self._encode(ids, mask)
        n = mask.shape[1]
        for layer, (keys, values) in zip(self.cache.layers, kv, strict=True):
            _write_first(layer, keys, values, self._positioned)
        self.mask[:, :n] = mask
        self.used, self.ended = n, None
        self.next_logits = logits
        return self.next_logits

    @torch.no_grad()
    def admit(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Start batch rows ``rows`` ``[k]`` on new left-padded prefixes ``[k, L]`` while the other rows keep
        decoding (continuous batching, as :meth:`CachedForward.admit`): the new prefixes are prefilled on their
        own (repeated ones once) and written into their rows' last columns; the other rows are not touched.
        Returns the next-token logits ``[B, V]``."""
        assert self.mask is not None, "prefill first"
        self._check_plain_layers()
        rows = torch.as_tensor(rows, device=self.mask.device).long()
        _, ids, mask = trim_padding(input_ids, attention_mask)
        self._grow(_bucketed(input_ids.shape[1] + 1) + BUCKET)  # the widest live row + a bucket
        kv, mask, logits = self._encode(ids, mask, admit=True)
        n = mask.shape[1]
        if n > self.used:  # a prompt wider than the columns so far: every row moves right to make room
            self._shift(n - self.used)
        a = self.used - n
        for layer, (keys, values) in zip(self.cache.layers, kv, strict=True):
            layer.keys[rows, :, a:self.used] = keys
            layer.values[rows, :, a:self.used] = values
        self.mask[rows] = 0
        self.mask[rows, a:self.used] = mask
        if self.ended is not None:
            self.ended[rows] = False
        self.next_logits = self.next_logits.index_copy(0, rows, logits.to(self.next_logits.dtype))
        return self.next_logits

    def _check_plain_layers(self) -> None:
        if self._full_attention is None:
            self._full_attention = full_attention(self.model)
        if not self._full_attention:
            kinds = sorted({type(layer).__name__ for layer in self.cache.layers})
            raise TypeError(f"continuous batching with a static cache moves its columns, which needs full-attention "
                            f"layers; {type(self.model).__name__}'s cache has {kinds}. Set sampling.decoder: "
                            "dynamic (or slots: 0)")

    def _grow(self, capacity: int) -> None:
        """Widen the cache to at least ``capacity`` columns, keeping what it holds (a new cache: the compiled
        step is rebuilt, once per run since later batches reuse the wider cache)."""
        if self.capacity >= capacity:
            return
        old, mask = self.cache, self.mask
        self._allocate(mask.shape[0], capacity, mask.device)
        self.mask[:, :self.used] = mask[:, :self.used]
        for new, held in zip(self.cache.layers, old.layers, strict=True):
            _initialize_like(new, held.keys, held.values)
            new.keys[:, :, :self.used] = held.keys[:, :, :self.used]
            new.values[:, :, :self.used] = held.values[:, :, :self.used]
            if _counts_columns(new):
                new.cumulative_length.fill_(self.used)

    def _shift(self, by: int) -> None:
        """Move every row's columns ``by`` to the right (``by`` > 0) or left (< 0) in place, in the cache and the
        mask; the columns uncovered are masked."""
        src, dst = (slice(0, self.used), slice(by, self.used + by)) if by > 0 else \
            (slice(-by, self.used), slice(0, self.used + by))
        for layer in self.cache.layers:
            layer.keys[:, :, dst] = layer.keys[:, :, src].clone()
            layer.values[:, :, dst] = layer.values[:, :, src].clone()
            if _counts_columns(layer):
                layer.cumulative_length.add_(by)
        self.mask[:, dst] = self.mask[:, src].clone()
        if by > 0:
            self.mask[:, :by] = 0
        else:
            self.mask[:, self.used + by:self.used] = 0
        self.used += by

    def _compact(self) -> None:
        """Drop the leading columns no live row attends to (those of ended episodes) by shifting the rest left.
        The last column stays (a finite column for rows whose own columns all went: a row must attend to
        something, or its masked attention gives NaN keys and values at the next step)."""
        live = ~self.ended if self.ended is not None else torch.ones_like(self.mask[:, 0], dtype=torch.bool)
        attended = self.mask[live, :self.used].bool().any(0)
        start = min(int(attended.int().argmax()) if attended.any() else self.used, self.used - 1)
        if start <= 0:
            return
        self._shift(-start)
        self.mask[~self.mask[:, :self.used].bool().any(1), self.used - 1] = 1  # ended rows left with nothing
        self.compactions += 1

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append ``[B, n]`` columns, as :meth:`CachedForward.extend` does (masked slots for rows without a
        token there); one column goes through the (compiled) decode step."""
        assert self.mask is not None, "prefill first"
        mask = mask.to(self.mask.device).long()  # (B, n)
        n = mask.shape[1]
        if self.used + n > self.capacity:
            self._compact()
        if self.used + n > self.capacity:
            raise ValueError(f"decoder: the static cache holds {self.capacity} columns and {self.used + n} are "
                             "needed (the env wrote more columns than its buffer width); use sampling.decoder: "
                             "dynamic for this env")
        positions = self.mask.sum(-1, keepdim=True) - 1 + mask.cumsum(-1)  # (B, n): masked slots repeat the last
        self.mask[:, self.used:self.used + n] = mask
        self.used += n
        if n == 1:
            new = self._step(tokens, self.mask, positions)
        else:
            new = self._forward(tokens, self.mask, positions, n)
        self.next_logits = torch.where(mask.bool().any(-1, keepdim=True), new, self.next_logits)
        return self.next_logits

    def retire(self, ended: torch.Tensor) -> None:
        """Keeps every row: the cache's shapes are fixed (what a compiled or graph-captured step needs); the
        ended rows' columns are masked slots. They are remembered: a compaction may drop the columns only they
        attend to."""
        self.ended = ended.to(self.mask.device).bool().clone()

    def _where(self, n: int) -> dict:
        """The keyword that says which columns a forward of ``n`` new columns writes: none where the cache
        counts them itself (transformers 5), ``cache_position`` before."""
        if not self._positioned:
            return {}
        return {"cache_position": torch.arange(self.used - n, self.used, device=self.mask.device)}

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 n: int = 1) -> torch.Tensor:
        """Logits after each row's last real new column (the last column when none is real), ``[B, V]``."""
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_kwarg: self.cache}, **self._where(n))
        return logits_after_last(out.logits, self.mask[:, self.used - n:self.used])

    def _compiled_step(self) -> Any:
        mode = "reduce-overhead" if self.mask.device.type == "cuda" else None
        step = torch.compile(self._one_column, mode=mode, dynamic=False, fullgraph=False)

        def run(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            try:  # CUDA graphs reuse their output buffers at the next replay: keep a copy
                return step(tokens, mask, positions, self._where(1)).clone()
            except Exception as err:  # noqa: BLE001 - any compiler failure: the eager step computes the same
                if self.fallback is not None:
                    raise
                self.fallback = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                for layer in self.cache.layers:  # undo a partial write before the eager step redoes it: a layer's
                    if _counts_columns(layer):  # count is the columns written, `used` less this step's one
                        layer.cumulative_length.fill_(self.used - 1)
                self._step = self._forward
                return self._forward(tokens, mask, positions)
        return run

    def _one_column(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                    where: dict) -> torch.Tensor:
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_kwarg: self.cache}, **where)
        return out.logits[:, -1].float()

    def logprobs_of(self, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log p(token) under the current next-token distribution at ``temperature``, ``[B]``."""
        assert self.next_logits is not None, "prefill first"
        return token_logprobs(self.next_logits, tokens, temperature)
