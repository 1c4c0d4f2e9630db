"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1).

Advantage of completion i = (R_i − mean of its group) / (std of its group + eps), given to every one of
its tokens; token-level clipped ratio; the KL to the reference is a loss term, not a reward:

    L = agg_t[ −min(r_t·A_i, clip(r_t)·A_i) + β·k3_t ],  k3_t = π_ref/π_θ − log(π_ref/π_θ) − 1

with π_ref's log-probs taken from the env's info (the :class:`~textrl.envs.kl_penalty.KLPenalty` wrapper
computes them during the rollout with the coefficient set to 0), so there is no second reference forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from textrl.agents.group import GroupAgent, GroupConfig

from textrl.advantages import group_normalise
from textrl.losses import aggregate, kl_estimate, policy_loss

__all__ = ["GRPOConfig", "GRPO"]

_LOSS_TYPES = ("sequence", "token")
_SCALES = ("group", "batch", "none")


@dataclass
class GRPOConfig(GroupConfig):
    """GRPO hyperparameters (paper defaults: β = 0.04, per-sequence loss, group std scaling, clip 0.2)."""

    beta: float = 0.04
    """Weight of the k3 KL-to-reference loss term (the paper's 0.04; 0 drops it — TRL's default)."""
    loss_type: str = "sequence"
    """How token losses are averaged: "sequence" (the paper: mean over each completion's tokens, then over
    completions; TRL's loss_type="grpo") or "token" (every token equal, no length bias; TRL's "dapo")."""
    scale_rewards: str = "group"
    """Divide centred rewards by the group's std ("group", the paper), the batch's ("batch") or not ("none", Dr. GRPO)."""
    adv_eps: float = 1e-4
    """eps in (R − mean) / (std + eps)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in _LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in _SCALES:
            raise ValueError(f"scale_rewards must be one of {_SCALES}, got {self.scale_rewards!r}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if not self.adv_eps > 0:
            raise ValueError(f"adv_eps must be > 0, got {self.adv_eps!r}")


class GRPO(GroupAgent):
    config_class = GRPOConfig
    kl_in_reward = False

    token_mean_stats = frozenset({"policy/entropy", "losses/entropy", "policy/approx_kl", "policy/clipfrac"})

    @property
    def loss_unit(self) -> str:  # type: ignore[override]
        return "row" if self.config.loss_type == "sequence" else "token"

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return group_normalise(rewards, cfg.num_generations, cfg.scale_rewards, cfg.adv_eps)

    def _loss(self, mb: dict[str, Any], clip: float):
        cfg = self.config
        logprobs, entropy = self._policy_forward(mb)
        mask = mb["mask"]
        adv = mb["advantages"].unsqueeze(1).expand_as(logprobs)  # (b, T): the completion's advantage per token
        pg, pstats = policy_loss(logprobs, mb["logprobs"], adv, mask, clip, aggregation=cfg.loss_type)
        terms = {"losses/policy": pg, **self._entropy_terms(entropy, mask)}
        loss = pg
        if cfg.beta > 0:
            kl = aggregate(kl_estimate(logprobs, mb["ref_logprobs"], "k3"), mask, cfg.loss_type)
            loss = pg + cfg.beta * kl
            terms["losses/kl"] = kl
        return loss, terms, pstats
