"""The generator contract: extending the KV cache by any number of columns per row (ragged, masked slots
between) gives the log-probs of one parallel forward over each row's real tokens; sampling follows the
sampling config."""

import pytest
import torch
from textrl.envs.toy import tiny_gpt2
from transformers import LlamaConfig, LlamaForCausalLM

from textrl.lm.decoding import CachedForward, positions_from_mask
from textrl.lm.generate import HFGenerator
from textrl.logprobs import token_logprobs

V = 40


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)
    return LlamaForCausalLM(cfg).eval()


def parallel_next_logprobs(model, rows: list[list[int]]) -> torch.Tensor:
    """log softmax of the next-token logits after each row's tokens, from one left-padded forward."""
    L = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("build", [lambda: tiny_gpt2(V), tiny_llama], ids=["gpt2", "llama"])
def test_ragged_extends_equal_one_parallel_forward(build):
    model = build()
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    rows = [list(p) for p in prompts]
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    fwd = CachedForward(model)
    fwd.prefill(ids, mask)
    # three appends: ragged (2, 0, 3 real columns of 3), one token each, ragged with a masked slot in between
    appends = [torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]]), torch.ones(3, 1, dtype=torch.long),
               torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1]])]
    for m in appends:
        m = m.bool()
        tokens = torch.randint(3, V, m.shape, generator=g)
        for r in range(3):
            rows[r] += tokens[r][m[r]].tolist()
        fwd.extend(tokens, m)
        expected = parallel_next_logprobs(model, rows)
        got = torch.log_softmax(fwd.next_logits, -1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_generator_samples_with_its_config_and_returns_the_tempered_logprob():
    model = tiny_gpt2(V)
    ids, mask = torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    gen = HFGenerator(model, temperature=0.7, top_k=3, rng=torch.Generator().manual_seed(0), min_new_tokens=2,
                      stop_ids=(1,))
    gen.prefill(ids, mask)
    for step in range(4):
        logits = gen.forward.next_logits.clone()
        tokens, logprobs = gen.sample()
        allowed = logits.clone()
        if step < 2:
            allowed[:, 1] = float("-inf")
        top3 = torch.topk(allowed, 3, -1).indices
        assert all(t in top3[i] for i, t in enumerate(tokens.tolist()))  # top-k respected
        if step < 2:
            assert not (tokens == 1).any()  # the stop token is forbidden for min_new_tokens draws
        torch.testing.assert_close(logprobs, token_logprobs(logits, tokens, 0.7))  # full tempered distribution
        torch.testing.assert_close(logprobs, torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[:, None])[:, 0])
        gen.extend(tokens[:, None], torch.ones(2, 1, dtype=torch.bool))
    gen.finish()
    assert gen.sampler.rounds == 0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        HFGenerator(model, temperature=0.0)


def test_sampling_stream_checkpoints_and_a_state_from_another_device_type_is_refused():
    model = tiny_gpt2(V)
    ids, mask = torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]])

    def draw(gen):
        gen.prefill(ids, mask)
        return torch.stack([gen.sample()[0] for _ in range(8)])

    gen = HFGenerator(model, rng=torch.Generator().manual_seed(0))
    state = gen.rng_state()
    first = draw(gen)
    gen.load_rng_state(state)
    assert torch.equal(draw(gen), first)  # the saved stream continues exactly
    with pytest.raises(ValueError, match="another device type"):
        gen.load_rng_state(torch.zeros(16, dtype=torch.uint8))  # a CUDA (Philox) generator's 16-byte state


@pytest.mark.parametrize("build", [lambda: tiny_gpt2(V), tiny_llama], ids=["gpt2", "llama"])
def test_repeated_prompts_are_encoded_once_and_decode_as_if_each_had_its_own(build):
    """k completions per prompt (rows 0, 2, 3 share one prompt, rows 1, 4 another): the prefill encodes the
    2 distinct prompts and shares their cache; every later step's log-probs equal an unshared cache's."""
    model = build()
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7], [5, 6, 7], [8, 9]]
    ids = torch.tensor([[0] * (3 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (3 - len(p)) + [1] * len(p) for p in prompts])
    shared, alone = CachedForward(model), CachedForward(model, share_prefixes=False)
    shared.prefill(ids, mask)
    alone.prefill(ids, mask)
    assert (shared.prefill_rows, alone.prefill_rows) == (2, 5)
    g = torch.Generator().manual_seed(0)
    for step in range(6):  # the rows diverge from their first token; row 3 ends after step 2
        torch.testing.assert_close(torch.log_softmax(shared.next_logits, -1),
                                   torch.log_softmax(alone.next_logits, -1), atol=1e-5, rtol=0)
        tokens = torch.randint(3, V, (5, 1), generator=g)
        live = torch.tensor([[True], [True], [True], [step < 2], [True]])
        shared.extend(tokens, live)
        alone.extend(tokens, live)
    distinct = CachedForward(model)
    distinct.prefill(ids[:2], mask[:2])
    assert distinct.prefill_rows == 2  # no repeats: nothing to share
