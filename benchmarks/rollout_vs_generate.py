"""textrl's env rollout vs the sequence-level path TRL uses, same weights, same scorer.

    python benchmarks/rollout_vs_generate.py [--models gpt2-2l gpt2-6l smollm2] [--lengths 32 64 128] [--reps 3]
    python benchmarks/rollout_vs_generate.py --device cuda --dtype bf16 --batch 64 --lengths 128 256 \
        --models random:.gpu/smollm2-135m random:.gpu/smollm2-1.7b     # GPU: random weights of real shapes

(a) textrl: ``collect_tokens`` on ``KLPenalty(TextGenVectorEnv)``: the policy samples with its KV cache, the
    reference (a separate copy of the same weights) either advances one token per step with its own KV
    cache (``--reference-pass per_token``, the default here, as the CPU table in the README) or runs once
    over the finished sequences (``sequence``: `textrl train`'s default), and the scorer scores each
    completion when it ends.
(b) baseline: ``model.generate`` (sampling, KV cache) + one parallel reference forward over the full
    sequences for the per-token log-probs + the same scorer.
Batch 16, every row generates exactly N tokens (EOS suppressed on both sides). All models use the
SmolLM2 tokenizer (49 152 tokens) so the output layer costs what it costs in practice. Prints (a)/(b),
tokens/s, and (a) at 128 tokens over (a) at 32 tokens.

``random:PATH`` builds the architecture of PATH's config.json with seeded random weights (timing does not
depend on the weights; EOS is suppressed) and uses PATH's tokenizer, so a GPU machine without the
checkpoint can time real shapes. On cuda every timing synchronises the device first.
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


def build(name: str, vocab: int, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if name == "smollm2":
        return load_causal_lm("smollm2-135m-instruct").eval().to(device, dtype)
    if name.startswith("random:"):
        with device:  # initialise on the device: a 1.7B model's random init on the CPU takes a while
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name[7:]), dtype=dtype).eval()
    layers, width = {"gpt2-2l": (2, 128), "gpt2-6l": (6, 384)}[name]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=width, n_head=max(2, width // 64), n_positions=512,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval().to(device, dtype)


def synchronizer(device: torch.device):
    """A call that waits for ``device``'s queued work (CUDA), or does nothing (CPU): what a timing needs."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_it(fn, reps: int, device: torch.device) -> float:
    sync = synchronizer(device)
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-2l", "gpt2-6l", "smollm2"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--reference-pass", default="per_token", choices=["per_token", "sequence"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    randoms = [m[7:] for m in args.models if m.startswith("random:")]
    tok = load_tokenizer(randoms[0] if randoms else "smollm2-135m-instruct")  # every shape here: SmolLM2's vocab
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")  # SmolLM2's PAD equals its EOS; pick a distinct one
    tok.padding_side = "left"
    B = args.batch
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{where}, {args.dtype}, batch {B}, reference pass {args.reference_pass}, torch {torch.__version__}\n")
    print("| model | params | new tokens | (a) textrl env rollout (s) | (b) generate + ref forward (s) | (a)/(b) "
          "| (a) tokens/s | (b) tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        policy = build(name, len(tok), device, dtype)
        ref = copy.deepcopy(policy)
        params = f"{sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M"
        label = name.rsplit("/", 1)[-1]
        a_times = {}
        for n in args.lengths:
            env = KLPenalty(TextGenVectorEnv(B, tok, PROMPTS, scorer, max_new_tokens=n, pad_token_id=pad_id,
                                             device=device, vocab_size=policy.config.vocab_size), ref,
                            reference_pass=args.reference_pass)
            gen = torch.Generator(device=device).manual_seed(0)

            def run_a(env=env, n=n, gen=gen, policy=policy):
                generator = HFGenerator(policy, rng=gen, min_new_tokens=n, stop_ids=(env.unwrapped.eos_token_id,))
                ro = collect_tokens(env, generator, seed=0)
                assert int(ro.action_mask.sum()) == B * n

            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
            enc = tok(prompts, return_tensors="pt", padding=True).to(device)

            @torch.no_grad()
            def run_b(enc=enc, n=n, policy=policy, ref=ref, prompts=prompts):
                out = policy.generate(**enc, do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0,
                                      pad_token_id=pad_id)
                P = enc["input_ids"].shape[1]
                mask = torch.cat([enc["attention_mask"], torch.ones_like(out[:, P:])], dim=1)
                sequence_logprobs(ref, out, mask, P)
                scorer(prompts, tok.batch_decode(out[:, P:], skip_special_tokens=True))

            ta, tb = time_it(run_a, args.reps, device), time_it(run_b, args.reps, device)
            a_times[n] = ta
            print(f"| {label} | {params} | {n} | {ta:.3f} | {tb:.3f} | {ta / tb:.2f} | {B * n / ta:.0f} "
                  f"| {B * n / tb:.0f} |", flush=True)
        if len(args.lengths) > 1:
            lo, hi = min(args.lengths), max(args.lengths)
            print(f"| {label} | | (a) {hi} / (a) {lo} | {a_times[hi] / a_times[lo]:.2f} | | | | |", flush=True)
        del policy, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
