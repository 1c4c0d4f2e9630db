"""The fast decoders (issue 16) against the reference one: a static KV cache, eager or with a compiled decode
step, and prompts shared by k completions prefilled once — the same tokens and log-probs (to 1e-5) as the
dynamic cache, over ragged extends, ended rows, several batches, single- and multi-turn envs."""

import copy

import pytest
import torch
from helpers import DEVICE, rollout
from test_generate import V, tiny_llama
from test_multi_turn import PROMPTS, Echo, chat_tokenizer
from textrl.envs.toy import target_token_env, tiny_gpt2

import textrl.lm.decoding as decoding_module
import textrl.lm.static as static_module
from textrl.config import SamplingConfig
from textrl.lm.decoding import (
    GROUP_PROMPT_MIN,
    CachedForward,
    GrowingLayer,
    chunk_order,
    full_attention,
    positions_from_mask,
    sequence_logprobs,
    shared_prefix,
    worth_sharing,
)
from textrl.lm.generate import HFGenerator, resolve_decoder
from textrl.lm.static import BUCKET, StaticForward
from textrl.logprobs import token_logprobs


@pytest.fixture(autouse=True)
def on_device():
    """Every model and tensor these tests make on :data:`helpers.DEVICE` (TEXTRL_TEST_DEVICE; cpu by default)."""
    with torch.device(DEVICE):
        yield


def batch(width: int = 16):
    """5 left-padded prompts in a buffer of ``width`` columns; rows 0 and 2, and 1 and 4, repeat a prompt."""
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7], [10, 11, 12, 13], [8, 9]]
    ids, mask = torch.zeros(5, width, dtype=torch.long), torch.zeros(5, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 4 - len(p):4], mask[i, 4 - len(p):4] = torch.tensor(p), 1
    return ids, mask


#: a beginning every prompt of :func:`prefixed_batch` shares (a system prompt), long enough to be encoded once
PREFIX = list(range(3, 35))


def prefixed_batch(width: int = 48, hole: bool = False):
    """:func:`batch`'s 5 rows (the same repeats), each prompt after :data:`PREFIX`, left-padded to end at
    column 36 of ``width``; ``hole``: row 1's prompt has a masked slot at column 10, inside the shared part
    (as a multi-turn buffer can), and starts a column earlier."""
    tails = [[35, 36, 37], [38, 39], [35, 36, 37], [36, 38, 37, 39], [38, 39]]
    ids, mask = torch.zeros(5, width, dtype=torch.long), torch.zeros(5, width, dtype=torch.long)
    for i, tail in enumerate(tails):
        p = PREFIX + tail
        ids[i, 36 - len(p):36], mask[i, 36 - len(p):36] = torch.tensor(p), 1
    if hole:
        ids[1, 1:10], ids[1, 10], mask[1, 1:10], mask[1, 10] = ids[1, 2:11].clone(), 0, 1, 0
    return ids, mask


def assert_same_decoding(reference, fast, episodes: int = 2, make=batch) -> None:
    """Drive both forwards through the same episodes: one column per step, a ragged 2-column extend with a
    masked slot, row 3 ending early; the next-token log-probs agree at every step."""
    g = torch.Generator(DEVICE).manual_seed(0)
    ids, mask = make()
    for _ in range(episodes):  # the second episode reuses (resets) the static cache
        reference.prefill(ids, mask)
        fast.prefill(ids, mask)
        for step in range(9):
            torch.testing.assert_close(torch.log_softmax(fast.next_logits, -1),
                                       torch.log_softmax(reference.next_logits, -1), atol=1e-5, rtol=0)
            n = 2 if step == 3 else 1
            tokens = torch.randint(3, V, (5, n), generator=g)
            live = torch.ones(5, n, dtype=torch.bool)
            live[3] = step < 2
            live[1, 0] = n == 1
            ended = torch.arange(5) == 3 if step >= 2 else torch.zeros(5, dtype=torch.bool)
            for forward in (reference, fast):
                forward.retire(ended)  # the dynamic cache drops row 3; the static one keeps its shape
                forward.extend(tokens, live)


@pytest.mark.parametrize("build", [lambda: tiny_gpt2(V), tiny_llama], ids=["gpt2", "llama"])
def test_static_cache_decodes_as_the_dynamic_one(build):
    model = build()
    fast = StaticForward(model)
    assert_same_decoding(CachedForward(model, share_prefixes=False), fast)
    assert fast.prefill_rows == 3 and fast.capacity == BUCKET  # 3 distinct prompts; 16 columns -> one bucket


def test_compiled_decode_step_decodes_as_the_dynamic_one():
    """torch.compile on the CPU (inductor): the same function CUDA captures in graphs."""
    model = tiny_llama()
    fast = StaticForward(model, compile=True)
    assert_same_decoding(CachedForward(model), fast)
    assert fast.fallback is None  # the compiled step ran, not the eager fallback


