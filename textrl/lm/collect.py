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
from textrl.shard import Shard

__all__ = ["collect_tokens", "collect_episodes", "context_column", "episode_end_hooks"]


class _Columns:
    """What a collection records per row and response column ``[rows, T]`` (written at the column the env
    reports for each step), per row (score, the env's episode counts), and how it becomes a rollout."""

    def __init__(self, rows: int, T: int, stat_names: tuple[str, ...], device: torch.device):
        f32 = dict(dtype=torch.float32, device=device)
        self.values = {k: torch.zeros(rows, T, **f32) for k in ("logprobs", "ref_logprobs", "rewards", "kl")}
        self.values.update({k: torch.zeros(rows, T, dtype=torch.bool, device=device)
                            for k in ("action_mask", "terminated", "truncated")})
        self.scores, self.stat_names = torch.zeros(rows, **f32), stat_names
        self.stats = {k: torch.zeros(rows, **f32) for k in stat_names}

    def record(self, t: int, tokens, logprob, reward, term, trunc, info: dict) -> None:
        valid = info["valid"]
        col = (info["column"] if "column" in info else torch.full_like(tokens, t)).unsqueeze(1)  # (B, 1)
        values = {"logprobs": logprob, "rewards": reward.float(), "action_mask": valid, "terminated": term,
                  "truncated": trunc}
        if "ref_logprob" in info:
            values.update(ref_logprobs=info["ref_logprob"], kl=info["kl"])
        for k, v in values.items():  # column col of each live row (ended rows write their own value back)
            buf = self.values[k]
            buf.scatter_(1, col, torch.where(valid, v.to(buf.dtype), buf.gather(1, col).squeeze(1)).unsqueeze(1))
        self.scores += torch.where(info["_score"], info["score"], 0.0)
        for k in self.stat_names:
            self.stats[k] += torch.where(info["_" + k], info[k], 0).float()

    def move(self, rows: torch.Tensor, to: _Columns, to_rows: torch.Tensor) -> None:
        """Copy ``rows`` into ``to``'s ``to_rows`` and clear them here (a slot's finished episode)."""
        for mine, theirs in ((self.values, to.values), (self.stats, to.stats), ({"s": self.scores}, {"s": to.scores})):
            for k, buf in mine.items():
                theirs[k][to_rows] = buf[rows]
                buf[rows] = 0

    def rollout(self, input_ids, attention_mask, P: int, prompt_index) -> TokenRollout:
        v = self.values
        return TokenRollout(input_ids, attention_mask, P, v["action_mask"], v["logprobs"], v["ref_logprobs"],
                            v["rewards"], self.scores, v["kl"], v["terminated"], v["truncated"], prompt_index,
                            self.stats)


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
    generator.prefill(obs["input_ids"], obs["attention_mask"])
    cols = _Columns(B, L - P, tuple(getattr(envs.unwrapped, "episode_stat_names", ())), obs["input_ids"].device)
    done = torch.zeros(B, dtype=torch.bool, device=obs["input_ids"].device)
    retire = getattr(generator, "retire", None)
    for t in range(L - P):  # every step fills at least one response column of each live row
        tokens, logprob = generator.sample()  # (B,), (B,)
        obs, reward, term, trunc, info = envs.step({"token": tokens, "logprob": logprob})
        cols.record(t, tokens, logprob, reward, term, trunc, info)
        done |= term | trunc
        if done.all():
            break
        if retire is not None:
            retire(done)  # the generator may stop computing the rows that ended
        new, new_mask = context_column(tokens, info)  # ended rows get a masked slot
        generator.extend(new, new_mask)
    generator.finish()
    ro = cols.rollout(obs["input_ids"], obs["attention_mask"], P, prompt_index)
    for hook in episode_end_hooks(envs):
        ro = hook(ro)
    return ro


