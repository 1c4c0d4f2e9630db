"""textrl's decoders (issue 16) against ``model.generate``: one rollout of B rows × N new tokens, same weights.

    python benchmarks/fast_rollouts.py [--models smollm2] [--batch 32] [--lengths 128] [--decoders dynamic static compiled]
    python benchmarks/fast_rollouts.py --device cuda --dtype bf16 --batch 64 256 --lengths 256 \
        --models random:.gpu/qwen2-0.5b-shape random:.gpu/qwen2-1.5b-shape     # GPU: random weights, real shapes

(a) textrl: ``collect_tokens`` on ``KLPenalty(TextGenVectorEnv)`` with ``reference_pass="sequence"`` (one
    reference forward over the finished batch, `textrl train`'s default) and each ``sampling.decoder``:
    dynamic (the reference loop), static (preallocated cache), compiled (static + torch.compile'd step;
    CUDA graphs on CUDA). The compile happens in the untimed warm-up.
(b) ``model.generate`` (sampling, its dynamic cache) + one reference forward over the sequences;
(c) ``model.generate(cache_implementation="static")``, generate's own static-cache mode (transformers
    compiles its forward where it supports that) + the same reference forward.
Every row generates exactly N tokens (EOS suppressed on both sides); all share the same scorer. Then the
prefill of B rows that are k = 8 completions of B/8 prompts, shared (each prompt encoded once) and
unshared: the ratio of their times. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy

import torch
from rollout_vs_generate import PROMPTS, scorer, time_it  # (this folder: the same prompts, scorer and clock)
from textrl.envs import KLPenalty, TextGenVectorEnv

from textrl.lm.collect import collect_tokens
from textrl.lm.decoding import CachedForward, sequence_logprobs
from textrl.lm.generate import HFGenerator
from textrl.lm.models import load_causal_lm, load_tokenizer


def build(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if name == "smollm2":
        return load_causal_lm("smollm2-135m-instruct").eval().to(device, dtype)
    with device:  # random weights of a real shape, initialised on the device
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name[7:]), dtype=dtype).eval()


def rollout_fn(policy, ref, tok, pad_id, B: int, n: int, decoder: str, device):
    env = KLPenalty(TextGenVectorEnv(B, tok, PROMPTS, scorer, max_new_tokens=n, pad_token_id=pad_id, device=device),
                    ref, reference_pass="sequence")
    generator = HFGenerator(policy, rng=torch.Generator(device=device).manual_seed(0), min_new_tokens=n,
                            stop_ids=(env.unwrapped.eos_token_id,), decoder=decoder)

    def run():
        ro = collect_tokens(env, generator, seed=0)
        assert int(ro.action_mask.sum()) == B * n
    return run, generator


def generate_fn(policy, ref, tok, pad_id, B: int, n: int, device, static: bool):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    extra = {"cache_implementation": "static"} if static else {}

    @torch.no_grad()
    def run():
        out = policy.generate(**enc, do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0, pad_token_id=pad_id,
                              **extra)
        P = enc["input_ids"].shape[1]
        mask = torch.cat([enc["attention_mask"], torch.ones_like(out[:, P:])], dim=1)
        sequence_logprobs(ref, out, mask, P)
        scorer(prompts, tok.batch_decode(out[:, P:], skip_special_tokens=True))
    return run


def prefill_ratio(policy, tok, B: int, k: int, reps: int, device) -> tuple[float, float]:
    prompts = [PROMPTS[i // k % len(PROMPTS)] for i in range(B)]  # B/k prompts, each k times in a row
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    shared, alone = CachedForward(policy), CachedForward(policy, share_prefixes=False)
    ts = time_it(lambda: shared.prefill(enc["input_ids"], enc["attention_mask"]), reps, device)
    tu = time_it(lambda: alone.prefill(enc["input_ids"], enc["attention_mask"]), reps, device)
    assert shared.prefill_rows == B // k and alone.prefill_rows == B
    return ts, tu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128])
    parser.add_argument("--batch", nargs="+", type=int, default=[32])
    parser.add_argument("--decoders", nargs="+", default=["dynamic", "static", "compiled"])
    parser.add_argument("--baselines", nargs="+", default=["generate", "generate-static"])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct", help="name or path (the prompts' ids)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tok = load_tokenizer(args.tokenizer)
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")  # SmolLM2's PAD equals its EOS; pick a distinct one
    tok.padding_side = "left"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{where}, {args.dtype}, torch {torch.__version__}; median of {args.reps} after a warm-up\n")
    print("| model | batch | new tokens | run | seconds | tokens/s | vs generate |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        policy = build(name, device, dtype)
        ref = copy.deepcopy(policy)
        label = name.rsplit("/", 1)[-1]
        for B in args.batch:
            for n in args.lengths:
                times = {}
                for base in args.baselines:
                    fn = generate_fn(policy, ref, tok, pad_id, B, n, device, static=base == "generate-static")
                    times[base] = time_it(fn, args.reps, device)
                for decoder in args.decoders:
                    fn, generator = rollout_fn(policy, ref, tok, pad_id, B, n, decoder, device)
                    times[f"textrl {decoder}"] = time_it(fn, args.reps, device)
                    if getattr(generator.forward, "fallback", None):
                        print(f"(textrl {decoder}: the compiled step fell back to eager: {generator.forward.fallback})")
                base = times.get("generate")
                for run, t in times.items():
                    ratio = f"{base / t:.2f}×" if base else ""
                    print(f"| {label} | {B} | {n} | {run} | {t:.2f} | {B * n / t:.0f} | {ratio} |", flush=True)
        rows = max(*args.batch, 8)
        ts, tu = prefill_ratio(policy, tok, rows, 8, max(args.reps, 3), device)
        print(f"\nprefill of {rows} rows = 8 completions × {rows // 8} prompts ({label}): "
              f"shared {ts * 1e3:.1f} ms, unshared {tu * 1e3:.1f} ms, ratio {ts / tu:.2f} (1/8 = 0.125)\n", flush=True)
        del policy, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
