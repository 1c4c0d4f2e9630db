"""REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740).

Each completion is one action. Its reward is the sequence reward R_i = score_i − β·Σ_t KL_t (the KL stays
in the reward, from the env's :class:`~textrl.envs.kl_penalty.KLPenalty` wrapper, β = the run's ``kl.coef``),
its advantage the reward minus the mean reward of the other k − 1 completions of the same prompt, and the
update a clipped ratio of whole-sequence probabilities (as TRL's ``RLOOTrainer``). No critic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from textrl.agents.base import entropy_terms, lm_forward
from textrl.agents.group import GroupAgent, GroupConfig

from textrl.advantages import leave_one_out
from textrl.losses import sequence_policy_loss

__all__ = ["RLOOConfig", "RLOO"]


@dataclass
class RLOOConfig(GroupConfig):
    """RLOO hyperparameters (paper/TRL defaults: k = 4, one pass per batch, clip 0.2; β is the run's kl.coef)."""

    normalize_advantages: bool = False
    """Whiten the leave-one-out advantages over the batch (TRL's normalize_advantages; off in the paper)."""


class RLOO(GroupAgent):
    config_class = RLOOConfig
    kl_in = "reward"
    # approx_kl is per token (as every agent's); clipfrac per completion (the clip acts on completions)
    token_mean_stats = frozenset({"policy/entropy", "losses/entropy", "policy/approx_kl"})

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        adv = leave_one_out(rewards, self.config.num_generations)
        if self.config.normalize_advantages and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-4)
        return adv

    def loss(self, model: torch.nn.Module, mb: dict[str, Any], clip_range: float):
        logprobs, entropy, _ = lm_forward(model, mb)
        pg, pstats = sequence_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["action_mask"], clip_range)
        return pg, {"losses/policy": pg, **entropy_terms(entropy, mb["action_mask"])}, pstats