@torch.no_grad()
def collect_episodes(envs: gym.vector.VectorEnv, generator: Generator, episodes: int,
                     seed: int | None = None) -> TokenRollout:
    """Continuous batching: ``episodes`` completions from an env whose B rows are slots. When a slot's episode
    ends, it is written out as a row of the batch and the slot starts the next prompt (``reset`` with a
    ``reset_mask``; with k completions per prompt, once all k rows of its group have ended): its prompt is
    prefilled on its own and joined to the generator's cache (``admit``) while the other slots keep decoding,
    so a short completion frees its slot instead of waiting for the longest one. Freed slots are admitted
    together once an eighth of the slots (at least one group) is free, or every episode left can start: each
    admit is an eager prefill forward (and in the dynamic cache a copy of the whole cache; a compiled step is
    several times cheaper than an eager forward on a GPU), so one per ended row would cost more than the steps
    it saves. ``episodes == B`` is :func:`collect_tokens`. The batch's rows are the episodes in the order they
    started. Needs a generator with ``retire`` and ``admit`` (``HFGenerator``, any decoder) and one process (a
    sharded sampler's stream cannot follow slots that restart at different steps on different processes)."""
    B, k = envs.num_envs, int(getattr(envs.unwrapped, "num_generations", 1))
    if episodes < B or episodes % k:
        raise ValueError(f"episodes must be >= the env's {B} rows and a multiple of num_generations={k}, got "
                         f"{episodes}")
    if episodes == B:
        return collect_tokens(envs, generator, seed)
    if getattr(generator, "admit", None) is None:
        raise TypeError(f"continuous batching needs a generator with admit(); {type(generator).__name__} has none "
                        "(HFGenerator has it)")
    if getattr(getattr(generator, "sampler", None), "shard", Shard()).sharded:
        raise ValueError("continuous batching runs on one process: a data-parallel sampler's stream cannot follow "
                         "rows that restart at different steps on different processes")
    obs, info = envs.reset(seed=seed)
    L, dev = obs["input_ids"].shape[1], obs["input_ids"].device
    P = int(info["response_start"][0])
    names = tuple(getattr(envs.unwrapped, "episode_stat_names", ()))
    slots, out = _Columns(B, L - P, names, dev), _Columns(episodes, L - P, names, dev)
    ids, mask = (torch.zeros(episodes, L, dtype=obs[x].dtype, device=dev) for x in ("input_ids", "attention_mask"))
    prompt_index = torch.zeros(episodes, dtype=torch.long, device=dev)
    slot_prompt, episode_of = info["prompt_index"].clone(), torch.arange(B, device=dev)
    generator.prefill(obs["input_ids"], obs["attention_mask"])
    done, started, finished, t = torch.zeros(B, dtype=torch.bool, device=dev), B, 0, 0
    wait = max(k, B // 8 // k * k)  # free slots that make an admit worth its prefill (and cache copy)
    while True:
        tokens, logprob = generator.sample()
        obs, reward, term, trunc, info = envs.step({"token": tokens, "logprob": logprob})
        if "column" not in info:
            raise ValueError("continuous batching needs the env to say where each token went (info['column'])")
        slots.record(t, tokens, logprob, reward, term, trunc, info)
        t, ended = t + 1, (term | trunc) & ~done
        done |= ended
        if ended.any():  # write the finished episodes out
            rows = ended.nonzero().squeeze(1)
            ids[episode_of[rows]], mask[episode_of[rows]] = obs["input_ids"][rows], obs["attention_mask"][rows]
            prompt_index[episode_of[rows]] = slot_prompt[rows]
            slots.move(rows, out, episode_of[rows])
            finished += rows.numel()
        if finished == episodes:
            break
        generator.retire(done)
        new, new_mask = context_column(tokens, info)
        refill = _free_groups(done, k, episodes - started)
        free = int(refill.sum())
        if free and free >= min(wait, episodes - started):
            fresh, fresh_info = envs.reset(options={"reset_mask": refill})
            rows = refill.nonzero().squeeze(1)
            generator.admit(rows, fresh["input_ids"][rows], fresh["attention_mask"][rows])
            slot_prompt[rows] = fresh_info["prompt_index"][rows]
            episode_of[rows] = started + torch.arange(rows.numel(), device=dev)
            started, done = started + rows.numel(), done & ~refill
            new_mask = new_mask & ~refill.unsqueeze(1)  # (a restarted row's context is its new prompt)
        generator.extend(new, new_mask)
    generator.finish()
    ro = out.rollout(ids, mask, P, prompt_index)
    for hook in episode_end_hooks(envs):
        ro = hook(ro)
    return ro


def _free_groups(done: torch.Tensor, k: int, pending: int) -> torch.Tensor:
    """``[B]`` bool: the slots of the first whole groups of k that have all ended, at most ``pending`` slots."""
    whole = done.view(-1, k).all(1)  # (B / k,)
    whole &= whole.cumsum(0) <= pending // k
    return whole.repeat_interleave(k)


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