def test_a_compiler_failure_falls_back_to_the_eager_step(monkeypatch):
    def broken(fn, **kwargs):
        def run(*a):
            fn(*a)  # a failure after part of the step ran: the cache's write position must be undone
            raise RuntimeError("compiler exploded\nsecond line")
        return run

    monkeypatch.setattr(static_module.torch, "compile", broken)
    model = tiny_llama()
    fast = StaticForward(model, compile=True)
    assert_same_decoding(CachedForward(model), fast)
    assert fast.fallback == "RuntimeError: compiler exploded"


def test_after_a_compiler_failure_a_widened_cache_keeps_the_eager_step(monkeypatch):
    """Continuous batching widens the static cache at its first admit, which builds a new step: after a
    compiler failure that is the eager step again, not a second compile whose failure would end the run."""
    compiles = []

    def broken(fn, **kwargs):
        compiles.append(fn)

        def run(*a):
            raise RuntimeError("compiler exploded")
        return run

    monkeypatch.setattr(static_module.torch, "compile", broken)
    model = tiny_llama()
    fast, reference = StaticForward(model, compile=True), CachedForward(model)
    ids, mask = batch()
    for forward in (fast, reference):
        forward.prefill(ids, mask)
        forward.extend(torch.full((5, 1), 7), torch.ones(5, 1, dtype=torch.bool))
    assert fast.fallback == "RuntimeError: compiler exploded" and len(compiles) == 1
    prompt = torch.tensor([[9, 8, 7]])
    for forward in (fast, reference):
        forward.admit(torch.tensor([3]), prompt, torch.ones_like(prompt))
        forward.extend(torch.full((5, 1), 5), torch.ones(5, 1, dtype=torch.bool))
    assert fast.capacity == 2 * BUCKET and len(compiles) == 1  # widened; no second compile
    torch.testing.assert_close(torch.log_softmax(fast.next_logits, -1), torch.log_softmax(reference.next_logits, -1),
                               atol=1e-5, rtol=0)


def sliding_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=8)
    return MistralForCausalLM(cfg).eval()


def test_continuous_batching_in_a_static_cache_needs_full_attention_layers():
    """A sliding-window model's static cache cannot move its columns: `auto` with slots gives the dynamic
    decoder, an explicit static one is refused before any rollout, and an admit into one says why."""
    from textrl.lm.run import rollout_decoder
    from textrl.lm.static import full_attention

    sliding, full = sliding_mistral(), tiny_llama()
    assert full_attention(full) and not full_attention(sliding) and not full_attention(torch.nn.Linear(2, 2))
    slots, plain = SamplingConfig(slots=4), SamplingConfig()
    assert rollout_decoder(slots, sliding, "cuda", no_graphs=False) == "dynamic"
    assert rollout_decoder(slots, full, "cuda", no_graphs=False) == "compiled"
    assert rollout_decoder(plain, sliding, "cuda", no_graphs=False) == "compiled"  # no admits: any static cache
    assert rollout_decoder(slots, full, "cuda", no_graphs=True) == "dynamic"
    assert rollout_decoder(SamplingConfig(slots=4, decoder="static"), full, "cpu", no_graphs=False) == "static"
    with pytest.raises(ValueError, match=r"decoder='compiled' with slots=4: .*MistralForCausalLM has sliding-window"
                                         r".*Set sampling.decoder: dynamic"):
        rollout_decoder(SamplingConfig(slots=4, decoder="compiled"), sliding, "cpu", no_graphs=False)
    fast = StaticForward(sliding)
    fast.prefill(*batch())
    with pytest.raises(TypeError, match="needs full-attention layers; MistralForCausalLM's cache has "
                                        r"\['(Static)?SlidingWindowLayer'\]"):
        fast.admit(torch.tensor([0]), torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.long))


def test_a_static_cache_too_narrow_for_the_env_is_refused_naming_the_fix():
    fast = StaticForward(tiny_gpt2(V))
    ids, mask = batch(width=4)
    fast.prefill(ids, mask)
    for _ in range(BUCKET - 4):
        fast.extend(torch.ones(5, 1, dtype=torch.long), torch.ones(5, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"static cache holds 64 columns and 65 are needed.*decoder: dynamic"):
        fast.extend(torch.ones(5, 1, dtype=torch.long), torch.ones(5, 1, dtype=torch.bool))


def test_rows_that_ended_leave_the_dynamic_cache_and_the_others_decode_as_before():
    """retire: the ended row's cache row is dropped (later extends compute 4 rows, not 5) and every live row's
    next-token log-probs are those of the cache that kept all rows."""
    model = tiny_llama()
    kept = CachedForward(model)
    kept.retire = lambda ended: None  # the cache that keeps every row
    dropped = CachedForward(model)
    assert_same_decoding(kept, dropped)
    assert dropped.rows.tolist() == [0, 1, 2, 4] and dropped.mask.shape[0] == 4
    assert kept.rows is None and kept.mask.shape[0] == 5


@pytest.mark.parametrize("env", ["grpo-groups", "multi-turn"])
def test_a_rollout_with_the_static_decoder_equals_the_dynamic_one(env):
    """Through collect_tokens: k=4 completions per prompt (prefills shared), and a multi-turn env whose
    replies extend the cache between the agent's turns. (On the CPU whatever TEXTRL_TEST_DEVICE says: the
    envs keep their buffers there.)"""
    with torch.device("cpu"):
        if env == "grpo-groups":
            make = lambda: target_token_env(8, num_generations=4, max_new_tokens=12)  # noqa: E731
            model = tiny_gpt2(len(make().unwrapped.tokenizer))
        else:
            make = lambda: Echo(4, chat_tokenizer(), PROMPTS, max_turn_tokens=4, max_new_tokens=48)  # noqa: E731
            model = tiny_gpt2(len(chat_tokenizer()))
        runs = [rollout(make(), model, seed=0, rng=torch.Generator().manual_seed(1), decoder=d)
                for d in ("dynamic", "static")]
    a, b = runs
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.action_mask, b.action_mask)
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.rewards, a.rewards, atol=1e-6, rtol=0)


