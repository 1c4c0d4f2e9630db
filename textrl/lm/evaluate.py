"""Held-out evaluation of a text run: every held-out prompt answered a few times, scored and compared.

The before/after comparison is *paired*: the same prompts, answered with the same sampling seed, so the
prompt-to-prompt spread of the score cancels in the difference (:func:`paired_gain`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from textrl.config import KLConfig, SamplingConfig
from textrl.envs.prompts import prompt_text
from textrl.envs.verifiable import pass_at_k
from textrl.lm.build import build_kl_env
from textrl.lm.collect import collect_tokens
from textrl.lm.generate import HFGenerator
from textrl.lm.sampling import TokenSampler
from textrl.parallel.distributed import gather_objects, rank, world_size
from textrl.rollout import TokenRollout
from textrl.shard import Shard

__all__ = ["EvalResult", "paired_gain", "summary_line", "decode_completions", "evaluate_heldout"]


@dataclass
class EvalResult:
    mean: float
    se: float
    kl: float  # mean summed KL per completion
    samples: list[tuple[str, str]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # per held-out prompt, in prompt order
    #: per-episode counts the env reports (a multi-turn env's turns, tool calls, …), mean per answer
    stats: dict[str, float] = field(default_factory=dict)
    #: a verifiable env's solved share per held-out prompt (its ``success`` count), in prompt order
    successes: list[float] = field(default_factory=list)
    #: pass@k for k = 1 … answers per prompt (unbiased estimator), a verifiable env only
    pass_at: dict[int, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        """Mean solved share (pass@1) of a verifiable env, else None."""
        return float(sum(self.successes) / len(self.successes)) if self.successes else None

    @property
    def accuracy_se(self) -> float:
        n = len(self.successes)
        if n < 2:
            return float("nan")
        return float(torch.tensor(self.successes, dtype=torch.float64).std() / math.sqrt(n))

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.se:.4f}"


def paired_gain(before: EvalResult, after: EvalResult, field: str = "scores") -> tuple[float, float]:
    """Mean and standard error of after − before over the same held-out prompts (a paired comparison: the
    prompt-to-prompt spread of the score cancels; both evaluations also share the sampling seed). ``field``:
    "scores" (the reward) or "successes" (a verifiable env's accuracy)."""
    d = torch.tensor(getattr(after, field), dtype=torch.float64) - torch.tensor(getattr(before, field), dtype=torch.float64)
    if d.numel() < 2:
        return float("nan"), float("nan")
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def summary_line(before: EvalResult | None, after: EvalResult) -> str:
    """``held-out reward: BEFORE ± SE -> AFTER ± SE (kl=K)``, plus the paired gain when both exist."""
    head = f"{before}" if before is not None else "(resumed)"
    line = f"held-out reward: {head} -> {after} (kl={after.kl:.3f})"
    if before is not None and len(before.scores) == len(after.scores):
        gain, se = paired_gain(before, after)
        line += f"; paired gain {gain:+.4f} ± {se:.4f} ({gain / se if se > 0 else float('nan'):.1f} SE)"
    if after.accuracy is not None:
        head = f"{before.accuracy:.3f}" if before is not None and before.accuracy is not None else "(resumed)"
        line += f"\nheld-out accuracy: {head} -> {after.accuracy:.3f} ± {after.accuracy_se:.3f}"
        if before is not None and len(before.successes) == len(after.successes):
            gain, se = paired_gain(before, after, "successes")
            line += f"; paired gain {gain:+.3f} ± {se:.3f} ({gain / se if se > 0 else float('nan'):.1f} SE)"
    return line


def decode_completions(source: Any, ro: TokenRollout) -> list[str]:
    """Each row's response, decoded: the agent's tokens (special tokens skipped) of a single-turn episode; the
    whole exchange after the prompt, the env's messages and the chat markup included, of a multi-turn one.
    ``source``: the text env (:meth:`~textrl.envs.text_gen.TextGenVectorEnv.decode`, which also reads the ids
    past its tokenizer's as nothing) or a tokenizer."""
    decode = source.decode if hasattr(source, "fit_vocabulary") else source.batch_decode
    tokens, mask = ro.tokens.cpu(), ro.action_mask.cpu()
    seen = ro.attention_mask[:, ro.response_start:].cpu().bool()
    if bool((seen & ~mask).any()):  # env tokens between turns
        return decode([t[m].tolist() for t, m in zip(tokens, seen, strict=True)], skip_special_tokens=False)
    return decode([t[m].tolist() for t, m in zip(tokens, mask, strict=True)], skip_special_tokens=True)


@torch.no_grad()
def evaluate_heldout(env: Any, policy: torch.nn.Module, reference: Any, prompts: list[str] | None, *,
                     sampling: SamplingConfig, kl: KLConfig, generations: int, samples: int, seed: int,
                     progress: bool = False) -> EvalResult | None:
    """Answer every held-out prompt ``generations`` times with the causal LM ``policy`` (sequential order,
    sampling stream seeded ``seed + 12345``, rows of at most 64, envs made by the text env ``env``'s
    ``with_prompts``, on its device, decoded by it). A prompt's score is the mean of its answers; the result is the mean over prompts ± the
    standard error of that mean (prompts are the independent units); ``samples`` prompts keep their first answer.

    Data-parallel runs call it on every process: each takes a contiguous share of every chunk of rows (its
    slice of the chunk's sampling uniforms, as in training), and the rows are gathered, so the result is the
    one-process result. ``progress``: a progress bar over the answers."""
    if not prompts:
        return None
    device, k = env.device, generations
    rows = [p for p in prompts for _ in range(k)]
    per_prompt = torch.zeros(len(prompts), dtype=torch.float64)
    quoted, kl_sum, counts = [], 0.0, []
    rng = torch.Generator(device=device).manual_seed(seed + 12345)
    chunk = max(k, 64 // k * k)
    world, me = world_size(), rank()
    bar = tqdm(total=len(rows), desc="held-out evaluation", unit="answer", leave=False,
               disable=None if progress else True)  # (None: off when stderr is not a terminal)
    # a compiled step would be compiled again for each chunk's batch: evaluation decodes eagerly
    eval_sampling = dataclasses.replace(sampling, decoder="static" if sampling.decoder == "static" else "dynamic")
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        lo, hi = me * len(part) // world, (me + 1) * len(part) // world  # this process's rows of the chunk
        shard = Shard(lo, len(part)) if world > 1 else Shard()
        mine: list[tuple[float, float, str, dict[str, float]]] = []
        if hi > lo:
            kl_env = build_kl_env(env.with_prompts(part, num_envs=hi - lo, shard=shard), reference, kl,
                                  sampling.temperature, in_reward=False)  # the KL is measured, not paid
            generator = HFGenerator.from_config(policy, eval_sampling, rng, shard, stop_ids=env.stop_token_ids)
            ro = collect_tokens(kl_env, generator, seed=seed)
            episode = [dict(zip(ro.episode_stats, row, strict=True))
                      for row in zip(*(v.tolist() for v in ro.episode_stats.values()), strict=True)] \
                if ro.episode_stats else [{}] * len(ro.scores)
            mine = list(zip(ro.scores.tolist(), ro.kl.sum(1).tolist(), decode_completions(env, ro), episode,
                            strict=True))
        else:  # no rows here (a chunk smaller than the process count): keep the sampler in step
            TokenSampler(rng=rng, shard=shard).sync(0, device)
        scores, kls, texts, row_counts = zip(*gather_objects(mine), strict=True)  # the chunk's rows, in row order
        first = start // k  # rows are prompt-major: row j answers prompt first + j // k
        per_prompt.index_add_(0, first + torch.arange(len(part)) // k, torch.tensor(scores, dtype=torch.float64) / k)
        counts += row_counts
        kl_sum += float(torch.tensor(kls, dtype=torch.float32).sum())
        quoted += [(prompt_text(part[j]), texts[j]) for j in range(0, len(part), k)]  # each prompt's first answer
        bar.update(len(part))
    bar.close()
    n = len(prompts)
    se = float(per_prompt.std() / math.sqrt(n)) if n > 1 else float("nan")
    result = EvalResult(float(per_prompt.mean()), se, kl_sum / len(rows), quoted[:samples], per_prompt.tolist())
    result.stats = {name: sum(c[name] for c in counts) / len(counts) for name in (counts[0] if counts else {})}
    success = getattr(env, "success", None)
    if success is not None:
        solved = torch.tensor([c[success] for c in counts], dtype=torch.float64).view(n, k).clamp(0, 1)
        result.successes = solved.mean(1).tolist()
        correct = (solved > 0.5).sum(1).tolist()
        result.pass_at = {j: sum(pass_at_k(k, int(c), j) for c in correct) / n for j in range(1, k + 1)}
    return result
