"""Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) with a critic and GAE.

One implementation for every Gymnasium vector env with a Discrete action space. The agent only implements
``update``; collection is shared (:mod:`textrl.rollout`), the maths is in :mod:`textrl.advantages` and
:mod:`textrl.losses`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from textrl.agents.base import Agent
from torch import nn

from textrl.advantages import gae
from textrl.losses import explained_variance, policy_loss, value_loss
from textrl.masking import masked_mean, masked_whiten
from textrl.rollout import ActOutput, Rollout

__all__ = ["PPOConfig", "PPO", "MLPActorCritic"]


@dataclass
class PPOConfig:
    """PPO hyperparameters. Defaults are the RLHF seed's (γ=1, λ=0.95, 4 epochs, clip 0.2, value clip 0.2,
    vf_coef 0.1, Adam eps 1e-5, linear LR decay); classic-control presets live in ``experiments/presets``."""

    num_steps: int = 128
    """Steps each sub-env takes per rollout; the batch is num_envs × num_steps transitions."""
    num_epochs: int = 4
    """Passes over each rollout (PPO epochs)."""
    num_minibatches: int = 4
    """Minibatches per epoch; must divide the batch size num_envs × num_steps."""
    learning_rate: float = 3e-4
    """Adam learning rate at the start of training."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over training."""
    adam_eps: float = 1e-5
    """Adam epsilon (1e-5, not PyTorch's 1e-8, as in the PPO reference implementations)."""
    gamma: float = 1.0
    """Discount factor γ."""
    gae_lambda: float = 0.95
    """GAE λ: 0 gives one-step TD advantages, 1 gives Monte-Carlo returns minus V."""
    clip_range: float = 0.2
    """Policy ratio clip ε."""
    anneal_clip_range: bool = False
    """Decay the clip range linearly to 0 over training (rl-zoo's lin_ schedules)."""
    clip_range_vf: float | None = 0.2
    """Value clip ε_v around the rollout's values; null turns value clipping off."""
    norm_adv: bool = True
    """Whiten advantages (mean 0, std 1 over the real steps of the batch) before the epochs."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    vf_coef: float = 0.1
    """Weight of the value loss (ours has no ½ factor: TRL's/CleanRL's c equals our c/2)."""
    max_grad_norm: float = 0.5
    """Clip the global gradient norm to this value."""
    target_kl: float | None = None
    """Stop the epochs early once a minibatch's approx_kl exceeds 1.5 × target_kl; null never stops."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the MLP policy and value networks (classic envs)."""

    def __post_init__(self) -> None:
        self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
        for name in ("num_steps", "num_epochs", "num_minibatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("learning_rate", "clip_range", "max_grad_norm", "adam_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("gamma", "gae_lambda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        for name in ("ent_coef", "vf_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("clip_range_vf", "target_kl"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or null (off), got {value!r}")

    def check_batch(self, num_envs: int) -> None:
        """Fail before training if the rollout batch does not split into ``num_minibatches``."""
        batch = num_envs * self.num_steps
        if batch % self.num_minibatches:
            divisors = [d for d in range(1, min(batch, 64) + 1) if batch % d == 0]
            raise ValueError(
                f"num_minibatches={self.num_minibatches} does not divide the batch size "
                f"num_envs × num_steps = {num_envs} × {self.num_steps} = {batch}; "
                f"choose num_minibatches from {divisors} or change num_steps/num_envs"
            )


def _layer(n_in: int, n_out: int, gain: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, gain)  # orthogonal init, as in the PPO reference implementations
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int, out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [_layer(n_in, h, math.sqrt(2)), nn.Tanh()]
        n_in = h
    layers.append(_layer(n_in, n_out, out_gain))
    return nn.Sequential(*layers)


class MLPActorCritic(nn.Module):
    """Separate tanh MLPs for the policy logits and the value (no shared trunk, as SB3's MlpPolicy)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.pi = _mlp(obs_dim, hidden_sizes, n_actions, out_gain=0.01)  # near-uniform initial policy
        self.vf = _mlp(obs_dim, hidden_sizes, 1, out_gain=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = obs.reshape(obs.shape[0], -1)  # (N, obs_dim)
        return self.pi(x), self.vf(x).squeeze(-1)  # (N, A), (N,)


class PPO(Agent):
    """Actor-critic PPO: GAE advantages, clipped policy and value losses, epochs × minibatches."""

    config_class = PPOConfig

    def __init__(self, envs: gym.vector.VectorEnv, config: PPOConfig | None = None, device: str = "cpu"):
        self.check_env(envs)
        self.config = config or PPOConfig()
        self.config.check_batch(envs.num_envs)
        self.device = torch.device(device)
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        n_actions = int(envs.single_action_space.n)
        self.policy = MLPActorCritic(obs_dim, n_actions, self.config.hidden_sizes).to(self.device)
        # fused Adam: one kernel for all parameters (CPU and CUDA); the per-tensor loop dominates small nets
        self.optimizer = torch.optim.Adam(
            self.policy.parameters(), lr=self.config.learning_rate, eps=self.config.adam_eps, fused=True
        )

    @classmethod
    def check_env(cls, envs: gym.vector.VectorEnv) -> None:
        action_space = envs.single_action_space
        if not isinstance(action_space, gym.spaces.Discrete):
            raise TypeError(
                f"env: PPO needs a Discrete action space, got {action_space}. Use an env with discrete "
                "actions, or wrap a continuous one with gymnasium.wrappers.DiscretizeAction."
            )
        obs_space = envs.single_observation_space
        if not isinstance(obs_space, gym.spaces.Box):
            raise TypeError(
                f"env: PPO's MLP policy needs a Box observation space, got {obs_space}. "
                "Flatten it with gymnasium.wrappers.vector.FlattenObservation."
            )

    # --- acting (no gradient) -------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> ActOutput:
        logits, values = self.policy(obs)  # (B, A), (B,)
        logp_all = torch.log_softmax(logits, dim=-1)
        actions = torch.multinomial(logp_all.exp(), 1)  # (B, 1)
        return ActOutput(actions.squeeze(-1), logp_all.gather(-1, actions).squeeze(-1), values)

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy(obs)[1]

    def _evaluate(self, obs: torch.Tensor, actions: torch.Tensor):
        logits, values = self.policy(obs)
        logp_all = torch.log_softmax(logits, dim=-1)  # (N, A)
        logprobs = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (N,)
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
        return logprobs, entropy, values

    # --- learning -----------------------------------------------------------------------------
    def update(self, rollout: Rollout, progress_remaining: float) -> dict[str, float]:
        cfg = self.config
        lr = cfg.learning_rate * (progress_remaining if cfg.anneal_lr else 1.0)
        clip = cfg.clip_range * (progress_remaining if cfg.anneal_clip_range else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        advantages, returns = gae(
            rollout.rewards, rollout.values, rollout.next_values, rollout.terminated, rollout.truncated,
            rollout.mask, cfg.gamma, cfg.gae_lambda,
        )  # (B, T) each
        m = rollout.mask
        if cfg.norm_adv and int(m.sum()) > 1:
            advantages = masked_whiten(advantages, m)
        # Transitions are independent given (s, a): keep the real ones as a flat batch of samples.
        data = {
            "obs": rollout.obs[m], "actions": rollout.actions[m], "logprobs": rollout.logprobs[m],
            "values": rollout.values[m], "advantages": advantages[m], "returns": returns[m],
        }
        n = data["actions"].shape[0]
        if n < cfg.num_minibatches:
            raise ValueError(f"rollout has {n} real transitions, fewer than num_minibatches={cfg.num_minibatches}")

        sums: dict[str, float] = {}
        count, nan_skipped, epochs_run, first_ratio_dev = 0, 0, 0, float("nan")
        for epoch in range(cfg.num_epochs):
            epochs_run = epoch + 1
            stop = False
            if cfg.num_minibatches == 1:  # full batch: order does not matter, skip the gather
                batches = [data]
            else:
                perm = torch.randperm(n, device=self.device)
                batches = [{k: v[idx] for k, v in data.items()} for idx in perm.chunk(cfg.num_minibatches)]
            for mb in batches:
                ones = torch.ones_like(mb["logprobs"], dtype=torch.bool)  # every sample here is real
                logprobs, entropy, values = self._evaluate(mb["obs"], mb["actions"])
                pg, pstats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], ones, clip)
                vl, _ = value_loss(values, mb["values"], mb["returns"], ones, cfg.clip_range_vf)
                ent = entropy.mean()
                loss = pg + cfg.vf_coef * vl - cfg.ent_coef * ent
                if count == 0 and nan_skipped == 0:
                    first_ratio_dev = float(pstats["ratio_max_dev"])  # health check: must be ~0
                if cfg.target_kl is not None and float(pstats["approx_kl"]) > 1.5 * cfg.target_kl:
                    stop = True
                    break
                self.optimizer.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):
                    nan_skipped += 1  # skip the step, keep the weights; logged as train/nan_skipped
                    continue
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    nan_skipped += 1
                    continue
                self.optimizer.step()
                count += 1
                for key, val in (
                    ("losses/policy", pg), ("losses/value", vl), ("losses/entropy", -ent),
                    ("losses/total", loss), ("policy/entropy", ent), ("policy/approx_kl", pstats["approx_kl"]),
                    ("policy/clipfrac", pstats["clipfrac"]), ("train/grad_norm", grad_norm),
                ):
                    sums[key] = sums.get(key, 0.0) + float(val.detach())
            if stop:
                break

        stats = {k: v / max(count, 1) for k, v in sums.items()}
        stats.update({
            "value/explained_variance": float(explained_variance(rollout.values, returns, m)),
            "charts/learning_rate": lr,
            "policy/clip_range": clip,
            "policy/first_ratio_dev": first_ratio_dev,
            "train/epochs_run": float(epochs_run),
            "train/nan_skipped": float(nan_skipped),
            "reward/advantage_mean": float(masked_mean(advantages, m)),
        })
        return stats

    # --- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
