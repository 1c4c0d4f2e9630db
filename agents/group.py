"""What RLOO and GRPO share: critic-free, clipped-ratio updates from groups of k completions per prompt.

The text env serves every prompt ``num_generations`` = k times in one batch, in contiguous rows
(``TextGenVectorEnv(num_generations=k)``; ``textrl train`` sets it from the agent's config), so group
statistics are exact. An agent subclass only says how a group's rewards become advantages
(:meth:`GroupAgent.advantages`) and what the minibatch loss is (:meth:`GroupAgent._loss`); collection,
the optimisation loop (epochs × minibatches × accumulation, grad clipping, NaN guard, accelerate) and
checkpoints are PPO's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import torch
from textrl.agents.ppo import PPO
from torch import nn

from textrl.distributed import Shard, gather_rows
from textrl.masking import masked_mean
from textrl.text_rollout import TextRollout

__all__ = ["GroupConfig", "GroupAgent"]


@dataclass
class GroupConfig:
    """Fields shared by the group-baseline agents (RLOO, GRPO). Defaults follow the papers and TRL: one
    optimisation pass per batch (TRL's ``num_iterations=1``), so the update is on-policy."""

    num_generations: int = 4
    """k: completions sampled per prompt in each batch (the group); num_envs must be a multiple of k."""
    num_epochs: int = 1
    """Passes over each batch (TRL's num_iterations μ); > 1 makes later passes off-policy (the clip matters)."""
    num_minibatches: int = 1
    """Minibatches per epoch (by completion); must divide num_envs."""
    learning_rate: float = 1e-6
    """Adam learning rate at the start (the papers' 1e-6 is for full fine-tuning; LoRA wants ~1e-4–1e-3)."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over training (TRL's default linear schedule)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_range: float = 0.2
    """Ratio clip ε."""
    anneal_clip_range: bool = False
    """Decay the clip range linearly to 0 over training."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (TRL's default 1.0)."""
    target_kl: float | None = None
    """Stop the epochs early once a minibatch's approx_kl exceeds 1.5 × target_kl; null never stops."""
    gradient_accumulation_steps: int = 1
    """Split each minibatch into this many micro-batches (same gradient, less memory)."""

    def __post_init__(self) -> None:
        for name in ("num_generations", "num_epochs", "num_minibatches", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (a group baseline needs at least two completions per "
                             f"prompt), got {self.num_generations}")
        for name in ("learning_rate", "clip_range", "max_grad_norm", "adam_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"target_kl must be > 0 or null (off), got {self.target_kl!r}")

    def check_batch(self, num_envs: int, rows_only: bool = True) -> None:
        """Fail before training unless num_envs splits into groups of k and into minibatches."""
        k = self.num_generations
        if num_envs % k:
            multiples = [k * i for i in range(1, 9)]
            raise ValueError(f"num_envs={num_envs} is not a multiple of num_generations={k}: each prompt is served "
                             f"k times per batch; choose num_envs from {multiples} or change num_generations")
        if num_envs % self.num_minibatches:
            divisors = [d for d in range(1, num_envs + 1) if num_envs % d == 0]
            raise ValueError(f"num_minibatches={self.num_minibatches} does not divide num_envs={num_envs}; "
                             f"choose num_minibatches from {divisors}")
        per_mb = num_envs // self.num_minibatches
        if per_mb % self.gradient_accumulation_steps:
            raise ValueError(f"gradient_accumulation_steps={self.gradient_accumulation_steps} does not divide the "
                             f"minibatch size {per_mb} (num_envs={num_envs} / num_minibatches={self.num_minibatches})")


class GroupAgent(PPO):
    """Base of the critic-free group agents. Text envs only: a group needs k completions of one prompt."""

    config_class: ClassVar[type] = GroupConfig
    #: True: the env's per-token KL penalty stays in the reward (RLOO); False: the trainer sets the env's
    #: coefficient to 0 and the agent puts the KL in its loss (GRPO). The env computes ref log-probs either way.
    kl_in_reward: ClassVar[bool] = True

    def __init__(self, envs: gym.vector.VectorEnv, config: Any = None, device: str = "cpu",
                 policy: nn.Module | None = None, accelerator: Any = None):
        name = type(self).__name__
        if policy is None:
            raise TypeError(f"env: {name} needs a text env and an LM policy (it compares k completions of the same "
                            f"prompt); got {type(envs.unwrapped).__name__}. Use PPO for classic Gymnasium envs.")
        config = config or self.config_class()
        served = getattr(envs.unwrapped, "num_generations", 1)
        if served != config.num_generations:
            raise ValueError(f"num_generations: the env serves each prompt {served} time(s) per batch but {name} "
                             f"expects {config.num_generations}; build the env with "
                             f"num_generations={config.num_generations} (textrl train does this for you)")
        # No critic: its parameters are frozen, so neither the optimiser nor DDP (which insists that every
        # trainable parameter gets a gradient) sees them.
        for module in (getattr(policy, "value_head", None), getattr(policy, "critic", None)):
            for p in module.parameters() if module is not None else ():
                p.requires_grad_(False)
        super().__init__(envs, config, device, policy=policy, accelerator=accelerator)

    #: RLOO's and GRPO's default losses average over completions (GRPO's loss_type="token" over tokens)
    loss_unit: ClassVar[str] = "row"

    # --- what subclasses define -------------------------------------------------------------------
    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Sequence rewards ``[B]`` (grouped contiguously) → advantages ``[B]``."""
        raise NotImplementedError

    def sequence_rewards(self, ro: TextRollout) -> torch.Tensor:
        """R_i = Σ_t r_t: the score minus, for RLOO, the env's β·Σ_t KL_t."""
        return ro.rewards.sum(1)

    # --- preparing a batch --------------------------------------------------------------------
    @torch.no_grad()
    def _prepare_text(self, ro: TextRollout) -> tuple[dict, dict]:
        k = self.config.num_generations
        groups = ro.prompt_index.view(-1, k)
        if not bool((groups == groups[:, :1]).all()):
            raise ValueError(f"rollout rows are not grouped by prompt in runs of num_generations={k}: build the "
                             f"env with num_generations={k} and reset all rows together")
        # Advantages over the global batch (groups never straddle processes, but RLOO's normalisation and
        # GRPO's scale_rewards="batch" use batch statistics): computed on the union, this process's rows kept.
        rewards = gather_rows(self.sequence_rewards(ro))
        rows = ro.input_ids.shape[0]
        advantages = Shard.current(rows).take(self.advantages(rewards), rows)
        old_logprobs = ro.logprobs  # the sampling policy's log-probs: the weights have not moved since
        if torch.is_autocast_enabled(ro.input_ids.device.type):  # the update runs another numeric path: recompute
            old_logprobs = torch.cat([c[0] for c in self._rollout_forward(ro, with_entropy=False)])
        std = rewards.view(-1, k).std(1)
        stats = {"reward/advantage_mean": float(gather_rows(advantages).mean()),
                 "reward/group_std": float(std.mean()),
                 "reward/frac_zero_std": float((std == 0).float().mean())}
        data = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "mask": ro.mask,
                "logprobs": old_logprobs, "ref_logprobs": ro.ref_logprobs, "advantages": advantages}
        return data, stats

    def _policy_forward(self, mb: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """New log-probs ``[b, T]`` (with gradient) and the entropy (no gradient, for logging)."""
        logprobs, entropy, _, _ = self.model(mb["input_ids"], mb["attention_mask"], response_start=mb["response_start"],
                                             temperature=self.temperature, with_entropy=True)
        return logprobs, entropy

    @staticmethod
    def _entropy_terms(entropy: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        ent = masked_mean(entropy, mask)
        return {"policy/entropy": ent, "losses/entropy": -ent}