def test_decoder_choice():
    assert resolve_decoder("auto", "cpu") == "dynamic" and resolve_decoder("auto", "cuda:0") == "compiled"
    assert isinstance(HFGenerator(tiny_gpt2(V), decoder="static").forward, StaticForward)
    assert isinstance(HFGenerator(tiny_gpt2(V)).forward, CachedForward)
    with pytest.raises(ValueError, match="decoder must be one of auto, dynamic, static, compiled, got 'fast'"):
        SamplingConfig(decoder="fast")


def test_the_sequence_pass_groups_rows_by_length_and_skips_their_padding():
    """sequence_logprobs sorts rows by their last real column and runs each chunk over its own columns: the
    log-probs equal a full-width forward of each row alone (0 after a row's end: no token there), and the chunk of short rows
    is narrower than the buffer."""
    model = tiny_llama()
    ids, mask = batch(width=16)  # prompts end at column 3; the responses start at column 4
    g = torch.Generator(DEVICE).manual_seed(0)
    lengths = [2, 12, 5, 12, 3]
    for r, n in enumerate(lengths):
        ids[r, 4:4 + n], mask[r, 4:4 + n] = torch.randint(3, V, (n,), generator=g), 1
    widths = []
    hook = model.register_forward_hook(lambda m, a, kw, out: widths.append(kw["input_ids"].shape), with_kwargs=True)
    got = sequence_logprobs(model, ids, mask, 4, temperature=0.9, chunk_rows=2)
    hook.remove()
    for r, n in enumerate(lengths):
        logits = model(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1],
                       position_ids=positions_from_mask(mask[r:r + 1])).logits[0, 3:15]
        alone = token_logprobs(logits, ids[r, 4:], 0.9)
        torch.testing.assert_close(got[r, :n], alone[:n], atol=1e-5, rtol=0)
        assert torch.all(got[r, n:] == 0)
    # chunks: rows 0 and 4 (ending at columns 5 and 6, prompts from column 1), rows 2 and 1, row 3 (from column 0)
    assert widths == [(2, 6), (2, 15), (1, 16)], widths


POOLS = {"dynamic": CachedForward, "static": StaticForward,
         "compiled": lambda model: StaticForward(model, compile=True)}


@pytest.mark.parametrize("retire_first", [True, False])
@pytest.mark.parametrize("decoder", POOLS)
def test_a_row_admitted_mid_decode_decodes_as_if_prefilled_alone_and_the_others_as_before(retire_first, decoder):
    """Continuous batching's cache step: row 3 ends and is retired, then starts again on a new (longer)
    prompt while the other rows keep decoding. Its next-token log-probs equal a cache prefilled with that
    prompt alone and extended with the same tokens; the other rows' equal a cache that never admitted it.
    The dynamic cache joins the new row to its cache; a static one writes it into its own row, after moving
    every row right (the prompt is wider than the columns written so far), and keeps its shapes."""
    model = tiny_llama()
    ids, mask = batch()
    g = torch.Generator(DEVICE).manual_seed(0)
    pool, others, alone = POOLS[decoder](model), CachedForward(model), CachedForward(model)
    for forward in (pool, others):
        forward.prefill(ids, mask)
    close = lambda a, b: torch.testing.assert_close(torch.log_softmax(a, -1), torch.log_softmax(b, -1),  # noqa: E731
                                                    atol=1e-5, rtol=0)
    ended = torch.arange(5) == 3
    prompt = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 9, 8, 7]])  # wider than the 8 columns written at the admission
    for step in range(8):
        tokens = torch.randint(3, V, (5, 1), generator=g)
        live = torch.ones(5, 1, dtype=torch.bool)
        live[3] = step < 1  # row 3: one token, then ended (masked slots) until step 4
        if step == 4:
            if retire_first:
                pool.retire(ended)  # (without it, admit drops the row's old part itself)
            pool.admit(torch.tensor([3]), prompt, torch.ones_like(prompt))
            alone.prefill(prompt, torch.ones_like(prompt))
        if step >= 4:
            live[3] = True
            close(pool.next_logits[3:4], alone.next_logits)
            alone.extend(tokens[3:4], live[3:4])
        for r in (0, 1, 2, 4):
            close(pool.next_logits[r:r + 1], others.next_logits[r:r + 1])
        pool.extend(tokens, live)
        others.extend(tokens, live if step < 4 else live & (torch.arange(5) != 3)[:, None])
    close(pool.next_logits[3:4], alone.next_logits)
    if decoder == "dynamic":
        assert sorted(pool.rows.tolist()) == [0, 1, 2, 3, 4]
    else:  # widened once (the env's 10 columns + 1, bucketed, + a bucket); 8 columns moved right by 2; 4 steps
        assert pool.capacity == 2 * BUCKET and pool.used == 14 and pool.mask.shape == (5, 2 * BUCKET)
        assert pool.mask[3].tolist() == [1] * 14 + [0] * (2 * BUCKET - 14)
        assert pool.mask[0, :6].tolist() == [0, 0, 0, 1, 1, 1]  # its 3-token prompt was in columns 1-3


