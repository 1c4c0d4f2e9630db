"""A causal LM advanced with its KV cache, and the one-forward log-probs of whole sequences.

:class:`CachedForward` runs one ``prefill`` over (left-padded) prefixes, then ``extend`` appends columns —
one sampled token per row, or several tokens an env wrote — encoding only the new columns. It keeps its
own attention mask in cache layout (one column per cached position), so rows may be ended (fed a masked
slot), extended by different numbers of tokens, or re-prefilled independently of how the env lays out its
token buffer. The policy's generator and the KL wrapper's per-token reference both use it.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from textrl.logprobs import token_logprobs

__all__ = ["CachedForward", "GrowingLayer", "distinct_rows", "full_attention", "grow_in_place", "last_logits",
           "logits_after_last", "trim_padding", "positions_from_mask", "prefill_shared", "sequence_logprobs",
           "shared_prefix"]


#: the forward keyword that takes a KV cache: ``cache`` in current transformers (``past_key_values`` is
#: deprecated there, to be removed in 5.40), ``past_key_values`` before the rename
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _forward_params(model: Any) -> Any:
    """The parameters of ``model``'s forward (None when its signature cannot be read)."""
    try:
        return inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        return None


def cache_kwarg(model: Any) -> str:
    """The KV-cache keyword ``model``'s forward names (a custom model may take only ``past_key_values``);
    :data:`CACHE_KWARG` for forwards that take ``**kwargs`` only (peft wrappers pass them through)."""
    params = _forward_params(model) or {}
    return next((name for name in ("cache", "past_key_values") if name in params), CACHE_KWARG)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(start, ids, mask)``: the columns from the first to the last that is real in some row (the others are
    padding in every row, so a prefill skips them); ``start`` is the first kept column."""
    used = attention_mask.bool().any(0).nonzero()
    if used.numel() == 0:
        raise ValueError("prefill: every row is empty (attention_mask is all 0)")
    start, end = int(used[0]), int(used[-1]) + 1
    return start, input_ids[:, start:end], attention_mask[:, start:end].long()


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(distinct, inverse)``: the first row of each distinct (ids, mask) row, in order of first appearance,
    and for every row the index of its distinct row; ``(None, None)`` when no row repeats another."""
    key = torch.cat([ids, mask], dim=-1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    if uniq.shape[0] == key.shape[0]:
        return None, None
    rows = torch.arange(key.shape[0], device=key.device)
    first = torch.full((uniq.shape[0],), key.shape[0], device=key.device).scatter_reduce(0, inverse, rows, "amin")
    order = torch.argsort(first)  # distinct rows in order of first appearance
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=key.device))
    return first[order], rank[inverse]


def last_logits(model: Any, cache_kwarg_name: str, cache: Any, ids: torch.Tensor,
                mask: torch.Tensor, past: int = 0) -> tuple[Any, torch.Tensor]:
    """A prefill forward over ``ids``/``mask`` ``[b, n]`` into ``cache``; returns ``(output, logits [b, V])``, each
    row's next-token logits (predicted at its last real column, float32). When every row ends at the last
    column (left padding: the usual case) only that column's logits are computed (``logits_to_keep=1``), not
    ``n × V`` of them (a model that ignores the keyword returns them all; the last column is still right).
    ``past``: the cache already holds that many columns every row attends to (a shared prefix)."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    keep = {"logits_to_keep": 1} if bool(mask[:, -1].all()) and _takes(model, "logits_to_keep") else {}
    full = torch.cat([mask.new_ones(mask.shape[0], past), mask], dim=1) if past else mask
    out = model(input_ids=ids, attention_mask=full, position_ids=positions_from_mask(full)[:, past:], use_cache=True,
                **{cache_kwarg_name: cache}, **keep)
    if keep:
        return out, out.logits[:, -1].float()
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # (b,) rows reset by mask may end earlier
    return out, out.logits[rows, last].float()


#: a prefix every prompt of a prefill shares (a system prompt, a chat template's header) is encoded once, in
#: one row, when it is at least this many tokens long and saves at least four times as many (see
#: :func:`worth_sharing`): below that the extra forward costs about what it saves
SHARED_PREFIX_MIN = 16


def full_attention(model: Any) -> bool:
    """Whether every layer of ``model`` is a plain full-attention one (no sliding window), judged by the layers
    of the static cache its config asks for: what moving a cache's columns (continuous batching in a static
    cache) and a shared prefix's columns before padding (:func:`prefill_shared`) need. False without a
    ``.config``."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    try:  # (the layers allocate nothing until their first write)
        layers = StaticCache(config=config, max_cache_len=64).layers
    except Exception:  # noqa: BLE001 - a config StaticCache cannot read: no static cache at all
        return False
    return {type(layer).__name__ for layer in layers} == {"StaticLayer"}


