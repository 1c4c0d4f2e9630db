"""Rollout collection for classic Gymnasium envs (the collect / update split of Stable-Baselines3).

``Collector.collect(policy)`` drives a Gymnasium ``VectorEnv`` for ``num_steps`` steps with a policy's
``act``/``value`` and returns a :class:`~textrl.rollout.Rollout` of ``[B, T]`` tensors (B = ``num_envs``
rows, T = ``num_steps``) with one boolean mask. Text envs are collected by :mod:`textrl.lm.collect`.
"""

from __future__ import annotations

from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from textrl.advantages import next_values_from
from textrl.rollout import ActOutput, Rollout

__all__ = ["Actor", "Collector"]


class Actor(Protocol):
    """The part of a policy the collector needs."""

    def act(self, obs: torch.Tensor) -> ActOutput: ...

    def value(self, obs: torch.Tensor) -> torch.Tensor: ...


class Collector:
    """Steps a Gymnasium vector env with a policy and keeps the env state between rollouts.

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
                "(text envs, which reset whole batches, are collected by textrl.lm.collect)"
            )
        if not _has_wrapper(envs, gym.wrappers.vector.RecordEpisodeStatistics):
            envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
        self.envs = envs
        self.mode = mode
        self.num_steps = num_steps
        self.num_envs = envs.num_envs
        self.device = torch.device(device)
        self._obs: np.ndarray | None = None
        self._pending_reset = np.zeros(self.num_envs, dtype=bool)

    def reset(self, seed: int | None = None) -> None:
        self._obs, _ = self.envs.reset(seed=seed)
        self._pending_reset[:] = False

    def state_dict(self) -> dict[str, Any]:
        """The collector's place in its episodes (the last observations, the rows awaiting a reset), as plain
        data for a checkpoint (with :func:`textrl.env_state.env_state` of its envs)."""
        obs = None if self._obs is None else np.asarray(self._obs)
        return {"obs": None if obs is None else {"data": obs.tolist(), "dtype": str(obs.dtype)},
                "pending_reset": self._pending_reset.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        obs = state["obs"]
        self._obs = None if obs is None else np.asarray(obs["data"], dtype=obs["dtype"])
        self._pending_reset = np.asarray(state["pending_reset"], dtype=bool)

    def _to_tensor(self, obs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def collect(self, policy: Actor) -> Rollout:
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
        episodes: tuple[list[float], list[int]] = ([], [])

        for t in range(T):
            obs[t] = self._to_tensor(self._obs)
            out = policy.act(obs[t])
            actions[t], logprobs[t], values[t] = out.actions, out.logprobs, out.values
            self._obs, r, term, trunc, info = self.envs.step(out.actions.cpu().numpy())
            rewards[t] = torch.as_tensor(r, dtype=torch.float32)
            terminated[t] = torch.from_numpy(np.asarray(term, dtype=bool))
            truncated[t] = torch.from_numpy(np.asarray(trunc, dtype=bool))
            mask[t] = torch.from_numpy(~self._pending_reset)
            self._after_step(policy, t, term, trunc, info, final_values, episodes)

        last_values = policy.value(self._to_tensor(self._obs))  # (B,) V(s_T)
        values_bt = values.T.contiguous()
        next_values = next_values_from(values_bt, last_values.to(values_bt.dtype))
        for (t, b), v in final_values.items():
            next_values[b, t] = v
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
            episode_returns=episodes[0],
            episode_lengths=episodes[1],
        )

    def _after_step(self, policy: Actor, t: int, term, trunc, info: dict, final_values: dict,
                    episodes: tuple[list[float], list[int]]) -> None:
        """Autoreset bookkeeping and finished episodes' statistics for step ``t``."""
        if self.mode == AutoresetMode.NEXT_STEP:
            self._pending_reset = np.asarray(term, dtype=bool) | np.asarray(trunc, dtype=bool)
        elif np.any(trunc):
            idx = np.flatnonzero(trunc)
            final = self._to_tensor(np.stack([info["final_obs"][i] for i in idx]))
            for i, v in zip(idx, policy.value(final).tolist(), strict=True):
                final_values[(t, int(i))] = v
        if "episode" in info:
            done = info["_episode"]
            episodes[0].extend(info["episode"]["r"][done].astype(float).tolist())
            episodes[1].extend(info["episode"]["l"][done].astype(int).tolist())


def _has_wrapper(env: Any, cls: type) -> bool:
    while env is not None:
        if isinstance(env, cls):
            return True
        env = getattr(env, "env", None)
    return False
