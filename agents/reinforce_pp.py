"""REINFORCE++ (Hu et al. 2025, arXiv:2501.03262; as OpenRLHF's and verl's ``reinforce_plus_plus``).

Critic-free, one completion per prompt allowed. The per-token reward is the env's: the score at the last
token minus β·KL_t (k1, the :class:`~textrl.envs.kl_penalty.KLPenalty` wrapper; β = the run's ``kl.coef``).
The advantage of token t is its return G_t = Σ_{s≥t} γ^{s−t} r_s, normalised over the global batch's tokens:
A_t = (G_t − mean G) / std G. The update is PPO's token-level clipped ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import torch
from textrl.agents.base import (
    Agent,
    OnPolicyConfig,
    Reduce,
    entropy_terms,
    lm_batch,
    lm_forward,
    on_policy_logprobs,
)
from textrl.agents.group import check_text_env

from textrl.advantages import gae
from textrl.losses import policy_loss
from textrl.masking import masked_mean
from textrl.rollout import TokenRollout
from textrl.validate import in_range, positive_int

__all__ = ["ReinforcePPConfig", "ReinforcePP"]


@dataclass
class ReinforcePPConfig(OnPolicyConfig):
    """REINFORCE++ hyperparameters (OpenRLHF's defaults: γ = 1, one pass per batch, clip 0.2, grad norm 1)."""

    num_generations: int = 1
    """Completions per prompt in each batch (1 is enough: the baseline is the batch mean, not a group's)."""
    gamma: float = 1.0
    """Discount γ of the returns G_t."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("num_generations", self.num_generations)
        in_range("gamma", self.gamma, 0.0, 1.0)


class ReinforcePP(Agent):
    config_class: ClassVar[type] = ReinforcePPConfig
    kl_in: ClassVar[str] = "reward"

    @classmethod
    def check_env(cls, envs: gym.vector.VectorEnv, config: Any = None) -> None:
        check_text_env(envs, "REINFORCE++", (config or cls.config_class()).num_generations)

    @torch.no_grad()
    def prepare(self, ro: TokenRollout, reduce: Reduce) -> tuple[dict[str, Any], dict[str, float]]:
        m, zeros = ro.action_mask, torch.zeros_like(ro.rewards)
        # G_t: GAE with V ≡ 0 and λ = 1 is the discounted return (nothing to bootstrap from a zero critic)
        returns, _ = gae(ro.rewards, zeros, zeros, ro.terminated, ro.truncated, m, self.config.gamma, 1.0)
        advantages = reduce.whiten(returns, m)  # mean 0, std 1 over every real token of the global batch
        u_m = reduce.gather(m)
        stats = {"reward/return_mean": float(masked_mean(reduce.gather(returns), u_m)),
                 "reward/advantage_mean": float(masked_mean(reduce.gather(advantages), u_m))}
        return lm_batch(ro, logprobs=on_policy_logprobs(self.policy, ro), advantages=advantages), stats

    def loss(self, model: torch.nn.Module, mb: dict[str, Any], clip_range: float):
        logprobs, entropy, _ = lm_forward(model, mb)
        pg, pstats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["action_mask"], clip_range)
        return pg, {"losses/policy": pg, **entropy_terms(entropy, mb["action_mask"])}, pstats