def shared_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading real tokens all rows of ``ids``/``mask`` ``[b, n]`` have in common (counting real tokens
    only, wherever padding or masked slots put them), at most the shortest row's length − 1, so that every row
    keeps a token of its own to predict from; 0 for a single row."""
    most = int(mask.bool().sum(1).min()) - 1
    if ids.shape[0] < 2 or most <= 0:
        return 0
    aligned = _first_real(ids, mask, most)
    return _agreeing(aligned == aligned[:1], most)


def common_beginning(ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> int:
    """How many of ``tokens`` ``[n]`` every row of ``ids``/``mask`` ``[b, L]`` begins with (in real tokens, as
    :func:`shared_prefix` counts them), at most the shortest row's length − 1."""
    most = min(int(mask.bool().sum(1).min()) - 1, tokens.shape[0])
    if most <= 0:
        return 0
    return _agreeing(_first_real(ids, mask, most) == tokens[:most], most)


def _first_real(ids: torch.Tensor, mask: torch.Tensor, most: int) -> torch.Tensor:
    """``[b, most]``: each row's first ``most`` real tokens."""
    order = torch.argsort((~mask.bool()).int(), dim=1, stable=True)[:, :most]
    return ids.gather(1, order)


def _agreeing(equal: torch.Tensor, most: int) -> int:
    """The leading columns of ``equal`` ``[b, most]`` that are True in every row."""
    same = equal.all(0)
    return most if bool(same.all()) else int((~same).int().argmax())


def worth_sharing(rows: int, shared: int) -> bool:
    """Whether encoding a ``shared``-token prefix once for ``rows`` rows pays for its extra forward."""
    return shared >= SHARED_PREFIX_MIN and (rows - 1) * shared >= 4 * SHARED_PREFIX_MIN


class GrowingLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` that appends in place: its keys and values are views of
    buffers with spare columns, so a decode step writes its new column instead of copying the whole cache
    into a new tensor (``torch.cat``, ``DynamicLayer``'s way, what ``generate`` does: a step of SmolLM2-135M, 32
    rows, after 400-token prompts took 0.84 of the time on the CPU; after 40-token ones the same). The values
    are the same, bit for bit. Whoever replaces ``keys``/``values`` with another tensor (a row
    selection, a column slice, a join) is fine: the next append sees they are not its buffers' views and copies
    them into new buffers once (a row selection lets go of the old buffers at once). A buffer grows by a
    quarter of its columns (at least :data:`SPARE_COLUMNS`)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self, "keys", None) is None or self.keys.numel() == 0:  # (the first write: the parent's)
            return super().update(key_states, value_states, *args, **kwargs)
        n, m = self.keys.shape[-2], key_states.shape[-2]
        buffers = getattr(self, "storage", None)
        if buffers is None or n + m > buffers[0].shape[-2] or not (
                _views(self.keys, buffers[0]) and _views(self.values, buffers[1])):
            self.storage = buffers = None  # (the old buffers go now, not after the new ones are made)
            columns = n + m + max(SPARE_COLUMNS, (n + m) // 4)
            buffers = tuple(torch.cat([old, old.new_empty(*old.shape[:2], columns - n, old.shape[-1])], dim=-2)
                            for old in (self.keys, self.values))
            self.storage = buffers
        for buffer, new in zip(buffers, (key_states, value_states), strict=True):
            buffer[:, :, n:n + m] = new
        self.keys, self.values = buffers[0][:, :, :n + m], buffers[1][:, :, :n + m]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.storage = None  # (new tensors of the kept rows: the buffers of all rows are not held on to)
        super().batch_select_indices(indices)

    def reset(self) -> None:
        self.storage = None
        super().reset()

    def __copy__(self) -> GrowingLayer:
        """A copy with its own buffers to come: one buffer written by two layers would mix their columns."""
        copied = type(self).__new__(type(self))
        copied.__dict__.update({k: v for k, v in self.__dict__.items() if k != "storage"})
        return copied


#: the least spare columns a :class:`GrowingLayer` buffer is made with
SPARE_COLUMNS = 16


def _views(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``tensor`` is ``buffer``'s first columns ``[:, :, :n]`` (its own rows and heads, in place)."""
    return (tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride()
            and tensor.shape[:2] == buffer.shape[:2] and tensor.shape[-1] == buffer.shape[-1])


def grow_in_place(cache: Any) -> None:
    """Make ``cache``'s plain dynamic layers :class:`GrowingLayer` s (the others stay as they are)."""
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer


def hold(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``layer`` hold ``keys``/``values`` (a :class:`GrowingLayer` lets go of its buffers now, not at its
    next append)."""
    layer.keys, layer.values = keys, values
    if isinstance(layer, GrowingLayer):
        layer.storage = None


def plain_layers(cache: Any, width: int) -> bool:
    """Whether every layer of ``cache`` is a plain dynamic full-attention layer holding ``width`` columns (a
    sliding-window or otherwise indexed layer keeps other columns: nothing may be moved or shared in it)."""
    return all(type(layer) in (DynamicLayer, GrowingLayer) and isinstance(layer.keys, torch.Tensor)
               and layer.keys.shape[-2] == width for layer in cache.layers)


class Prefix:
    """Tokens every row of a batch begins with (``tokens`` ``[n]``: a system prompt, a chat template's header)
    and their KV cache, one row (``cache``), encoded once: each prefill of rows that begin with them starts
    from it (:func:`prefill_shared`) — the batch's, and in continuous batching each admit's after it."""

    def __init__(self, tokens: torch.Tensor, cache: DynamicCache):
        self.tokens, self.cache = tokens, cache

    @property
    def width(self) -> int:
        return self.tokens.shape[0]

    def covering(self, ids: torch.Tensor, mask: torch.Tensor) -> Prefix | None:
        """The part of this prefix every row of ``ids``/``mask`` ``[b, L]`` begins with, leaving each row a token of
        its own, where it is :data:`SHARED_PREFIX_MIN` tokens or more (it costs no forward now); else None."""
        n = common_beginning(ids, mask, self.tokens)
        if n < SHARED_PREFIX_MIN:
            return None
        if n == self.width:
            return self
        # (a full-attention layer's first n columns are the cache of the first n tokens)
        return Prefix(self.tokens[:n], _viewed(self.cache, lambda t: t[..., :n, :]))

    def expanded(self, rows: int) -> DynamicCache:
        """A cache whose every row starts with this prefix's keys and values: views (the forward's first append
        copies them into each row), in layers of its own (this one stays as it is, to be used again)."""
        return _viewed(self.cache, lambda t: t.expand(rows, -1, -1, -1))


def _viewed(cache: DynamicCache, view: Any) -> DynamicCache:
    """A cache of its own whose layers hold ``view(tensor)`` of ``cache``'s keys and values (``cache`` unchanged)."""
    out = DynamicCache()
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.keys, layer.values = view(layer.keys), view(layer.values)
    return out


def encode_prefix(model: Any, cache_kwarg_name: str, tokens: torch.Tensor) -> Prefix | None:
    """``tokens`` ``[n]`` (positions 0..n-1) with their one-row KV cache, or None where the model's cache is not
    made of plain full-attention layers (see :func:`plain_layers`) or its forward takes no cache."""
    if not _takes(model, cache_kwarg_name):
        return None
    cache = DynamicCache()
    ids = tokens.unsqueeze(0)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(ids.shape[1], device=ids.device).unsqueeze(0), use_cache=True,
                **{cache_kwarg_name: cache})
    cache = getattr(out, cache_kwarg_name, None) or cache
    return Prefix(tokens, cache) if isinstance(cache, DynamicCache) and plain_layers(cache, ids.shape[1]) else None


def encode_shared_prefix(model: Any, cache_kwarg_name: str, ids: torch.Tensor, mask: torch.Tensor) -> Prefix | None:
    """The beginning all rows of ``ids``/``mask`` ``[b, n]`` share, encoded (:func:`encode_prefix`), where encoding
    it once pays (:func:`worth_sharing`) on a full-attention model; None otherwise."""
    if ids.shape[1] <= SHARED_PREFIX_MIN:  # (too short to share anything: no device sync)
        return None
    shared = shared_prefix(ids, mask)
    if not worth_sharing(ids.shape[0], shared) or not full_attention(model):
        return None
    return encode_prefix(model, cache_kwarg_name, ids[0][mask[0].bool()][:shared])


def after_prefix(mask: torch.Tensor, shared: int) -> tuple[int, torch.Tensor]:
    """``(start, rest)``: the mask ``[b, n - start]`` of the real columns past each row's first ``shared`` real
    tokens, from the first column where some row has one (``start``)."""
    real = mask.bool()
    rest = real & (real.long().cumsum(1) > shared)
    start = int(rest.any(0).int().argmax())
    return start, rest[:, start:].to(mask.dtype)


class Prefilled(NamedTuple):
    """What :func:`prefill_shared` returns."""

    cache: Any  # the new dynamic cache, a row per row given
    mask: torch.Tensor  # [B, C] its attention mask (cache layout)
    logits: torch.Tensor  # [B, V] each row's next-token logits (float32)
    rows: int  # rows encoded (the distinct ones)
    prefix: Prefix | None  # the beginning every row shares, encoded once (None: none was)

    @property
    def shared(self) -> int:
        return 0 if self.prefix is None else self.prefix.width


def prefill_shared(model: Any, cache_kwarg_name: str, ids: torch.Tensor, mask: torch.Tensor,
                   share: bool = True, prefix: Prefix | None = None) -> Prefilled:
    """Prefill trimmed prefixes ``ids``/``mask`` ``[B, n]`` into a new dynamic cache (see :class:`Prefilled`). With
    ``share``: rows that repeat another (k completions per prompt) are encoded once and gathered back; then,
    where the distinct rows begin with the same tokens (a system prompt, a chat template's header: see
    :func:`worth_sharing`), those are encoded once in one row and the cache of that row is the first columns
    of every row's, the rest of each row after them. The cache mask then differs in layout from ``mask`` (the
    rows' own tokens after the shared columns, their padding between) and may be narrower; positions come
    from it, so the tokens' positions are the same. ``prefix``: that beginning, encoded already (tokens every
    row begins with, leaving each row one at least: see :meth:`Prefix.covering`)."""
    distinct, inverse = distinct_rows(ids * mask, mask) if share else (None, None)
    if distinct is not None:
        ids, mask = ids[distinct], mask[distinct]
    b = ids.shape[0]
    if prefix is None and share:
        prefix = encode_shared_prefix(model, cache_kwarg_name, ids, mask)
    if prefix is None:
        cache, shared = DynamicCache(), 0
    else:
        cache, shared = prefix.expanded(b), prefix.width
        start, rest = after_prefix(mask, shared)
        ids, mask = ids[:, start:], torch.cat([mask.new_ones(b, shared), rest], dim=1)
    out, logits = last_logits(model, cache_kwarg_name, cache, ids, mask[:, shared:], shared)
    cache = getattr(out, cache_kwarg_name, None) or cache  # (updated in place; some models return a new one)
    if distinct is not None:  # back to one row per completion
        cache.batch_select_indices(inverse)
        logits, mask = logits[inverse], mask[inverse]
    return Prefilled(cache, mask, logits, b, prefix)


def admitted(forward: Any, ids: torch.Tensor, mask: torch.Tensor) -> Prefilled:
    """Prefill an admit's trimmed prompts ``ids``/``mask`` ``[k, n]`` for ``forward`` (a :class:`CachedForward` or a
    :class:`~textrl.lm.static.StaticForward`; continuous batching): from ``forward.prefix``, the beginning its
    batch's prompts share, encoded at its prefill, where every new prompt begins with it (or
    :data:`SHARED_PREFIX_MIN` tokens of it) too, so a system prompt is encoded once per batch, not once per admit.
    A beginning the new prompts share is kept for the next admits when the batch had none."""
    known = forward.prefix.covering(ids, mask) if forward.prefix is not None and forward.share_prefixes else None
    done = prefill_shared(forward.model, forward.cache_kwarg, ids, mask, forward.share_prefixes, prefix=known)
    if forward.prefix is None:
        forward.prefix = done.prefix
    return done


def logits_after_last(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits ``[b, V]`` (float32) predicted after each row's last real column of an extend's ``mask``
    ``[b, n]`` (its last column when none is real): what an extend by ragged columns hands the sampler."""
    n = mask.shape[1]
    if n == 1:  # (one column: the logits are its own, no gather)
        return logits[:, 0].float()
    last = n - 1 - mask.flip(-1).argmax(-1)  # (b,)
    return logits[torch.arange(mask.shape[0], device=mask.device), last].float()


def _takes(model: Any, name: str) -> bool:
    params = _forward_params(model) or {}
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the i-th real token of a row gets position i. ``[B, L]``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CachedForward:
    """Next-token logits of a causal LM, advanced column by column with a KV cache.

    ``model`` is a Hugging Face causal LM (anything accepting ``input_ids, attention_mask, position_ids,
    a KV cache (``cache`` or ``past_key_values``, updated in place), use_cache`` and returning ``.logits``). ``next_logits`` ``[B, V]`` (float32, not
    temperature-scaled) predicts each row's next token.

    Rows that have ended for good are dropped from the computation with :meth:`retire`: the cache keeps only
    the live rows, so a batch whose completions have different lengths costs the rows still generating, not
    the longest row times the batch (``generate`` and a fixed-shape cache pay for every row until the last
    ends). The retired rows' ``next_logits`` stay as they were; extends ignore their columns. :meth:`admit`
    starts retired rows again on new prompts while the others keep decoding (continuous batching).
    """

    def __init__(self, model: torch.nn.Module, share_prefixes: bool = True):
        self.model, self.cache_kwarg, self.share_prefixes = model, cache_kwarg(model), share_prefixes
        self.prefill_rows = 0  # rows the last prefill encoded (fewer than the batch when prefixes repeat)
        self.prefill_shared = 0  # tokens of the last prefill's prefix shared by every row and encoded once
        self.prefix: Prefix | None = None  # the beginning the batch's prompts share, encoded once (admits use it)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, C) cache-layout attention mask
        self.next_logits: torch.Tensor | None = None  # (B, V)
        self.rows: torch.Tensor | None = None  # the batch rows held in the cache, in cache order (None: all)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode ``[B, L]`` left-padded prefixes; returns the next-token logits ``[B, V]``. Rows that repeat
        another row's prefix (k completions per prompt) are encoded once and their cache shared, and so is a
        long enough beginning that every prefix shares (a system prompt): see :func:`prefill_shared`."""
        _, ids, mask = trim_padding(input_ids, attention_mask)
        done = prefill_shared(self.model, self.cache_kwarg, ids, mask, self.share_prefixes)
        self.cache, self.mask, self.next_logits = done.cache, done.mask, done.logits
        self.rows, self.prefill_rows, self.prefill_shared, self.prefix = None, done.rows, done.shared, done.prefix
        return self.next_logits

    def retire(self, ended: torch.Tensor) -> None:
        """Rows ``ended`` ``[B]`` (bool) get no more columns until the next prefill: drop them from the cache.
        The cache is compacted once an eighth of its rows (at least one) has ended, so a batch whose rows end
        one by one is copied a logarithmic number of times, not once per row."""
        assert self.mask is not None, "prefill first"
        rows = self.rows if self.rows is not None else torch.arange(ended.shape[0], device=self.mask.device)
        keep = (~ended.to(rows.device)[rows]).nonzero().squeeze(1)  # positions in the cache of the live rows
        held = rows.shape[0]
        if keep.numel() == 0 or held - keep.numel() < max(1, held // 8):
            return
        self.cache.batch_select_indices(keep)
        self.mask, self.rows = self.mask[keep], rows[keep]

    def _drop_empty_columns(self) -> None:
        """Drop the cache's leading columns that no held row attends to (the columns of rows that left), at each
        admit: with continuous batching the cache would otherwise widen by every step of every episode it held.
        Positions come from the mask's counts, so the held rows' tokens are unchanged."""
        start = int(self.mask.bool().any(0).int().argmax())
        if start == 0:
            return
        if not plain_layers(self.cache, self.mask.shape[1]):  # (sliding-window layers etc.: left alone)
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        self.mask = self.mask[:, start:]

    @torch.no_grad()
    def admit(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Start batch rows ``rows`` ``[k]`` on new left-padded prefixes ``[k, L]`` while the other rows keep
        decoding — the cache side of continuous batching. Whatever the cache still holds of those rows (an
        ended episode not yet retired) is dropped; the new rows are prefilled on their own (repeated prefixes
        once, and the beginning the batch's prompts share not again: :func:`admitted`) and joined to the cache,
        the narrower side left-padded with masked columns. Returns the next-token logits ``[B, V]``."""
        assert self.mask is not None, "prefill first"
        rows = torch.as_tensor(rows, device=self.mask.device).long()
        held = self.rows if self.rows is not None else torch.arange(self.next_logits.shape[0], device=rows.device)
        new = admitted(self, *trim_padding(input_ids, attention_mask)[1:])
        stay = ~torch.isin(held, rows)  # rows still cached from their last episode restart: drop their old part
        if not stay.any():  # every cached row restarts: the new cache is the cache
            self.cache, self.mask, self.rows = new.cache, new.mask, rows
        else:
            if not stay.all():
                self.cache.batch_select_indices(stay.nonzero().squeeze(1))
                self.mask, held = self.mask[stay], held[stay]
            width = max(self.mask.shape[1], new.mask.shape[1])
            pad = lambda x: torch.nn.functional.pad(x, (0, 0, width - x.shape[-2], 0))  # noqa: E731 - [b, h, c, d]
            for mine, theirs in zip(self.cache.layers, new.cache.layers, strict=True):
                hold(mine, torch.cat([pad(mine.keys), pad(theirs.keys)]), torch.cat([pad(mine.values), pad(theirs.values)]))
            left = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
            self.mask, self.rows = torch.cat([left(self.mask), left(new.mask)]), torch.cat([held, rows])
            self._drop_empty_columns()
        self.next_logits = self.next_logits.index_copy(0, rows, new.logits.to(self.next_logits.dtype))
        self.prefill_rows, self.prefill_shared = new.rows, new.shared
        return self.next_logits

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append ``[B, n]`` columns (``mask`` False: a masked slot, e.g. a row that has ended or a row that
        appends fewer tokens than another). Rows with a real new column get the logits predicted after their
        last one; rows without keep theirs. Returns the next-token logits ``[B, V]``."""
        assert self.mask is not None, "prefill first"
        mask = mask.to(self.mask.device).long()  # (B, n)
        if self.rows is not None:  # only the rows still in the cache (see retire)
            tokens, mask = tokens[self.rows.to(tokens.device)], mask[self.rows]
        positions = self.mask.sum(-1, keepdim=True) - 1 + mask.cumsum(-1)  # (b, n): masked slots repeat the last
        self.mask = torch.cat([self.mask, mask], dim=-1)  # (b, C + n)
        grow_in_place(self.cache)  # (the new columns written in place, not the cache copied)
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions,
                         use_cache=True, **{self.cache_kwarg: self.cache})
        self.cache = getattr(out, self.cache_kwarg, None) or self.cache  # (updated in place; some models return a new one)
        new = logits_after_last(out.logits, mask)  # (b, V)
        if self.rows is None:
            self.next_logits = torch.where(mask.bool().any(-1, keepdim=True), new, self.next_logits)
        else:  # a new tensor, not written in place: a caller may still hold the last one
            held = self.next_logits[self.rows]
            held = torch.where(mask.bool().any(-1, keepdim=True), new, held)
            self.next_logits = self.next_logits.index_copy(0, self.rows, held)
        return self.next_logits

    def logprobs_of(self, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log p(token) under the current next-token distribution at ``temperature``, ``[B]``."""
        assert self.next_logits is not None, "prefill first"
        return token_logprobs(self.next_logits, tokens, temperature)


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float = 1.0,
    chunk_rows: int = 16,
    share_prefix: bool = True,
) -> torch.Tensor:
    """One parallel forward over full sequences: log p(x_t | x_<t) for every response position.

    ``input_ids`` ``[B, L]`` holds left-padded prompts in columns ``< response_start`` and the response
    after; returns ``[B, L - response_start]`` (float32; 0 where ``attention_mask`` is 0). This is the
    sequence-level path (what TRL does after ``generate``; the KL wrapper's reference pass) and what the
    KV-cached path is tested against. The rows go through the model in chunks of ``chunk_rows`` (bounding the
    ``[rows, T, V]`` logits) grouped by length: sorted by their last real column, each chunk over its own
    columns only (from its first real column to its last), so short completions do not pay for the longest.
    With ``share_prefix``, a long enough beginning every prompt shares (a system prompt, a chat template's
    header: :func:`worth_sharing`) is encoded once, and each chunk starts from its keys and values; and where
    rows repeat a prompt (k completions each, RLOO/GRPO), each chunk encodes each of its prompts once when that
    is cheaper, the chunks then possibly made of whole groups (:func:`chunk_order`).
    """
    B, L = input_ids.shape
    mask = attention_mask.long()
    cols = torch.arange(L, device=mask.device)
    last = torch.where(mask.bool(), cols, -1).max(1).values  # (B,) each row's last real column
    name = cache_kwarg(model)
    ends = last.tolist()  # (one host copy)
    order, grouped = chunk_order(model, name, input_ids, mask, response_start, ends, chunk_rows) if share_prefix \
        else (sorted(range(B), key=ends.__getitem__), False)
    out = torch.zeros(B, L - response_start, dtype=torch.float32, device=input_ids.device)
    # (the shared beginning leaves each row its last prompt token: it predicts the first)
    head = response_start - 1 if grouped else response_start  # (grouped: the prompts' last token is the chunk's)
    prefix = encode_shared_prefix(model, name, input_ids[:, :head], mask[:, :head]) if share_prefix else None
    for i in range(0, B, chunk_rows):
        chunk = order[i : i + chunk_rows]
        rows = torch.tensor(chunk, device=mask.device)
        end = max(max(ends[r] for r in chunk) + 1, response_start)  # the chunk's last real column + 1
        T = end - response_start
        if T == 0:
            continue
        ids, extra = (_grouped_chunk_inputs if grouped else _chunk_inputs)(
            model, input_ids[rows, :end], mask[rows, :end], response_start, prefix, name)
        logits = model(input_ids=ids, **extra, logits_to_keep=T + 1).logits
        logits = logits[:, -(T + 1) : -1]  # (b, T, V): position t predicts column response_start + t
        out[rows, :T] = token_logprobs(logits, ids[:, ids.shape[1] - T:], temperature).float()
    return torch.where(mask[:, response_start:].bool(), out, 0.0)  # no log-prob where there is no token


#: the reference pass encodes the prompt of k completions once per chunk of rows (a group's, RLOO/GRPO) only for
#: prompts of at least this many tokens of their own (past a beginning all share): below, the extra forward per
#: chunk costs about what it saves (the default task's chat prompts, 14 tokens after a shared 24: 0.96)
GROUP_PROMPT_MIN = 32


def chunk_order(model: Any, name: str, ids: torch.Tensor, mask: torch.Tensor, response_start: int,
                ends: list[int], chunk_rows: int) -> tuple[list[int], bool]:
    """``(order, grouped)``: the order in which :func:`sequence_logprobs` takes the rows in chunks, and whether
    each chunk encodes each of its distinct prompts once (rows that repeat a prompt: k completions of it). By
    their last real column (``ends``) unless prompts repeat, each has :data:`GROUP_PROMPT_MIN` tokens or more of
    its own (past the beginning all share, encoded once in any case) and the model is all full attention; then the cheapest of: by length, one forward per chunk; by length with the
    prompts of a chunk encoded once; by prompt, then length (a chunk holds whole groups), prompts once — counted
    in tokens encoded (padding included), with a second forward per chunk costing :data:`GROUP_PROMPT_MIN`."""
    B, head = len(ends), response_start - 1  # (the prompt's last token stays with the response: it predicts it)
    by_length = sorted(range(B), key=ends.__getitem__)
    if head < GROUP_PROMPT_MIN:  # (no prompt long enough: no device sync)
        return by_length, False
    _, inverse = distinct_rows(ids[:, :head] * mask[:, :head], mask[:, :head])
    if inverse is None:
        return by_length, False
    shared = shared_prefix(ids[:, :head], mask[:, :head])  # (encoded once either way: not counted)
    shared = shared if worth_sharing(B, shared) else 0
    prompt = mask[:, :head].sum(1) - shared  # (each prompt's own tokens)
    if int(prompt.min()) < GROUP_PROMPT_MIN or not full_attention(model) or not _takes(model, name):
        return by_length, False
    group, prompt, first = inverse.tolist(), prompt.tolist(), mask[:, :response_start].argmax(1).tolist()

    def cost(order: list[int], grouped: bool) -> int:
        total = 0
        for i in range(0, B, chunk_rows):
            rows = order[i : i + chunk_rows]
            end = max(ends[r] for r in rows) + 1
            if grouped:
                total += len({group[r] for r in rows}) * max(prompt[r] for r in rows) + GROUP_PROMPT_MIN
                total += len(rows) * (end - head)
            else:
                total += len(rows) * (end - min(first[r] for r in rows) - shared)
        return total

    by_prompt = sorted(range(B), key=lambda r: (group[r], ends[r]))
    tokens, order = min((cost(by_length, True), by_length), (cost(by_prompt, True), by_prompt), key=lambda c: c[0])
    return (order, True) if tokens + 4 * SHARED_PREFIX_MIN <= cost(by_length, False) else (by_length, False)


def _grouped_chunk_inputs(model: Any, ids: torch.Tensor, mask: torch.Tensor, response_start: int,
                          prefix: Prefix | None, name: str) -> tuple[torch.Tensor, dict]:
    """A reference-pass chunk's ``(input_ids, forward keywords)`` when its prompts repeat: the prompts but their
    last token prefilled with each distinct one encoded once (:func:`prefill_shared`, after the batch's shared
    beginning ``prefix`` if any), the chunk's forward from the prompts' last column on, from that cache."""
    head = response_start - 1
    _, head_ids, head_mask = trim_padding(ids[:, :head], mask[:, :head])
    done = prefill_shared(model, name, head_ids, head_mask, prefix=prefix)
    cache, cache_mask = done.cache, done.mask
    full = torch.cat([cache_mask, mask[:, head:]], dim=1)
    return ids[:, head:], {"attention_mask": full, "position_ids": positions_from_mask(full)[:, cache_mask.shape[1]:],
                           name: cache, "use_cache": True}


def _chunk_inputs(model: Any, ids: torch.Tensor, mask: torch.Tensor, response_start: int,
                  prefix: Prefix | None, name: str) -> tuple[torch.Tensor, dict]:
    """A reference-pass chunk's ``(input_ids, forward keywords)``: its columns from the first that
    is real in some row (at the latest the column before the response, which predicts its first token), or,
    after a shared ``prefix`` (its cache, one row), from the first real column past it, with that cache."""
    if prefix is None:
        start = min(trim_padding(ids, mask)[0], response_start - 1)
        ids, mask = ids[:, start:], mask[:, start:]
        return ids, {"attention_mask": mask, "position_ids": positions_from_mask(mask)}
    b, shared = ids.shape[0], prefix.width
    start, rest = after_prefix(mask, shared)
    cache = prefix.expanded(b)
    full = torch.cat([rest.new_ones(b, shared), rest], dim=1)
    return ids[:, start:], {"attention_mask": full, "position_ids": positions_from_mask(full)[:, shared:], name: cache,
                            "use_cache": True}
