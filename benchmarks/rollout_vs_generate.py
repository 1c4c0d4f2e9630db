"""textrl's env rollout vs the sequence-level path TRL uses, same weights, same scorer.

    python benchmarks/rollout_vs_generate.py [--models gpt2-2l gpt2-6l smollm2] [--lengths 32 64 128] [--reps 3]

(a) textrl: ``collect_tokens`` on ``KLPenalty(TextGenVectorEnv)``: the policy samples with its KV cache, the
    reference (a separate copy of the same weights) advances one token per step with its own KV cache,
    and the scorer scores each completion when it ends.
(b) baseline: ``model.generate`` (sampling, KV cache) + one parallel reference forward over the full
    sequences for the per-token log-probs + the same scorer.
Batch 16, every row generates exactly N tokens (EOS suppressed on both sides). All models use the
SmolLM2 tokenizer (49 152 tokens) so the output layer costs what it costs in practice. Prints (a)/(b),
tokens/s, and (a) at 128 tokens over (a) at 32 tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from textrl.envs import KLPenalty, TextGenVectorEnv

from textrl.lm.collect import collect_tokens
from textrl.lm.decoding import sequence_logprobs
from textrl.lm.generate import HFGenerator
from textrl.lm.models import load_causal_lm, load_tokenizer

PROMPTS = [
    "The weather today is", "Once upon a time, a small robot", "The best way to learn a language is",
    "In the morning I like to", "Here is a short poem about rivers:", "My favourite book is",
    "Scientists recently discovered that", "The recipe starts with", "A good friend is someone who",
    "The city at night looks", "To fix a flat tyre, first", "The history of tea begins",
]


def scorer(prompts, completions):
    return torch.tensor([len(set(c.split())) / 10.0 for c in completions])


def build(name: str, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    if name == "smollm2":
        return load_causal_lm("smollm2-135m-instruct").eval()
    layers, width = {"gpt2-2l": (2, 128), "gpt2-6l": (6, 384)}[name]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=width, n_head=max(2, width // 64), n_positions=512,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def time_it(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-2l", "gpt2-6l", "smollm2"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    tok = load_tokenizer("smollm2-135m-instruct")
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")  # SmolLM2's PAD equals its EOS; pick a distinct one
    tok.padding_side = "left"
    B = args.batch
    print(f"torch threads: {torch.get_num_threads()}, batch {B}\n")
    print("| model | new tokens | (a) textrl env rollout (s) | (b) generate + ref forward (s) | (a)/(b) | (a) tokens/s |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        policy = build(name, len(tok))
        ref = copy.deepcopy(policy)
        a_times = {}
        for n in args.lengths:
            env = KLPenalty(TextGenVectorEnv(B, tok, PROMPTS, scorer, max_new_tokens=n, pad_token_id=pad_id), ref)
            gen = torch.Generator().manual_seed(0)

            def run_a(env=env, n=n, gen=gen, policy=policy):
                generator = HFGenerator(policy, rng=gen, min_new_tokens=n, stop_ids=(env.unwrapped.eos_token_id,))
                ro = collect_tokens(env, generator, seed=0)
                assert int(ro.action_mask.sum()) == B * n

            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
            enc = tok(prompts, return_tensors="pt", padding=True)

            @torch.no_grad()
            def run_b(enc=enc, n=n, policy=policy, ref=ref, prompts=prompts):
                out = policy.generate(**enc, do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0,
                                      pad_token_id=pad_id)
                P = enc["input_ids"].shape[1]
                mask = torch.cat([enc["attention_mask"], torch.ones_like(out[:, P:])], dim=1)
                sequence_logprobs(ref, out, mask, P)
                scorer(prompts, tok.batch_decode(out[:, P:], skip_special_tokens=True))

            ta, tb = time_it(run_a, args.reps), time_it(run_b, args.reps)
            a_times[n] = ta
            print(f"| {name} | {n} | {ta:.3f} | {tb:.3f} | {ta / tb:.2f} | {B * n / ta:.0f} |", flush=True)
        if len(args.lengths) > 1:
            lo, hi = min(args.lengths), max(args.lengths)
            print(f"| {name} | (a) {hi} / (a) {lo} | {a_times[hi] / a_times[lo]:.2f} | | | |", flush=True)


if __name__ == "__main__":
    main()
