"""Collect a batch of episodes from a text env with a generator: the token-level rollout loop.

Collection uses only the Gymnasium surface — the observations and infos the env returns — plus one
documented hook: after the episodes end, every wrapper in the env's chain that defines
``on_episode_end(rollout) -> rollout`` is called, innermost first, and may add per-token terms computed
over the finished sequences in one parallel pass (the KL wrapper's reference pass does).

What collection reads from the env: ``reset`` → observation ``{"input_ids", "attention_mask"}`` ``[B, L]``
and info ``prompt_index`` ``[B]``, ``response_start`` ``[B]`` (the first response column, equal for every
row); ``step`` → reward, terminated, truncated ``[B]`` and info ``valid`` ``[B]`` (this step's token is
real), ``column`` (the response column it went to), ``score`` with its ``_score`` mask, ``env_token`` with its mask
where the env wrote a token of its own instead of the agent (a multi-turn env's reply, one token per step;
the row's action was ignored), the per-episode counts named by the env's ``episode_stat_names`` (with
masks), and ``ref_logprob``/``kl`` where a per-token KL wrapper adds them.
"""

from __future__ import annotations

import gymnasium as gym
import torch

from textrl.lm.generate import Generator
from textrl.rollout import TokenRollout

__all__ = ["collect_tokens", "context_column", "episode_end_hooks"]


@torch.no_grad()
def collect_tokens(envs: gym.vector.VectorEnv, generator: Generator, seed: int | None = None) -> TokenRollout:
    """Reset ``envs`` (all rows), generate until every row has ended, and return the batch.

    ``seed`` reseeds the env's prompt draws (None continues its stream); the generator brings its own random
    stream. A data-parallel process's generator keeps its stream in step with the other processes' at
    ``finish`` (rows of one process may end before another's). Each step's token goes to the response column
    the env reports (``info["column"]``; rows of a multi-turn env are at different columns); a token the env
    writes itself (``info["env_token"]``) extends the generator's KV cache in place of the agent's: nothing is
    re-encoded, and every step is one forward of one column per live row (rows that ended are handed to the
    generator's optional ``retire``)."""
    obs, info = envs.reset(seed=seed)
    B, L = obs["input_ids"].shape
    P, prompt_index = int(info["response_start"][0]), info["prompt_index"].clone()
    T, dev = L - P, obs["input_ids"].device
    generator.prefill(obs["input_ids"], obs["attention_mask"])
    f32 = dict(dtype=torch.float32, device=dev)
    out = {k: torch.zeros(B, T, **f32) for k in ("logprobs", "ref_logprobs", "rewards", "kl")}
    flags = {k: torch.zeros(B, T, dtype=torch.bool, device=dev) for k in ("action_mask", "terminated", "truncated")}
    scores, done = torch.zeros(B, **f32), torch.zeros(B, dtype=torch.bool, device=dev)
    stat_names = tuple(getattr(envs.unwrapped, "episode_stat_names", ()))
    stats = {k: torch.zeros(B, **f32) for k in stat_names}
    retire = getattr(generator, "retire", None)
    for t in range(T):  # every step fills at least one response column of each live row
        tokens, logprob = generator.sample()  # (B,), (B,)
        obs, reward, term, trunc, info = envs.step({"token": tokens, "logprob": logprob})
        valid = info["valid"]
        col = (info["column"] if "column" in info else torch.full_like(tokens, t)).unsqueeze(1)  # (B, 1)
        values = {"logprobs": logprob, "rewards": reward.float(), "action_mask": valid, "terminated": term,
                  "truncated": trunc}
        if "ref_logprob" in info:
            values.update(ref_logprobs=info["ref_logprob"], kl=info["kl"])
        for k, v in values.items():  # column col of each live row (ended rows write their own value back)
            buf = out.get(k, flags.get(k))
            buf.scatter_(1, col, torch.where(valid, v.to(buf.dtype), buf.gather(1, col).squeeze(1)).unsqueeze(1))
        scores += torch.where(info["_score"], info["score"], 0.0)
        for k in stat_names:
            stats[k] += torch.where(info["_" + k], info[k], 0).float()
        done |= term | trunc
        if done.all():
            break
        if retire is not None:
            retire(done)  # the generator may stop computing the rows that ended
        new, new_mask = context_column(tokens, info)  # ended rows get a masked slot
        generator.extend(new, new_mask)
    generator.finish()
    ro = TokenRollout(obs["input_ids"], obs["attention_mask"], P, flags["action_mask"], out["logprobs"],
                      out["ref_logprobs"], out["rewards"], scores, out["kl"], flags["terminated"],
                      flags["truncated"], prompt_index, stats)
    for hook in episode_end_hooks(envs):
        ro = hook(ro)
    return ro


def context_column(tokens: torch.Tensor, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The column a step adds to a model's context, ``[B, 1]`` ids and mask: the agent's token where it acted
    (``info["valid"]``), the env's token where the env wrote one instead (``info["env_token"]``, a multi-turn
    env's reply), a masked slot elsewhere (ended rows)."""
    ids, mask = tokens, info["valid"]
    if "env_token" in info:
        ids = torch.where(info["_env_token"], info["env_token"].to(tokens.device), tokens)
        mask = mask | info["_env_token"]
    return ids.unsqueeze(1), mask.unsqueeze(1)


def episode_end_hooks(envs: gym.vector.VectorEnv) -> list:
    """``on_episode_end`` of every layer of the wrapper chain that defines one, innermost first."""
    hooks, layer = [], envs
    while layer is not None:
        hook = getattr(type(layer), "on_episode_end", None)
        if hook is not None:
            hooks.append(layer.on_episode_end)
        layer = getattr(layer, "env", None)
    return hooks[::-1]
