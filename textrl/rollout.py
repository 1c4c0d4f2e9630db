"""Rollout collection, shared by every agent (the collect / update split of Stable-Baselines3).

``Collector.collect(agent)`` drives a Gymnasium ``VectorEnv`` for ``num_steps`` steps and returns a
:class:`Rollout` of ``[B, T]`` tensors (B = ``num_envs`` rows, T = ``num_steps``) with one boolean mask.
Agents only turn a Rollout into a loss.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from textrl.advantages import next_values_from

__all__ = ["ActOutput", "Actor", "Rollout", "Collector"]


@dataclass
class ActOutput:
    """What an agent returns for one batched step."""

    actions: torch.Tensor  # (B,) sampled actions
    logprobs: torch.Tensor  # (B,) log π(a|s) of the sampled actions
    values: torch.Tensor  # (B,) V(s)


class Actor(Protocol):
    """The part of an agent the collector needs."""

    def act(self, obs: torch.Tensor) -> ActOutput: ...

    def value(self, obs: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Rollout:
    """A batch of transitions, rows × steps. All tensors are ``[B, T]`` unless noted.

    ``mask[b, t]`` is True for a real transition. It is False for the dead step a next-step autoreset
    spends resetting a finished sub-env (its action is ignored by the env), and for padding in text envs.
    ``next_values[b, t]`` is V(s_{t+1}) as step t saw it: the value of the true final observation where a
    same-step autoreset replaced it.
    """

    obs: torch.Tensor  # (B, T, *obs_shape)
    actions: torch.Tensor  # (B, T)
    logprobs: torch.Tensor  # (B, T) log π_old(a_t|s_t)
    values: torch.Tensor  # (B, T) V_old(s_t)
    next_values: torch.Tensor  # (B, T) V_old(s_{t+1})
    rewards: torch.Tensor  # (B, T)
    terminated: torch.Tensor  # (B, T) bool
    truncated: torch.Tensor  # (B, T) bool
    mask: torch.Tensor  # (B, T) bool
    episode_returns: list[float] = field(default_factory=list)  # episodes that finished in this rollout
    episode_lengths: list[int] = field(default_factory=list)

    @property
    def num_transitions(self) -> int:
        return int(self.mask.sum())


class Collector:
    """Steps a Gymnasium vector env with an agent and keeps the env state between rollouts.

    Supports both autoreset modes a Gymnasium vector env may declare in ``metadata["autoreset_mode"]``:
    next-step (the step after an episode ends is a dead reset step: masked out) and same-step (the reset
    happens inside the ending step; a truncated episode is bootstrapped from ``info["final_obs"]``).
    Episode returns and lengths come from ``gymnasium.wrappers.vector.RecordEpisodeStatistics``, which the
    collector adds if the env lacks it.
    """

    def __init__(self, envs: gym.vector.VectorEnv, num_steps: int, device: str | torch.device = "cpu"):
        if num_steps <= 0:
            raise ValueError(f"num_steps must be > 0, got {num_steps}")
        mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        mode = AutoresetMode(mode) if isinstance(mode, str) else mode
        if mode == AutoresetMode.DISABLED:
            raise ValueError(
                "envs.metadata['autoreset_mode'] is DISABLED; the collector needs NEXT_STEP or SAME_STEP "
                "(text envs, which reset whole batches, use their own rollout helper)"
            )
        if not _has_wrapper(envs, gym.wrappers.vector.RecordEpisodeStatistics):
            envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
        self.envs = envs
        self.mode = mode
        self.num_steps = num_steps
        self.num_envs = envs.num_envs
        self.device = torch.device(device)
        self.recent_returns: deque[float] = deque(maxlen=100)
        self._obs: np.ndarray | None = None
        self._pending_reset = np.zeros(self.num_envs, dtype=bool)

    def reset(self, seed: int | None = None) -> None:
        self._obs, _ = self.envs.reset(seed=seed)
        self._pending_reset[:] = False

    def _to_tensor(self, obs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def collect(self, agent: Actor) -> Rollout:
        if self._obs is None:
            self.reset()
        T, B = self.num_steps, self.num_envs
        obs_shape = np.asarray(self._obs).shape[1:]
        # Filled step-major (T, B) because we write one step at a time; transposed to (B, T) at the end.
        obs = torch.empty((T, B, *obs_shape), dtype=torch.float32, device=self.device)
        actions = torch.empty((T, B), dtype=torch.long, device=self.device)
        logprobs = torch.empty((T, B), device=self.device)
        values = torch.empty((T, B), device=self.device)
        rewards = torch.empty((T, B), device=self.device)
        terminated = torch.empty((T, B), dtype=torch.bool)
        truncated = torch.empty((T, B), dtype=torch.bool)
        mask = torch.empty((T, B), dtype=torch.bool)
        final_values: dict[tuple[int, int], float] = {}  # (t, b) -> V(final_obs), same-step mode only
        ep_returns: list[float] = []
        ep_lengths: list[int] = []

        for t in range(T):
            obs[t] = self._to_tensor(self._obs)
            out = agent.act(obs[t])
            actions[t], logprobs[t], values[t] = out.actions, out.logprobs, out.values
            self._obs, r, term, trunc, info = self.envs.step(out.actions.cpu().numpy())
            rewards[t] = torch.as_tensor(r, dtype=torch.float32)
            terminated[t] = torch.from_numpy(np.asarray(term, dtype=bool))
            truncated[t] = torch.from_numpy(np.asarray(trunc, dtype=bool))
            mask[t] = torch.from_numpy(~self._pending_reset)
            if self.mode == AutoresetMode.NEXT_STEP:
                self._pending_reset = np.asarray(term, dtype=bool) | np.asarray(trunc, dtype=bool)
            elif np.any(trunc):
                idx = np.flatnonzero(trunc)
                final = self._to_tensor(np.stack([info["final_obs"][i] for i in idx]))
                for i, v in zip(idx, agent.value(final).tolist(), strict=True):
                    final_values[(t, int(i))] = v
            if "episode" in info:
                done = info["_episode"]
                ep_returns += info["episode"]["r"][done].astype(float).tolist()
                ep_lengths += info["episode"]["l"][done].astype(int).tolist()

        last_values = agent.value(self._to_tensor(self._obs))  # (B,) V(s_T)
        values_bt = values.T.contiguous()
        next_values = next_values_from(values_bt, last_values.to(values_bt.dtype))
        for (t, b), v in final_values.items():
            next_values[b, t] = v
        self.recent_returns.extend(ep_returns)
        return Rollout(
            obs=obs.transpose(0, 1).contiguous(),
            actions=actions.T.contiguous(),
            logprobs=logprobs.T.contiguous(),
            values=values_bt,
            next_values=next_values,
            rewards=rewards.T.contiguous(),
            terminated=terminated.T.contiguous().to(self.device),
            truncated=truncated.T.contiguous().to(self.device),
            mask=mask.T.contiguous().to(self.device),
            episode_returns=ep_returns,
            episode_lengths=ep_lengths,
        )


def _has_wrapper(env: Any, cls: type) -> bool:
    while env is not None:
        if isinstance(env, cls):
            return True
        env = getattr(env, "env", None)
    return False
