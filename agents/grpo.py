"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1).

Advantage of completion i = (R_i − mean of its group) / (std of its group + eps), given to every one of
its tokens; token-level clipped ratio; the KL to the reference is a loss term, not a reward:

    L = agg_t[ −min(r_t·A_i, clip(r_t)·A_i) + β·k3_t ],  k3_t = π_ref/π_θ − log(π_ref/π_θ) − 1

with β the run's ``kl.coef`` and π_ref's log-probs taken from the rollout (the
:class:`~textrl.envs.kl_penalty.KLPenalty` wrapper computes them with no penalty in the reward), so there is
no second reference forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from textrl.agents.base import entropy_terms, lm_forward
from textrl.agents.group import GroupAgent, GroupConfig

from textrl.advantages import group_normalise
from textrl.losses import aggregate, kl_estimate, policy_loss
from textrl.validate import finite_number, one_of

__all__ = ["GRPOConfig", "GRPO"]


@dataclass
class GRPOConfig(GroupConfig):
    """GRPO hyperparameters (paper defaults: per-sequence loss, group std scaling, clip 0.2). The KL loss
    term's β is the run's kl.coef (default 0.05; the paper used 0.04; 0 drops it, as TRL's default does)."""

    loss_type: str = "sequence"
    """How token losses are averaged: "sequence" (the paper: mean over each completion's tokens, then over
    completions; TRL's loss_type="grpo") or "token" (every token equal, no length bias; TRL's "dapo")."""
    scale_rewards: str = "group"
    """Divide centred rewards by the group's std ("group", the paper), the batch's ("batch") or not ("none", Dr. GRPO)."""
    adv_eps: float = 1e-4
    """eps in (R − mean) / (std + eps)."""
    kl_loss: str = "k3"
    """The KL loss term, differentiated through π_θ: "k3" (the paper and TRL) has the gradient of KL(π_ref‖π),
    the reverse direction; "k2" (½(log π − log π_ref)²) has the gradient of KL(π‖π_ref), the KL that PPO's
    reward penalises (enumerated exactly in tests/test_losses.py)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("kl_loss", self.kl_loss, ("k3", "k2"))
        one_of("loss_type", self.loss_type, ("sequence", "token"))
        one_of("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        finite_number("adv_eps", self.adv_eps, minimum=0)


class GRPO(GroupAgent):
    config_class = GRPOConfig
    kl_in = "loss"

    token_mean_stats = frozenset({"policy/entropy", "losses/entropy", "policy/approx_kl", "policy/clipfrac"})

    @property
    def loss_unit(self) -> str:  # type: ignore[override]
        return "row" if self.config.loss_type == "sequence" else "token"

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return group_normalise(rewards, cfg.num_generations, cfg.scale_rewards, cfg.adv_eps)

    def loss(self, model: torch.nn.Module, mb: dict[str, Any], clip_range: float):
        cfg, mask = self.config, mb["action_mask"]
        logprobs, entropy, _ = lm_forward(model, mb)
        adv = mb["advantages"].unsqueeze(1).expand_as(logprobs)  # (b, T): the completion's advantage per token
        pg, pstats = policy_loss(logprobs, mb["logprobs"], adv, mask, clip_range, aggregation=cfg.loss_type)
        terms = {"losses/policy": pg, **entropy_terms(entropy, mask)}
        loss = pg
        if self.kl_coef > 0:
            kl = aggregate(kl_estimate(logprobs, mb["ref_logprobs"], cfg.kl_loss), mask, cfg.loss_type)
            loss = pg + self.kl_coef * kl
            terms["losses/kl"] = kl
        return loss, terms, pstats
