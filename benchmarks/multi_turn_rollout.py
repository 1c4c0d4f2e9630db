"""A multi-turn rollout against a single-turn rollout of the same number of response tokens.

    python benchmarks/multi_turn_rollout.py [--model smollm2] [--batch 16] [--turns 4] [--turn-tokens 20] [--reps 3]
    python benchmarks/multi_turn_rollout.py --device cuda --model random:.gpu/smollm2-135m --batch 64

(a) single-turn: ``collect_tokens`` on ``KLPenalty(TextGenVectorEnv)`` (reference pass "sequence", as
    ``textrl train``), every row generating exactly N = turns × (turn tokens + reply tokens) tokens.
(b) multi-turn: the same wrapper on a :class:`~textrl.envs.turns.MultiTurnEnv` whose rows write ``turns``
    agent turns of ``turn tokens`` each, the env answering each turn (but the last) with a user message,
    so that every row fills the same N response columns: agent tokens are sampled one step each, the env's
    tokens are appended to the KV caches in the step that ends the turn.
Both use the SmolLM2 tokenizer and chat template; EOS is suppressed so that lengths are fixed. Prints the
times, (b)/(a) (the target: ≤ 1.2) and the share of (b)'s columns that were env tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from textrl.envs import KLPenalty, MultiTurnEnv, Reply, TextGenVectorEnv

from textrl.lm.collect import collect_tokens
from textrl.lm.generate import HFGenerator
from textrl.lm.models import load_causal_lm, load_tokenizer

PROMPTS = ["Tell me about rivers.", "What should I cook tonight?", "Describe your favourite city.",
           "How do plants grow?", "Why is the sky blue?", "Give me a travel tip."]


class Chatty(MultiTurnEnv):
    """Answers every turn with the same short user message until the last turn."""

    def respond(self, state, reply):
        state["turn"] = state.get("turn", 0) + 1
        if state["turn"] == self.max_turns:
            return Reply(reward=len(reply) / 100, done=True)
        return Reply("Go on, tell me more.", reward=0.0)


def zero(prompts, completions):
    return torch.zeros(len(completions))


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    if name == "smollm2":
        return load_causal_lm("smollm2-135m-instruct").eval().to(device, dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with device:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name[7:]), dtype=dtype).eval()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, or random:PATH (random weights of PATH's config)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    tok = load_tokenizer("smollm2-135m-instruct" if args.model == "smollm2" else args.model[7:])
    policy = build_model(args.model, device, dtype)
    reference = copy.deepcopy(policy)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    K, turns = args.turn_tokens, args.turns
    # (b) first, to learn how many columns an episode fills: its replies' tokens are fixed by the template
    multi = Chatty(args.batch, tok, prompts, max_turns=turns, max_turn_tokens=K, max_new_tokens=turns * (K + 40),
                   pad_token_id=pad, device=device, prompt_order="sequential", vocab_size=policy.config.vocab_size)
    stop = multi.stop_token_ids

    def rollout(env, n_agent):
        gen = HFGenerator(policy, 1.0, rng=torch.Generator(device=device).manual_seed(0), min_new_tokens=n_agent,
                          stop_ids=stop)
        return collect_tokens(KLPenalty(env, reference, 0.05, reference_pass="sequence"), gen, seed=0)

    ro = rollout(multi, turns * K)
    columns = int(ro.attention_mask[:, ro.response_start:].sum(1).max())
    agent = int(ro.action_mask.sum(1).max())
    single = TextGenVectorEnv(args.batch, tok, prompts, zero, max_new_tokens=columns, chat_template=True,
                              pad_token_id=pad, device=device, prompt_order="sequential",
                              vocab_size=policy.config.vocab_size)
    rollout(single, columns)  # warm-up
    times = {"single": [], "multi": []}
    for _ in range(args.reps):
        times["single"].append(timed(lambda: rollout(single, columns), device))
        times["multi"].append(timed(lambda: rollout(multi, turns * K), device))
    a, b = statistics.median(times["single"]), statistics.median(times["multi"])
    print(f"model {args.model} on {device} ({args.dtype}), batch {args.batch}: {columns} response columns per row")
    print(f"(a) single-turn, {columns} agent tokens:                 {a:.2f} s")
    print(f"(b) multi-turn, {turns} turns x {K} agent tokens + replies: {b:.2f} s "
          f"({agent} agent tokens, {columns - agent} env tokens = {(columns - agent) / columns:.0%})")
    print(f"(b)/(a) = {b / a:.2f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
