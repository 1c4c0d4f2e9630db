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
unshared: the ratio of their times, for the bare prompts and (where the tokenizer has one) in the chat
template.

Variable lengths (``--variable N``, default 128; 0 skips): the default task's prompts (Cheerful-v0, chat
template) at its temperature 0.7, EOS allowed, at most N new tokens: rows end at different steps. Useful
tokens/s (the completion tokens up to and including EOS, over the time) of the textrl dynamic decoder (rows
that ended leave the KV cache), the same decoder keeping every row to the end (as ``generate`` does), and
``generate`` (stops when every row has ended) + the reference forward. ``--episodes N`` (a multiple of the
batch B): N completions, in N/B batches for those runs, and through B slots with continuous batching
(``collect_episodes``: a slot whose episode ended starts the next prompt at once). Each run's decode steps
are printed too, and the step bound: generate's steps over ⌈useful tokens / B⌉, the fewest steps B full rows
need — what no scheduler of B rows can beat where a step costs the same whatever its rows.
``--variable-runs`` adds the static and compiled decoders (``static``, ``compiled``: batches;
``continuous-static``, ``continuous-compiled``: through slots). ``--eos-rate R``: the policy ends a
completion with probability R per step (random weights never sample EOS; the GPU check's ``continuous``
step). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from rollout_vs_generate import (  # (this folder: the same prompts, scorer and clock)
    PROMPTS,
    scorer,
    synchronizer,
    time_it,
)
from textrl.envs import KLPenalty, TextGenVectorEnv
from textrl.envs.cheerful import cheerful_env

from textrl.lm.collect import collect_episodes, collect_tokens
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


def stop_at_rate(model, eos: int, rate: float, temperature: float):
    """Make ``model`` end a completion with probability ``rate`` at every step (at ``temperature``): its EOS
    logit is set so, whatever the other logits. Random weights almost never sample EOS; with this their
    completions have geometric lengths (mean 1/rate, cut at the limit) and continuous batching has rows to
    refill. A forward hook, so ``generate`` and every decoder see the same logits. Returns the hook's handle.
    Compiled steps do not guard on hooks: the compile cache is cleared here, so none traced without it runs."""
    import math

    if not 0 < rate < 1:
        raise ValueError(f"--eos-rate must lie in (0, 1), got {rate}")
    torch._dynamo.reset()

    def hook(module, args, out):
        logits = out.logits.float()
        others = torch.cat([logits[..., :eos], logits[..., eos + 1:]], -1) / temperature
        target = temperature * (torch.logsumexp(others, -1) + math.log(rate / (1 - rate)))
        out.logits[..., eos] = target.to(out.logits.dtype)
        return out
    return model.register_forward_hook(hook)


