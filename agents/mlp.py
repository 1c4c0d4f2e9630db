"""The actor-critic PPO uses on classic Gymnasium envs: separate tanh MLPs for the logits and the value
(no shared trunk, as Stable-Baselines3's ``MlpPolicy``), orthogonal init as in the PPO reference code."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from textrl.lm.sampling import sample_from_logits
from textrl.rollout import ActOutput
from textrl.shard import Shard

__all__ = ["MLPActorCritic"]


def _orthogonal_linear(n_in: int, n_out: int, gain: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, gain)  # orthogonal init, as in the PPO reference implementations
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int, out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [_orthogonal_linear(n_in, h, math.sqrt(2)), nn.Tanh()]
        n_in = h
    layers.append(_orthogonal_linear(n_in, n_out, out_gain))
    return nn.Sequential(*layers)


class MLPActorCritic(nn.Module):
    """Policy logits and V(s) of a flat observation; ``act`` and ``value`` are what the collector calls.

    ``shard``: the sub-envs this process steps, as rows of the global vector env (data-parallel runs set it).
    Actions are drawn by inverse CDF from uniforms of the global batch (torch's global stream, seeded alike on
    every process), each process keeping its rows, so a data-parallel run samples the one-process actions.
    """

    shard: Shard = Shard()

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.obs_dim, self.n_actions, self.hidden_sizes = obs_dim, n_actions, tuple(hidden_sizes)
        self.pi = _mlp(obs_dim, hidden_sizes, n_actions, out_gain=0.01)  # near-uniform initial policy
        self.vf = _mlp(obs_dim, hidden_sizes, 1, out_gain=1.0)

    @classmethod
    def for_env(cls, envs: gym.vector.VectorEnv, hidden_sizes: tuple[int, ...]) -> MLPActorCritic:
        """Sized for a vector env with Box observations and a Discrete action space."""
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        return cls(obs_dim, int(envs.single_action_space.n), hidden_sizes)

    def shape_info(self) -> dict[str, object]:
        """What rebuilds this network (``MLPActorCritic(**shape_info())``) before loading its weights."""
        return {"obs_dim": self.obs_dim, "n_actions": self.n_actions, "hidden_sizes": list(self.hidden_sizes)}

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = obs.reshape(obs.shape[0], -1)  # (N, obs_dim)
        return self.pi(x), self.vf(x).squeeze(-1)  # (N, A), (N,)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> ActOutput:
        logits, values = self(obs)  # (B, A), (B,)
        logp_all = torch.log_softmax(logits, dim=-1)
        actions = sample_from_logits(logits, shard=self.shard).unsqueeze(-1)  # (B, 1)
        return ActOutput(actions.squeeze(-1), logp_all.gather(-1, actions).squeeze(-1), values)

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self(obs)[1]