def test_a_full_static_cache_drops_the_columns_of_ended_episodes_in_place():
    """A static cache under continuous batching: rows 0, 1, 2 and 4 start new prompts twice, row 3 ends for
    good. When the cache is full, the columns before the live rows' second prompts are dropped (shifted out
    in place, the shapes kept); the live rows decode as a cache prefilled with their last prompts alone, and
    row 3, whose columns all went, still attends to one column (a row attending to none gives NaN)."""
    model = tiny_llama()
    ids, mask = batch()
    pool, alone = StaticForward(model), CachedForward(model)
    pool.prefill(ids, mask)
    live_rows, g = torch.tensor([0, 1, 2, 4]), torch.Generator(DEVICE).manual_seed(0)
    live = (torch.arange(5) != 3)[:, None]
    for step in range(140):
        if step in (5, 60):
            new_ids, new_mask = batch()
            new_ids = (new_ids + step) % V * new_mask  # other prompts each time
            pool.admit(live_rows, new_ids[[0, 1, 2, 3]], new_mask[[0, 1, 2, 3]])
            alone.prefill(new_ids[[0, 1, 2, 3]], new_mask[[0, 1, 2, 3]])
        tokens = torch.randint(3, V, (5, 1), generator=g)
        pool.retire(~live[:, 0] if step >= 1 else torch.zeros(5, dtype=torch.bool))
        pool.extend(tokens, live | (step == 0))
        if step >= 5:
            alone.extend(tokens[live_rows], torch.ones(4, 1, dtype=torch.bool))
    torch.testing.assert_close(torch.log_softmax(pool.next_logits[live_rows], -1),
                               torch.log_softmax(alone.next_logits, -1), atol=1e-5, rtol=0)
    # 4 + 140 columns written; the 60 before the second prompts (written into columns 60-63) dropped once
    assert pool.compactions == 1 and pool.capacity == 2 * BUCKET and pool.used == 4 + 140 - 60
    assert pool.mask[:, :pool.used].bool().any(1).all()
    assert pool.mask[3, :pool.used].sum() == 1


def test_admitting_every_row_at_once_is_a_fresh_prefill():
    model = tiny_llama()
    ids, mask = batch()
    pool, fresh = CachedForward(model), CachedForward(model)
    pool.prefill(ids, mask)
    pool.extend(torch.full((5, 1), 7), torch.ones(5, 1, dtype=torch.bool))
    again = ids.flip(0), mask.flip(0)  # other prompts for every row
    pool.admit(torch.arange(5), *again)
    fresh.prefill(*again)
    tokens = torch.randint(3, V, (5, 1), generator=torch.Generator(DEVICE).manual_seed(0))
    for forward in (pool, fresh):
        forward.extend(tokens, torch.ones(5, 1, dtype=torch.bool))
    torch.testing.assert_close(pool.next_logits, fresh.next_logits, atol=1e-5, rtol=0)