def rollout_fn(policy, ref, tok, pad_id, B: int, n: int, decoder: str, device):
    env = KLPenalty(TextGenVectorEnv(B, tok, PROMPTS, scorer, max_new_tokens=n, pad_token_id=pad_id, device=device,
                                     vocab_size=policy.config.vocab_size),
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


class KeepRows(HFGenerator):
    """The dynamic decoder without retiring rows that ended: every row is computed until the last one ends."""

    def retire(self, ended):
        pass


VARIABLE_RUNS = ("generate", "dynamic", "kept", "static", "compiled", "continuous", "continuous-static",
                 "continuous-compiled")


def variable_lengths(policy, ref, tok, pad_id, B: int, n: int, episodes: int, reps: int, device,
                     only: tuple[str, ...] = VARIABLE_RUNS, warmup: bool = True, eos_rate: float = 0.0
                     ) -> tuple[dict[str, tuple[float, int, int, int | None]], tuple[float, float] | None]:
    """``({run: (seconds, useful tokens, decode steps, floor)}, reference)`` of ``episodes`` completions, summed over
    ``reps`` (after
    a warm-up call unless ``warmup`` is False; without one the first run timed, ``generate``, also pays the
    process's first forwards): in batches of ``B`` rows (the env's draws from seed 0 on), and, when
    ``episodes > B``, through B slots with continuous batching (``collect_episodes``). A batch's decode steps
    are its longest completion's length; textrl's are counted (one ``sample`` per step). A continuous run's
    floor is :func:`greedy_steps` of its own episodes, summed over ``reps`` (each run samples its own: decoders
    agree to rounding, not to the bit); None for the others.
    ``eos_rate`` > 0: the policy ends a completion with that probability per step (:func:`stop_at_rate`).
    ``generate``'s reference forward is one plain forward over its sequences (no prefix shared, as after
    ``generate`` in TRL); ``reference``: its seconds, and those of textrl's pass over the last of the same
    sequences (the prefix all prompts share encoded once), timed apart (None without a ``generate`` run)."""
    env = KLPenalty(cheerful_env(B, tok, max_new_tokens=n, scorer=scorer, pad_token_id=pad_id, device=device,
                                 vocab_size=policy.config.vocab_size),
                    ref, reference_pass="sequence")
    eos = env.unwrapped.eos_token_id
    encs = []  # the prompts collect_tokens answers from seed 0 on, left-padded to column P
    for i in range(episodes // B):
        obs, info = env.reset(seed=0 if i == 0 else None)
        start, P = int(obs["attention_mask"].any(0).nonzero()[0]), int(info["response_start"][0])
        encs.append({"input_ids": obs["input_ids"][:, start:P], "attention_mask": obs["attention_mask"][:, start:P]})
    prompts = [""] * B  # (the benchmark's scorer reads the completions only)

    steps = {"n": 0, "floor": 0, "reference": 0.0}
    sequences = []  # generate's last (sequences, mask, response start)s, for the shared reference pass
    sync = synchronizer(device)

    @torch.no_grad()
    def generate() -> int:
        useful = 0
        sequences.clear()
        for enc in encs:
            out = policy.generate(**enc, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=n,
                                  eos_token_id=eos, pad_token_id=pad_id)
            P = enc["input_ids"].shape[1]
            new = out[:, P:]
            after_eos = (new == eos).long().cumsum(1) - (new == eos).long()  # tokens past each row's first EOS
            real = (after_eos == 0).long()
            sequences.append((out, torch.cat([enc["attention_mask"], real], dim=1), P))
            sync()
            t0 = time.perf_counter()
            sequence_logprobs(ref, *sequences[-1], share_prefix=False)  # one plain forward over the sequences
            sync()
            steps["reference"] += time.perf_counter() - t0
            scorer(prompts, tok.batch_decode(new * real + pad_id * (1 - real), skip_special_tokens=True))
            useful += int(real.sum())
            steps["n"] += int(real.sum(1).max())  # generate stops when its last row has ended
        return useful

    def batches(gen) -> int:
        return sum(int(collect_tokens(env, gen, seed=0 if i == 0 else None).action_mask.sum())
                   for i in range(episodes // B))

    def continuous(gen) -> int:
        lengths = collect_episodes(env, gen, episodes, seed=0).action_mask.sum(1)  # (in the order they started)
        steps["floor"] += greedy_steps(lengths.tolist(), B)
        return int(lengths.sum())

    runs = {"generate": generate} if "generate" in only else {}
    labels = {"dynamic": ("textrl dynamic", HFGenerator, "dynamic"),
              "kept": ("textrl dynamic, every row kept", KeepRows, "dynamic"),
              "static": ("textrl static", HFGenerator, "static"), "compiled": ("textrl compiled", HFGenerator, "compiled")}
    if episodes > B:
        labels["continuous"] = (f"textrl continuous ({B} slots)", HFGenerator, "dynamic")
        for d in ("static", "compiled"):
            labels[f"continuous-{d}"] = (f"textrl continuous, {d} ({B} slots)", HFGenerator, d)
    elif any(run.startswith("continuous") for run in only):
        print(f"(no continuous-batching run: --episodes {episodes} is not more than the batch {B})")
    for key, (label, cls, decoder) in labels.items():
        if key not in only:
            continue
        gen = cls(policy, temperature=0.7, rng=torch.Generator(device=device).manual_seed(0), stop_ids=(eos,),
                  decoder=decoder)
        gen.sample = counted(gen.sample, steps)
        runs[label] = (lambda gen=gen: continuous(gen)) if key.startswith("continuous") else \
            (lambda gen=gen: batches(gen))
    out, reference = {}, None
    hook = stop_at_rate(policy, eos, eos_rate, 0.7) if eos_rate > 0 else None
    try:
        for label, fn in runs.items():
            if warmup:
                fn()
            steps["n"] = steps["floor"] = steps["reference"] = 0  # the timed calls' steps
            out[label] = (*timed(fn, reps, device, warmup=False), steps["n"], steps["floor"] or None)
            if fn is generate:  # its reference forward again, as textrl's pass runs (the shared prefix once)
                reference = (steps["reference"], timed(lambda: shared_reference(ref, sequences), 1, device, False)[0])
    finally:
        if hook is not None:
            hook.remove()
            torch._dynamo.reset()  # (the compiled steps traced the hook)
    return out, reference


def reference_note(B: int, results: dict, reference: tuple[float, float], reps: int) -> str:
    """A line on ``generate``'s reference forward: its seconds, textrl's shared-prefix pass over the same
    sequences, and every textrl run against ``generate`` with that pass instead (what the decoding alone gains)."""
    plain, shared = reference
    shared *= reps  # (timed over one call's sequences)
    t, n, *_ = results["generate"]
    base = n / (t - plain + shared)
    ratios = ", ".join(f"{run}: {m / u / base:.2f}×" for run, (u, m, *_) in results.items() if run != "generate")
    return (f"batch {B}: generate's reference forward took {plain:.2f} s (plain); textrl's pass over the same "
            f"sequences, the prompts' shared prefix encoded once, {shared:.2f} s. Against generate with that pass "
            f"({t - plain + shared:.2f} s): {ratios}")


def shared_reference(ref, sequences) -> int:
    """textrl's reference pass (:func:`sequence_logprobs` with the shared prefix encoded once) over ``generate``'s
    sequences; returns 0 (tokens: see :func:`timed`)."""
    for out, mask, P in sequences:
        sequence_logprobs(ref, out, mask, P)
    return 0


def greedy_steps(lengths: list[int], slots: int) -> int:
    """The decode steps of episodes of ``lengths`` (in the order they start) through ``slots`` rows when a
    row starts the next episode in the step its episode ends and admits cost nothing: the floor of continuous
    batching for these episodes without knowing their lengths in advance."""
    import heapq

    ends = [0] * slots  # the step at which each row is free
    for n in lengths:
        heapq.heappush(ends, heapq.heappop(ends) + int(n))
    return max(ends)


def counted(sample, steps: dict):
    """``sample`` that adds one to ``steps["n"]`` per call (a decode step)."""
    def wrapper(*args, **kwargs):
        steps["n"] += 1
        return sample(*args, **kwargs)
    return wrapper


def timed(fn, reps: int, device, warmup: bool = True) -> tuple[float, int]:
    """(seconds, useful tokens) of ``reps`` calls of ``fn`` (after a warm-up call unless ``warmup`` is False)."""
    sync = synchronizer(device)
    if warmup:
        fn()
    seconds, tokens = 0.0, 0
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        tokens += fn()
        sync()
        seconds += time.perf_counter() - t0
    return seconds, tokens


def prefill_ratio(policy, tok, B: int, k: int, reps: int, device, chat: bool = False) -> tuple[float, float, int]:
    """(shared, unshared) seconds of the prefill of B rows that are k completions of B/k prompts, and the
    prompts' width in tokens; ``chat``: the prompts in the tokenizer's chat template, as the default task
    sends them (about 5× longer than the bare prompts)."""
    prompts = [PROMPTS[i // k % len(PROMPTS)] for i in range(B)]  # B/k prompts, each k times in a row
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    shared, alone = CachedForward(policy), CachedForward(policy, share_prefixes=False)
    ts = time_it(lambda: shared.prefill(enc["input_ids"], enc["attention_mask"]), reps, device)
    tu = time_it(lambda: alone.prefill(enc["input_ids"], enc["attention_mask"]), reps, device)
    assert shared.prefill_rows == B // k and alone.prefill_rows == B
    return ts, tu, enc["input_ids"].shape[1]


def print_variable(policy, ref, tok, pad_id, args, label: str, device) -> None:
    rate = f", EOS at a rate of {args.eos_rate} per step" if args.eos_rate else ""
    print(f"\nvariable lengths ({label}, Cheerful-v0 prompts, temperature 0.7, at most {args.variable} new tokens"
          f"{rate}, {args.reps} rollouts each):\n")
    print("| batch | episodes | run | seconds | useful tokens | useful tokens/s | decode steps | vs generate |")
    print("|---|---|---|---|---|---|---|---|")
    bounds, notes = [], []
    for B in args.batch:
        episodes = max(args.episodes, B)
        results, reference = variable_lengths(policy, ref, tok, pad_id, B, args.variable, episodes, args.reps,
                                              device, tuple(args.variable_runs), not args.no_warmup, args.eos_rate)
        base = results["generate"][1] / results["generate"][0] if "generate" in results else None
        for run, (t, n, steps, _) in results.items():
            ratio = f"{n / t / base:.2f}×" if base else ""
            print(f"| {B} | {episodes} | {run} | {t:.2f} | {n} | {n / t:.0f} | {steps} | {ratio} |", flush=True)
        if reference is not None:
            notes.append(reference_note(B, results, reference, args.reps))
        gen_steps = results["generate"][2] if "generate" in results else None
        floors = [f"{run}: {floor} steps" + (f", {gen_steps / floor:.2f}×" if gen_steps else "")
                  for run, (*_, floor) in results.items() if floor]  # its own episodes, refilled at once for free
        floors = f" (continuous batching's floor for its episodes: {'; '.join(floors)})" if floors else ""
        if "generate" in results:
            _, n, steps, _ = results["generate"]
            bounds.append(f"batch {B}: {steps} / ⌈{n} / {B}⌉ = {steps / -(-n // B):.2f}×{floors}")
        elif floors:
            bounds.append(f"batch {B}:{floors}")
    for note in notes:
        print(f"\n{note}")
    if bounds:  # at equal rows, a scheduler can at best run every step full: useful tokens / rows steps
        print(f"\nstep bound (generate's decode steps over the fewest steps that B full rows need for its useful "
              f"tokens; what continuous batching could save where a step costs the same whatever its rows): "
              f"{'; '.join(bounds)}")


#: a system prompt of about 200 tokens (SmolLM2's tokenizer), as tasks with instructions or few-shot examples send
SYSTEM = " ".join(["You are a careful assistant. Answer in a warm, friendly tone, in one or two sentences, and stay "
                   "on the topic the user gives. Avoid lists, headings and code. If the request is unclear, make a "
                   "reasonable guess rather than asking a question."] * 4)


def system_prompt_line(policy, tok, B: int, reps: int, device, label: str, new: int = 64) -> str:
    """The prefill of ``B`` distinct prompts that begin with the same long system prompt (:data:`SYSTEM`), and
    the reference pass over them with ``new`` tokens each, with that beginning encoded once and without."""
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}]
             for i in range(B)]
    enc = tok([tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats],
              return_tensors="pt", padding=True).to(device)
    shared, alone = CachedForward(policy), CachedForward(policy, share_prefixes=False)
    ts = time_it(lambda: shared.prefill(enc["input_ids"], enc["attention_mask"]), reps, device)
    tu = time_it(lambda: alone.prefill(enc["input_ids"], enc["attention_mask"]), reps, device)
    P = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"], torch.randint(0, 1000, (B, new), device=device)], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones(B, new, dtype=torch.long, device=device)], 1)
    rs = time_it(lambda: sequence_logprobs(policy, ids, mask, P), reps, device)
    ru = time_it(lambda: sequence_logprobs(policy, ids, mask, P, share_prefix=False), reps, device)
    return (f"{B} distinct prompts after a {shared.prefill_shared}-token system prompt ({label}, prompts of {P} tokens,"
            f" chat template): prefill {ts * 1e3:.0f} ms shared, {tu * 1e3:.0f} ms unshared (ratio {ts / tu:.2f}); "
            f"reference pass with {new} new tokens {rs * 1e3:.0f} ms shared, {ru * 1e3:.0f} ms unshared "
            f"(ratio {rs / ru:.2f})")


def admit_line(policy, tok, B: int, reps: int, device, label: str) -> str:
    """Continuous batching's admit of 1 and of 4 new prompts into a pool of ``B`` rows, every prompt after the same
    long system prompt (:data:`SYSTEM`): starting from the beginning the pool's prefill encoded (what an admit
    does), against encoding it again (what it did before: once among the admitted prompts, whole for one).
    Median of ``reps``, each on a pool just prefilled (not timed)."""
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}]
             for i in range(B + 4)]
    enc = tok([tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats],
              return_tensors="pt", padding=True).to(device)
    ids, mask, sync, out = enc["input_ids"], enc["attention_mask"], synchronizer(device), []
    for k in (1, 4):
        times = {True: [], False: []}
        for _ in range(reps + 1):  # (the first: a warm-up)
            for reuse in (True, False):
                pool = CachedForward(policy)
                pool.prefill(ids[:B], mask[:B])
                shared = pool.prefill_shared
                if not reuse:
                    pool.prefix = None  # (the admit finds and encodes the beginning its prompts share, if it pays)
                sync()
                t0 = time.perf_counter()
                pool.admit(torch.arange(k, device=device), ids[B:B + k], mask[B:B + k])
                sync()
                times[reuse].append(time.perf_counter() - t0)
        mine, again = (sorted(times[r][1:])[reps // 2] for r in (True, False))
        out.append(f"{k} prompt{'s' if k > 1 else ''}: {mine * 1e3:.0f} ms against {again * 1e3:.0f} ms "
                   f"({mine / again:.2f})")
    return (f"admit into {B} slots after a {shared}-token system prompt ({label}, prompts of "
            f"{ids.shape[1]} tokens, chat template), the beginning reused against encoded again: {'; '.join(out)}")


def group_reference_line(policy, tok, B: int, k: int, reps: int, device, label: str, new: int = 64,
                         long: bool = False) -> str:
    """The reference pass (:func:`sequence_logprobs`) over ``B`` rows that are ``k`` completions of ``B/k`` chat
    prompts (the default task's form; ``long``: each prompt 8 of them in a row, as a question with context),
    completions of 16 to ``new`` tokens: each chunk's prompts encoded once (and the beginning they all share)
    against the beginning alone encoded once, and against every row's whole prompt (``share_prefix=False``)."""
    import textrl.lm.decoding as decoding

    texts = [" ".join(PROMPTS[(j + i) % len(PROMPTS)] for i in range(8 if long else 1)) for j in range(B // k)]
    chats = [[{"role": "user", "content": texts[i // k]}] for i in range(B)]
    enc = tok([tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats],
              return_tensors="pt", padding=True).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    P = enc["input_ids"].shape[1]
    lengths = torch.randint(16, new + 1, (B, 1), device=device, generator=g)
    ids = torch.cat([enc["input_ids"], torch.randint(0, 1000, (B, new), device=device, generator=g)], 1)
    mask = torch.cat([enc["attention_mask"], (torch.arange(new, device=device) < lengths).long()], 1)
    grouped = time_it(lambda: sequence_logprobs(policy, ids, mask, P), reps, device)
    order = decoding.chunk_order
    try:
        decoding.chunk_order = lambda model, name, ids, mask, start, ends, rows: (
            sorted(range(len(ends)), key=ends.__getitem__), False)
        beginning = time_it(lambda: sequence_logprobs(policy, ids, mask, P), reps, device)
    finally:
        decoding.chunk_order = order
    alone = time_it(lambda: sequence_logprobs(policy, ids, mask, P, share_prefix=False), reps, device)
    return (f"reference pass of {B} rows = {k} completions × {B // k} prompts ({label}, prompts of {P} tokens, chat "
            f"template, 16-{new} new tokens): each chunk's prompts once {grouped * 1e3:.0f} ms; the shared beginning "
            f"alone once {beginning * 1e3:.0f} ms; every row's whole prompt {alone * 1e3:.0f} ms (ratios "
            f"{grouped / beginning:.2f} and {grouped / alone:.2f})")


def growing_line(policy, B: int, reps: int, device, label: str, prompt: int = 400, steps: int = 32) -> str:
    """Decode steps of ``B`` rows after ``prompt``-token prompts: textrl's cache, whose layers append in place
    (:class:`~textrl.lm.decoding.GrowingLayer`), against transformers' ``DynamicLayer``, which copies the whole
    cache into a new tensor at every step (``torch.cat``; what ``generate`` uses). Median of ``reps``, alternating."""
    import textrl.lm.decoding as decoding

    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(100, 1000, (B, prompt), device=device, generator=g)
    tokens = torch.randint(100, 1000, (steps, B, 1), device=device, generator=g)
    ones, sync, grow = torch.ones(B, 1, dtype=torch.long, device=device), synchronizer(device), decoding.grow_in_place
    times = {True: [], False: []}
    try:
        for _ in range(reps):
            for growing in (True, False):
                decoding.grow_in_place = grow if growing else (lambda cache: None)
                forward = CachedForward(policy)
                forward.prefill(ids, torch.ones_like(ids))
                sync()
                t0 = time.perf_counter()
                for step in range(steps):
                    forward.extend(tokens[step], ones)
                sync()
                times[growing].append((time.perf_counter() - t0) / steps)
    finally:
        decoding.grow_in_place = grow
    mine, theirs = (sorted(times[k])[len(times[k]) // 2] for k in (True, False))
    return (f"decode step after {prompt}-token prompts ({label}, {B} rows, {steps} steps): cache appended in place "
            f"{mine * 1e3:.1f} ms, concatenated as DynamicLayer does {theirs * 1e3:.1f} ms (ratio {mine / theirs:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128])
    parser.add_argument("--batch", nargs="+", type=int, default=[32])
    parser.add_argument("--decoders", nargs="*", default=["dynamic", "static", "compiled"])
    parser.add_argument("--baselines", nargs="*", default=["generate", "generate-static"])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--variable", type=int, default=128, help="max new tokens of the variable-length runs (0: skip)")
    parser.add_argument("--episodes", type=int, default=0,
                        help="completions of the variable-length runs (a multiple of the batch; more than the "
                             "batch adds continuous batching through batch slots)")
    parser.add_argument("--variable-runs", nargs="+", default=["generate", "dynamic", "kept", "continuous"],
                        choices=VARIABLE_RUNS, help="which variable-length runs to time (continuous-*: continuous "
                                                    "batching with the static or compiled decoder)")
    parser.add_argument("--no-warmup", action="store_true", help="variable-length runs: no untimed warm-up call")
    parser.add_argument("--eos-rate", type=float, default=0.0,
                        help="variable-length runs: the policy ends a completion with this probability at every step "
                             "(for random weights, which never sample EOS; 0: the model's own)")
    parser.add_argument("--growing", nargs="*", type=int, default=[40, 400],
                        help="prompt lengths of the in-place vs concatenated cache decode-step comparison")
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
        if args.variable:
            print_variable(policy, ref, tok, pad_id, args, label, device)
        rows = max(*args.batch, 8)
        print()
        for chat in (False, True) if getattr(tok, "chat_template", None) else (False,):
            ts, tu, width = prefill_ratio(policy, tok, rows, 8, max(args.reps, 3), device, chat)
            print(f"prefill of {rows} rows = 8 completions × {rows // 8} prompts ({label}, prompts of {width} tokens"
                  f"{', chat template' if chat else ''}): shared {ts * 1e3:.1f} ms, unshared {tu * 1e3:.1f} ms, "
                  f"ratio {ts / tu:.2f} (1/8 = 0.125)", flush=True)
        if getattr(tok, "chat_template", None):
            print(system_prompt_line(policy, tok, rows, max(args.reps, 3), device, label), flush=True)
            print(admit_line(policy, tok, rows, max(args.reps, 3), device, label), flush=True)
            for long in (False, True):
                print(group_reference_line(policy, tok, rows, 8, max(args.reps, 3), device, label, long=long), flush=True)
        for prompt in args.growing:
            print(growing_line(policy, rows, max(args.reps, 3), device, label, prompt), flush=True)
        print()
        del policy, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
