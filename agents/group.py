"""What RLOO and GRPO share: critic-free, clipped-ratio updates from groups of k completions per prompt.

The text env serves every prompt ``num_generations`` = k times in one batch, in contiguous rows (its prompt
sampler does; ``textrl train`` asks for k from the agent), so group statistics are exact. A subclass says
how a group's rewards become advantages (:meth:`GroupAgent.advantages`) and what the minibatch loss is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import torch
from textrl.agents.base import Agent, OnPolicyConfig, Reduce, check_text_env, lm_batch, on_policy_logprobs

from textrl.rollout import TokenRollout

__all__ = ["GroupConfig", "GroupAgent"]


@dataclass
class GroupConfig(OnPolicyConfig):
    """Fields shared by the group-baseline agents (RLOO, GRPO). Defaults follow the papers and TRL."""

    num_generations: int = 4
    """k: completions sampled per prompt in each batch (the group); num_envs must be a multiple of k."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_generations, int) or isinstance(self.num_generations, bool) \
                or self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (a group baseline needs at least two completions per "
                             f"prompt), got {self.num_generations!r}")

    def check_batch(self, batch: int, what: str | None = None) -> None:
        """Fail before training unless num_envs splits into groups of k, then into minibatches."""
        k = self.num_generations
        if batch % k:
            raise ValueError(f"num_envs={batch} is not a multiple of num_generations={k}: each prompt is served "
                             f"k times per batch; choose num_envs from {[k * i for i in range(1, 9)]} or change "
                             "num_generations")
        super().check_batch(batch, what)


class GroupAgent(Agent):
    """Base of the critic-free group agents. Text envs only: a group needs k completions of one prompt."""

    config_class: ClassVar[type] = GroupConfig
    has_critic: ClassVar[bool] = False
    #: RLOO's and GRPO's default losses average over completions (GRPO's loss_type="token" over tokens)
    loss_unit: ClassVar[str] = "row"

    @classmethod
    def check_env(cls, envs: gym.vector.VectorEnv, config: Any = None) -> None:
        check_text_env(envs, cls.__name__, (config or cls.config_class()).num_generations)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Sequence rewards ``[B]`` of the global batch (grouped contiguously) → advantages ``[B]``."""
        raise NotImplementedError

    @torch.no_grad()
    def prepare(self, ro: TokenRollout, reduce: Reduce) -> tuple[dict[str, Any], dict[str, float]]:
        k = self.config.num_generations
        groups = ro.prompt_index.view(-1, k)
        if not bool((groups == groups[:, :1]).all()):
            raise ValueError(f"rollout rows are not grouped by prompt in runs of num_generations={k}: build the "
                             f"env with num_generations={k} and reset all rows together")
        # Advantages over the global batch (groups never straddle processes, but RLOO's normalisation and
        # GRPO's scale_rewards="batch" use batch statistics): computed on the union, this process's rows kept.
        rewards = reduce.gather(ro.rewards.sum(1))  # R_i = Σ_t r_t: the score minus, for RLOO, β·Σ_t KL_t
        rows = ro.input_ids.shape[0]
        advantages = reduce.local(self.advantages(rewards), rows)
        std = rewards.view(-1, k).std(1)
        stats = {"reward/advantage_mean": float(reduce.gather(advantages).mean()),
                 "reward/group_std": float(std.mean()),
                 "reward/frac_zero_std": float((std == 0).float().mean())}
        data = lm_batch(ro, logprobs=on_policy_logprobs(self.policy, ro), ref_logprobs=ro.ref_logprobs,
                        advantages=advantages)
        return data, stats