def test_a_growing_layer_holds_what_a_dynamic_one_does_whatever_replaces_its_tensors():
    """GrowingLayer appends into spare columns (no copy of the cache per step) and returns, bit for bit, what
    DynamicLayer's concatenation does, also after its tensors were replaced (rows selected, columns sliced off
    either end): those are copied into new buffers once."""
    from transformers.cache_utils import DynamicLayer

    g = torch.Generator(DEVICE).manual_seed(0)
    grow, plain = GrowingLayer(), DynamicLayer()

    def append(n: int) -> None:
        rows = 4 if grow.keys is None else grow.keys.shape[0]
        k, v = torch.randn(rows, 2, n, 8, generator=g), torch.randn(rows, 2, n, 8, generator=g)
        out = [layer.update(k, v) for layer in (grow, plain)]
        for mine, theirs in zip(*out, strict=True):
            assert torch.equal(mine, theirs)
        assert torch.equal(grow.keys, plain.keys) and torch.equal(grow.values, plain.values)

    append(5)
    append(1)
    storage = grow.storage[0]
    for n in (1, 2, 1):  # within the spare room: written in place, the same buffer
        append(n)
        assert grow.storage[0] is storage and grow.keys.data_ptr() == storage.data_ptr()
    for change in (lambda layer: layer.batch_select_indices(torch.tensor([0, 2, 3])), lambda layer: layer.crop(-2),
                   lambda layer: setattr(layer, "keys", layer.keys[..., 3:, :]) or
                   setattr(layer, "values", layer.values[..., 3:, :])):
        for layer in (grow, plain):
            change(layer)
        append(1)
        append(70)  # past the spare room: a bigger buffer
    assert grow.storage[0].shape[-2] >= grow.keys.shape[-2] + decoding_module.SPARE_COLUMNS
    for layer in (grow, plain):
        layer.batch_select_indices(torch.tensor([0, 1]))
    assert grow.storage is None  # (the buffers of the rows let go are not held on to)
    append(1)
    twin = copy.copy(grow)  # a copy appends into buffers of its own
    before = grow.keys.clone()
    twin.update(torch.ones(2, 2, 1, 8), torch.ones(2, 2, 1, 8))
    assert "storage" in twin.__dict__ and twin.storage[0] is not grow.storage[0]
    assert torch.equal(grow.keys, before)


def test_decoding_with_growing_layers_is_bitwise_that_with_dynamic_ones(monkeypatch):
    """The decoder's cache layers grow in place (GrowingLayer) through prefills, ragged extends, retired rows and
    admits, and its logits are bit for bit those of DynamicLayer's concatenating cache."""
    class Concatenating(CachedForward):
        def extend(self, tokens, mask):
            with monkeypatch.context() as patch:
                patch.setattr(decoding_module, "grow_in_place", lambda cache: None)
                return super().extend(tokens, mask)

    model = tiny_llama()
    grown, plain = CachedForward(model), Concatenating(model)
    g = torch.Generator(DEVICE).manual_seed(0)
    ids, mask = batch()
    for forward in (grown, plain):
        forward.prefill(ids, mask)
    for step in range(8):
        n = 2 if step == 3 else 1
        tokens, live = torch.randint(3, V, (5, n), generator=g), torch.ones(5, n, dtype=torch.bool)
        live[1, 0] = n == 1
        for forward in (grown, plain):
            if step == 2:
                forward.retire(torch.arange(5) == 3)
            if step == 5:
                forward.admit(torch.tensor([3]), torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.long))
            forward.extend(tokens, live)
        assert torch.equal(grown.next_logits, plain.next_logits), step
    assert {type(layer) for layer in grown.cache.layers} == {GrowingLayer}
    assert {type(layer).__name__ for layer in plain.cache.layers} == {"DynamicLayer"}


def test_columns_that_no_held_row_attends_to_leave_the_cache():
    """When the row with the longest context leaves and a shorter prompt takes its place, the leading columns
    only the old row attended to are dropped (continuous batching would otherwise widen the cache by every
    episode it ever held); the other rows decode as before."""
    model = tiny_llama()
    ids, mask = batch(4)  # row 3 has the only 4-token prompt: column 0 is its alone
    pool, kept = CachedForward(model), CachedForward(model)
    for forward in (pool, kept):
        forward.prefill(ids, mask)
    assert pool.mask.shape[1] == 4
    pool.admit(torch.tensor([3]), torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.long))
    assert pool.mask.shape[1] == 3 and all(layer.keys.shape[-2] == 3 for layer in pool.cache.layers)
    g = torch.Generator(DEVICE).manual_seed(0)
    others = (torch.arange(5) != 3)[:, None]
    for _ in range(3):
        tokens = torch.randint(3, V, (5, 1), generator=g)
        pool.extend(tokens, torch.ones(5, 1, dtype=torch.bool))
        kept.extend(tokens, others)
        torch.testing.assert_close(pool.next_logits[others[:, 0]], kept.next_logits[others[:, 0]], atol=1e-5, rtol=0)


