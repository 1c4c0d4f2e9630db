"""Collect a batch of episodes from a text env with a generator: the token-level rollout loop.

Collection uses only the Gymnasium surface — the observations and infos the env returns — plus one
documented hook: after the episodes end, every wrapper in the env's chain that defines
``on_episode_end(rollout) -> rollout`` is called, innermost first, and may add per-token terms computed
over the finished sequences in one parallel pass (the KL wrapper's reference pass does).

What collection reads from the env: ``reset`` → observation ``{"input_ids", "attention_mask"}`` ``[B, L]``
and info ``prompt_index`` ``[B]``, ``response_start`` ``[B]`` (the first response column, equal for every
row); ``step`` → reward, terminated, truncated ``[B]`` and info ``valid`` ``[B]`` (this step's token is
real), ``score`` with its ``_score`` mask, and ``ref_logprob``/``kl`` where a per-token KL wrapper adds them.
"""

from __future__ import annotations

import gymnasium as gym
import torch

from textrl.lm.generate import Generator
from textrl.rollout import TokenRollout

__all__ = ["collect_tokens", "episode_end_hooks"]


@torch.no_grad()
def collect_tokens(envs: gym.vector.VectorEnv, generator: Generator, seed: int | None = None) -> TokenRollout:
    """Reset ``envs`` (all rows), generate until every row has ended, and return the batch.

    ``seed`` reseeds the env's prompt draws (None continues its stream); the generator brings its own random
    stream. A data-parallel process's generator keeps its stream in step with the other processes' at
    ``finish`` (rows of one process may end before another's)."""
    obs, info = envs.reset(seed=seed)
    B, L = obs["input_ids"].shape
    P, prompt_index = int(info["response_start"][0]), info["prompt_index"].clone()
    T, dev = L - P, obs["input_ids"].device
    generator.prefill(obs["input_ids"], obs["attention_mask"])
    f32 = dict(dtype=torch.float32, device=dev)
    out = {k: torch.zeros(B, T, **f32) for k in ("logprobs", "ref_logprobs", "rewards", "kl")}
    flags = {k: torch.zeros(B, T, dtype=torch.bool, device=dev) for k in ("action_mask", "terminated", "truncated")}
    scores, done = torch.zeros(B, **f32), torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(T):  # single-turn: step t writes response column t
        tokens, logprob = generator.sample()  # (B,), (B,)
        obs, reward, term, trunc, info = envs.step({"token": tokens, "logprob": logprob})
        valid = info["valid"]
        out["logprobs"][:, t] = torch.where(valid, logprob, 0.0)
        out["rewards"][:, t] = reward
        if "ref_logprob" in info:
            out["ref_logprobs"][:, t], out["kl"][:, t] = info["ref_logprob"], info["kl"]
        flags["action_mask"][:, t], flags["terminated"][:, t], flags["truncated"][:, t] = valid, term, trunc
        scores += torch.where(info["_score"], info["score"], 0.0)
        done |= term | trunc
        if done.all():
            break
        generator.extend(tokens.unsqueeze(1), valid.unsqueeze(1))  # ended rows get a masked slot
    generator.finish()
    ro = TokenRollout(obs["input_ids"], obs["attention_mask"], P, flags["action_mask"], out["logprobs"],
                      out["ref_logprobs"], out["rewards"], scores, out["kl"], flags["terminated"],
                      flags["truncated"], prompt_index)
    for hook in episode_end_hooks(envs):
        ro = hook(ro)
    return ro


def episode_end_hooks(envs: gym.vector.VectorEnv) -> list:
    """``on_episode_end`` of every layer of the wrapper chain that defines one, innermost first."""
    hooks, layer = [], envs
    while layer is not None:
        hook = getattr(type(layer), "on_episode_end", None)
        if hook is not None:
            hooks.append(layer.on_episode_end)
        layer = getattr(layer, "env", None)
    return hooks[::-1]
