"""Does sampling in bf16 bias the KL to the reference? The policy and the reference are the same weights, so the
true KL is 0; the k1 estimate log π(a) − log π_ref(a) of the sampled tokens shows what the numbers add.

    python benchmarks/bf16_kl.py                                   # SmolLM2-135M on the CPU, fp32 and bf16
    python benchmarks/bf16_kl.py --device cuda --model random:.gpu/qwen2-0.5b-shape --tokenizer .gpu/smollm2-135m

For each dtype the policy and its reference copy are loaded in it; textrl's rollout samples with its KV cache
(``sampling.decoder`` ``--decoder``, default ``auto``: the compiled step on CUDA) and the KL wrapper's
sequence reference pass scores the finished sequences in one forward, both with the log-softmax in fp32
(what ``textrl train`` does). Printed per dtype: the mean k1 per completion ± its standard error over the
rows (a bias shows as a mean several SE above 0: sampling picks the tokens whose rounded logit came out
high), the mean per token, and the largest |log π| difference between the sampler and a parallel forward of
the policy itself (the rounding alone). textrl keeps rollouts in fp32 (README, "bf16"); this is the check
that decides whether a GPU may sample in bf16. ``--temperature`` is the sampling temperature (the KL's too).
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from fast_rollouts import build  # (this folder: SmolLM2, or random weights of a config's shape)
from rollout_vs_generate import PROMPTS
from textrl.envs import KLPenalty, TextGenVectorEnv

from textrl.lm.collect import collect_tokens
from textrl.lm.decoding import sequence_logprobs
from textrl.lm.generate import HFGenerator
from textrl.lm.models import load_tokenizer


def measure(name: str, tok, dtype: torch.dtype, device: torch.device, rows: int, tokens: int, reps: int,
            temperature: float, decoder: str) -> tuple[float, float, float, float]:
    """``(mean k1 per completion, its standard error, mean k1 per token, max |log π sampler − log π forward|)``
    over ``reps`` rollouts of ``rows`` × ``tokens`` (EOS allowed; at most ``tokens``)."""
    policy = build(name, device, dtype)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    env = KLPenalty(TextGenVectorEnv(rows, tok, PROMPTS, lambda p, c: torch.zeros(len(c)), max_new_tokens=tokens,
                                     pad_token_id=pad, device=device, vocab_size=policy.config.vocab_size),
                    copy.deepcopy(policy), kl_coef=0.0, temperature=temperature, reference_pass="sequence")
    per_row, per_token, drift = [], [], 0.0
    for rep in range(reps):
        gen = HFGenerator(policy, temperature, rng=torch.Generator(device=device).manual_seed(rep), decoder=decoder,
                          stop_ids=(env.unwrapped.eos_token_id,))
        ro = collect_tokens(env, gen, seed=rep)
        kl = torch.where(ro.action_mask, ro.kl, 0.0).double()
        per_row += kl.sum(1).tolist()
        per_token.append(kl[ro.action_mask])
        again = sequence_logprobs(policy, ro.input_ids, ro.attention_mask, ro.response_start, temperature)
        drift = max(drift, float((again - ro.logprobs)[ro.action_mask].abs().max()))
    mean = sum(per_row) / len(per_row)
    se = math.sqrt(sum((x - mean) ** 2 for x in per_row) / (len(per_row) - 1) / len(per_row))
    del policy, env
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return mean, se, float(torch.cat(per_token).mean()), drift


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, or random:PATH (random weights of PATH's config)")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct", help="name or path")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--decoder", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = ap.parse_args()
    device, tok = torch.device(args.device), load_tokenizer(args.tokenizer)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{where}, torch {torch.__version__}; {args.model}, {args.reps} rollouts of {args.rows} rows x at most "
          f"{args.tokens} tokens, temperature {args.temperature}, decoder {args.decoder}; policy = reference "
          "(the true KL is 0)\n")
    print("| dtype | k1 per completion (mean ± SE) | k1 per token | max abs(log pi sampler - log pi forward) |")
    print("|---|---|---|---|")
    for name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        mean, se, token, drift = measure(args.model, tok, dtype, device, args.rows, args.tokens, args.reps,
                                         args.temperature, args.decoder)
        print(f"| {name} | {mean:+.4f} ± {se:.4f} ({mean / se if se > 0 else float('nan'):+.1f} SE) | {token:+.2e} "
              f"| {drift:.2e} |", flush=True)


if __name__ == "__main__":
    main()