def test_the_beginning_all_rows_share_is_counted_in_real_tokens():
    """Real tokens only, wherever padding or masked slots put them; at most the shortest row's length - 1 (each
    row keeps a token to predict from); shared only when it saves enough."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 0, 7, 9, 9], [0, 5, 6, 7, 8, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    assert shared_prefix(ids, mask) == 3  # 5 6 7, then 8 / 9 / 8
    assert shared_prefix(ids[[0, 2]], mask[[0, 2]]) == 3  # 5 6 7 8 in both, capped at 4 - 1
    assert shared_prefix(ids[[1, 2]], mask[[1, 2]]) == 3 and shared_prefix(ids[:1], mask[:1]) == 0
    mask[1, 0] = 0  # row 1 now begins 6 7
    assert shared_prefix(ids, mask) == 0
    assert worth_sharing(3, 32) and not worth_sharing(2, 32) and not worth_sharing(50, 15)


def record_input_shapes(model, shapes: list):
    """Append the shape of every forward's ``input_ids`` to ``shapes``; returns the hook's handle."""
    return model.register_forward_hook(lambda m, a, kw, out: shapes.append(tuple(kw["input_ids"].shape)),
                                       with_kwargs=True)


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
def test_a_beginning_every_prompt_shares_is_encoded_once_and_decodes_as_unshared(decoder):
    """The 3 distinct prompts share 32 tokens: the prefill encodes them once (one row of 32) and the 3 rows'
    own 2-4 tokens after them, then decodes every row as the unshared cache does."""
    model = tiny_llama()
    fast = POOLS[decoder](model)
    assert_same_decoding(CachedForward(model, share_prefixes=False), fast, make=prefixed_batch)
    shapes = []
    hook = record_input_shapes(model, shapes)
    fast.prefill(*prefixed_batch())
    hook.remove()
    assert (fast.prefill_rows, fast.prefill_shared) == (3, 32) and shapes == [(1, 32), (3, 4)], shapes


@pytest.mark.parametrize(("decoder", "build"), [("dynamic", lambda: tiny_gpt2(V)), ("static", lambda: tiny_gpt2(V)),
                                               ("dynamic", tiny_llama), ("compiled", tiny_llama)],
                         ids=["dynamic-gpt2", "static-gpt2", "dynamic-llama", "compiled-llama"])
def test_a_shared_beginning_with_a_masked_slot_in_it_decodes_as_unshared(decoder, build):
    """A row whose shared part has a masked slot (its real tokens are still the others' first 32), on a
    model with learned absolute positions too, and through the compiled step."""
    model = build()
    fast = POOLS[decoder](model)
    assert_same_decoding(CachedForward(model, share_prefixes=False), fast,
                         make=lambda: prefixed_batch(hole=True))
    assert fast.prefill_shared == 32 and fast.prefill_rows == 4  # row 1 no longer repeats row 4's ids


@pytest.mark.parametrize("decoder", POOLS)
def test_admitted_prompts_share_their_beginning_and_decode_as_if_prefilled_alone(decoder):
    """Continuous batching: rows 0, 1 and 3 start prompts that share 32 tokens while rows 2 and 4 keep
    decoding; the admitted rows decode as an unshared cache of them alone, the others as before."""
    model = tiny_llama()
    ids, mask = batch()
    new_ids, new_mask = prefixed_batch()
    new_ids, new_mask = new_ids[[0, 1, 3], :36], new_mask[[0, 1, 3], :36]
    pool, others, alone = POOLS[decoder](model), CachedForward(model), CachedForward(model, share_prefixes=False)
    for forward in (pool, others):
        forward.prefill(ids, mask)
    close = lambda a, b: torch.testing.assert_close(torch.log_softmax(a, -1), torch.log_softmax(b, -1),  # noqa: E731
                                                    atol=1e-5, rtol=0)
    g = torch.Generator(DEVICE).manual_seed(0)
    admitted = torch.tensor([0, 1, 3])
    for step in range(7):
        tokens = torch.randint(3, V, (5, 1), generator=g)
        if step == 3:
            pool.admit(admitted, new_ids, new_mask)
            alone.prefill(new_ids, new_mask)
            assert pool.prefill_shared == 32
        if step >= 3:
            close(pool.next_logits[admitted], alone.next_logits)
            alone.extend(tokens[admitted], torch.ones(3, 1, dtype=torch.bool))
        for r in (2, 4):
            close(pool.next_logits[r:r + 1], others.next_logits[r:r + 1])
        pool.extend(tokens, torch.ones(5, 1, dtype=torch.bool))
        others.extend(tokens, torch.ones(5, 1, dtype=torch.bool))


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
@pytest.mark.parametrize(("kept", "own"), [(32, [38, 36]), (20, [37, 39, 38]), (10, [37, 39, 38])],
                         ids=["whole", "first-20", "too-short"])
def test_an_admit_starts_from_the_beginning_the_batch_shared_without_encoding_it_again(decoder, kept, own):
    """The batch's prompts share :data:`PREFIX` (32 tokens, encoded once at the prefill). A row admitted on a
    prompt that begins with all of it, or with its first 20 tokens, has only its own tokens encoded (the
    beginning's cache is reused, cut to 20 columns); one that shares 10 (too few to share) is encoded whole.
    Either way the row decodes as a cache of its prompt alone, and the other rows as before."""
    model = tiny_llama()
    ids, mask = prefixed_batch()
    prompt = torch.tensor([PREFIX[:kept] + own])
    pool, others, alone = POOLS[decoder](model), CachedForward(model), CachedForward(model, share_prefixes=False)
    for forward in (pool, others):
        forward.prefill(ids, mask)
    assert pool.prefix.width == 32
    close = lambda a, b: torch.testing.assert_close(torch.log_softmax(a, -1), torch.log_softmax(b, -1),  # noqa: E731
                                                    atol=1e-5, rtol=0)
    g = torch.Generator(DEVICE).manual_seed(0)
    for step in range(6):
        tokens = torch.randint(3, V, (5, 1), generator=g)
        if step == 2:
            shapes = []
            hook = record_input_shapes(model, shapes)
            pool.admit(torch.tensor([3]), prompt, torch.ones_like(prompt))
            hook.remove()
            reused = kept if kept >= 20 else 0
            assert shapes == [(1, prompt.shape[1] - reused)] and pool.prefill_shared == reused, shapes
            assert pool.prefix.width == 32  # (kept whole for the next admits)
            alone.prefill(prompt, torch.ones_like(prompt))
        if step >= 2:
            close(pool.next_logits[3:4], alone.next_logits)
            alone.extend(tokens[3:4], torch.ones(1, 1, dtype=torch.bool))
        for r in (0, 1, 2, 4):
            close(pool.next_logits[r:r + 1], others.next_logits[r:r + 1])
        pool.extend(tokens, torch.ones(5, 1, dtype=torch.bool))
        others.extend(tokens, torch.ones(5, 1, dtype=torch.bool))


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
def test_admits_one_after_another_reuse_the_beginning_and_leave_it_as_it_was(decoder):
    """Admits use the batch's encoded beginning again and again: a row on a prompt with its first 20 tokens (the
    cache cut to 20 columns), then two rows on one prompt (a group: encoded once) with all 32. The beginning's
    keys and values stay bit for bit what the prefill made, and every admitted row decodes as its prompt alone."""
    model = tiny_llama()
    pool = POOLS[decoder](model)
    pool.prefill(*prefixed_batch())
    kept = [(layer.keys.clone(), layer.values.clone()) for layer in pool.prefix.cache.layers]
    g = torch.Generator(DEVICE).manual_seed(0)
    close = lambda a, b: torch.testing.assert_close(torch.log_softmax(a, -1), torch.log_softmax(b, -1),  # noqa: E731
                                                    atol=1e-5, rtol=0)
    for rows, prompt, own in (([3], PREFIX[:20] + [37, 39, 38], 3), ([0, 2], PREFIX + [36, 37], 2)):
        pool.extend(torch.randint(3, V, (5, 1), generator=g), torch.ones(5, 1, dtype=torch.bool))
        ids = torch.tensor([prompt] * len(rows))
        shapes = []
        hook = record_input_shapes(model, shapes)
        pool.admit(torch.tensor(rows), ids, torch.ones_like(ids))
        hook.remove()
        assert shapes == [(1, own)], shapes  # (the group's prompt once, its own tokens only)
        alone = CachedForward(model, share_prefixes=False)
        alone.prefill(ids[:1], torch.ones_like(ids[:1]))
        for _ in range(3):
            for r in rows:
                close(pool.next_logits[r:r + 1], alone.next_logits)
            tokens = torch.randint(3, V, (5, 1), generator=g)
            tokens[rows] = tokens[rows[0]].clone()
            pool.extend(tokens, torch.ones(5, 1, dtype=torch.bool))
            alone.extend(tokens[rows[:1]], torch.ones(1, 1, dtype=torch.bool))
    assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
               for layer, (k, v) in zip(pool.prefix.cache.layers, kept, strict=True))


def test_the_sequence_pass_encodes_the_shared_beginning_once_but_not_under_a_sliding_window():
    """The reference pass: the 32 tokens every prompt begins with go through the model once (one row), each
    chunk of rows after them; the log-probs are the unshared pass's. A sliding-window model's window counts
    cache columns, which the shared layout would move, so its pass shares nothing."""
    ids, mask = prefixed_batch()
    g = torch.Generator(DEVICE).manual_seed(0)
    for r, n in enumerate([2, 12, 5, 12, 3]):
        ids[r, 36:36 + n], mask[r, 36:36 + n] = torch.randint(3, V, (n,), generator=g), 1
    for model, shares in ((tiny_llama(), True), (sliding_mistral(), False)):
        shapes = []
        hook = record_input_shapes(model, shapes)
        got = sequence_logprobs(model, ids, mask, 36, temperature=0.9, chunk_rows=2)
        hook.remove()
        want = sequence_logprobs(model, ids, mask, 36, temperature=0.9, chunk_rows=2, share_prefix=False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (shapes[0] == (1, 32)) == shares, shapes
        if shares:  # chunks from the first column after the prefix (column 32 of row 3, the longest tail)
            assert shapes[1:] == [(2, 6), (2, 15), (1, 16)], shapes


def grouped_batch(prompts: int = 4, k: int = 4, scattered: bool = False, lengths=(3, 9), prompt: int = 36,
                  common: int = 0, at: int = 40):
    """k completions of each of ``prompts`` distinct prompts (``prompt`` to ``prompt`` + 3 tokens, left-padded to
    end at column ``at``, the first ``common`` the same in all), completions of random lengths in ``lengths``; a
    prompt's rows contiguous, or with ``scattered`` row r answering prompt r % prompts."""
    g = torch.Generator(DEVICE).manual_seed(1)
    B = prompts * k
    ids, mask = torch.zeros(B, at + lengths[1], dtype=torch.long), torch.zeros(B, at + lengths[1], dtype=torch.long)
    texts = [torch.randint(3, V, (prompt + p % 4,), generator=g) for p in range(prompts)]
    for text in texts:
        text[:common] = torch.arange(3, 3 + common)
    for r in range(B):
        text = texts[r % prompts if scattered else r // k]
        n = int(torch.randint(*lengths, (1,), generator=g))
        ids[r, at - len(text):at], mask[r, at - len(text):at] = text, 1
        ids[r, at:at + n], mask[r, at:at + n] = torch.randint(3, V, (n,), generator=g), 1
    return ids, mask


@pytest.mark.parametrize("common", [0, 20])
def test_the_reference_pass_encodes_each_prompt_of_a_group_once_per_chunk(common):
    """k = 4 completions of each of 4 prompts (36-39 tokens of their own): each chunk of 8 rows prefills its 2
    distinct prompts (but their last token) once, then runs its rows from the prompts' last column; with a
    beginning all prompts share (``common`` tokens) that goes through the model once first, in one row. The
    log-probs are the plain pass's, and the tokens encoded fewer."""
    model, at = tiny_llama(), 40 + common
    ids, mask = grouped_batch(common=common, prompt=36 + common, at=at)
    assert chunk_order(model, "cache", ids, mask, at, ((ids != 0).cumsum(1).argmax(1)).tolist(), 8)[1]
    counts = {}
    for share in (True, False):
        shapes = []
        hook = record_input_shapes(model, shapes)
        got = sequence_logprobs(model, ids, mask, at, temperature=0.9, chunk_rows=8, share_prefix=share)
        hook.remove()
        counts[share] = (sum(b * n for b, n in shapes), shapes)
        if share:
            shared = got
    torch.testing.assert_close(shared, got, atol=1e-5, rtol=0)
    shapes = counts[True][1]
    if common:
        assert shapes[0] == (1, common), shapes
        shapes = shapes[1:]
    assert [shape[0] for shape in shapes[::2]] == [2, 2] and all(shape[0] == 8 for shape in shapes[1::2]), shapes
    assert all(35 <= shape[1] <= 38 for shape in shapes[::2]), shapes  # (a chunk's widest head, past the common part)
    assert counts[True][0] < 0.6 * counts[False][0], counts


def test_the_reference_pass_takes_whole_groups_per_chunk_when_that_is_cheaper():
    """Rows of 8 prompts interleaved (row r answers prompt r % 8), completions of one length: chunks by length
    would each hold 8 distinct prompts; the pass takes the rows by prompt instead (2 groups per chunk of 8)
    and gives the plain pass's log-probs."""
    model = tiny_llama()
    ids, mask = grouped_batch(prompts=8, scattered=True, lengths=(5, 6))
    ends = [int(m.nonzero().max()) for m in mask]
    order, grouped = chunk_order(model, "cache", ids, mask, 40, ends, 8)
    assert grouped and all(len({r % 8 for r in order[i:i + 8]}) == 2 for i in range(0, 32, 8)), order
    torch.testing.assert_close(sequence_logprobs(model, ids, mask, 40, chunk_rows=8),
                               sequence_logprobs(model, ids, mask, 40, chunk_rows=8, share_prefix=False),
                               atol=1e-5, rtol=0)


def test_the_reference_pass_keeps_one_forward_per_chunk_for_short_distinct_or_windowed_prompts():
    """No prompt encoded apart where that does not pay or cannot be done: prompts shorter than GROUP_PROMPT_MIN
    (the toy tasks'), or with fewer tokens of their own past a beginning all share (encoded once anyway),
    prompts that all differ, and a sliding-window model (its window counts cache columns)."""
    llama, ends = tiny_llama(), list(range(42, 58))
    short = grouped_batch(prompt=GROUP_PROMPT_MIN - 8)
    after_common = grouped_batch(prompt=GROUP_PROMPT_MIN + 4, common=16)  # (their own parts: 20-23 tokens)
    distinct = grouped_batch(prompts=16, k=1)
    for model, (ids, mask) in ((llama, short), (llama, after_common), (llama, distinct),
                               (sliding_mistral(), grouped_batch())):
        order, grouped = chunk_order(model, "cache", ids, mask, 40, ends, 8)
        assert not grouped and order == list(range(16))
    assert chunk_order(llama, "cache", *grouped_batch(), 40, ends, 8)[1]


def test_the_lora_reference_shows_its_config_so_its_pass_can_share():
    from peft import LoraConfig, get_peft_model

    from textrl.lm.policy import AdaptersOff

    peft = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    reference = AdaptersOff(peft)
    assert reference.config is peft.config and full_attention(reference)
