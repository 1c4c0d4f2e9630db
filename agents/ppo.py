"""Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) with a critic and GAE.

One agent for every Gymnasium vector env with a Discrete action space and for language models: classic envs
give a :class:`~textrl.rollout.Rollout` of transitions (policy: :class:`~textrl.agents.mlp.MLPActorCritic`),
text envs a :class:`~textrl.rollout.TokenRollout` of completions (policy:
:class:`~textrl.lm.policy.LMActorCritic`, minibatched by row). This file holds the config and the maths;
the advantage estimator is :func:`textrl.advantages.gae`, the losses are in :mod:`textrl.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import torch
from textrl.agents.base import Agent, Reduce, UpdateConfig, is_token_env, lm_batch, lm_forward

from textrl.advantages import gae, next_action_values
from textrl.losses import explained_variance, policy_loss, value_loss
from textrl.masking import masked_mean
from textrl.rollout import Rollout, TokenRollout
from textrl.validate import finite_number, in_range, optional_positive, positive_int

__all__ = ["PPOConfig", "PPO"]


@dataclass
class PPOConfig(UpdateConfig):
    """PPO hyperparameters. Defaults are the RLHF seed's (γ=1, λ=0.95, 4 epochs, clip 0.2, value clip 0.2,
    vf_coef 0.1, Adam eps 1e-5, linear LR decay); classic-control presets live in ``experiments/presets``."""

    num_steps: int = 128
    """Classic envs: steps each sub-env takes per rollout; the batch is num_envs × num_steps transitions."""
    gamma: float = 1.0
    """Discount factor γ."""
    gae_lambda: float = 0.95
    """GAE λ: 0 gives one-step TD advantages, 1 gives Monte-Carlo returns minus V."""
    clip_range_vf: float | None = 0.2
    """Value clip ε_v around the rollout's values; null turns value clipping off."""
    norm_adv: bool = True
    """Whiten advantages (mean 0, std 1 over the real steps of the batch) before the epochs."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    vf_coef: float = 0.1
    """Weight of the value loss. Ours has no ½ factor, so TRL's/CleanRL's vf_coef is 2 × ours (our 0.1 = their 0.2)."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Classic envs: hidden layer widths of the MLP policy and value networks."""
    whiten_rewards: bool = False
    """Text envs: scale per-token rewards to unit variance (mean kept) before GAE."""

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = self.hidden_sizes if isinstance(self.hidden_sizes, (list, tuple)) else (self.hidden_sizes,)
        if not sizes or any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in sizes):
            raise ValueError(f"hidden_sizes must be one or more positive integers (the MLP's layer widths), got "
                             f"{self.hidden_sizes!r}; e.g. --hidden-sizes 64,64")
        self.hidden_sizes = tuple(sizes)
        positive_int("num_steps", self.num_steps)
        for name in ("gamma", "gae_lambda"):
            in_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("ent_coef", "vf_coef"):
            finite_number(name, getattr(self, name), minimum=0, strict=False)
        optional_positive("clip_range_vf", self.clip_range_vf)


class PPO(Agent):
    """Actor-critic PPO: GAE advantages, clipped policy and value losses, epochs × minibatches."""

    config_class: ClassVar[type] = PPOConfig
    kl_in: ClassVar[str] = "reward"
    has_critic: ClassVar[bool] = True

    @classmethod
    def check_env(cls, envs: gym.vector.VectorEnv, config: Any = None) -> None:
        """Text envs: any. Classic envs: a Discrete action space and a Box observation space (what the MLP
        policy reads)."""
        if is_token_env(envs):
            return
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

    # --- a rollout → a batch --------------------------------------------------------------------
    def prepare(self, rollout: Rollout | TokenRollout, reduce: Reduce) -> tuple[dict[str, Any], dict[str, float]]:
        if isinstance(rollout, TokenRollout):
            return self._prepare_tokens(rollout, reduce)
        return self._prepare_transitions(rollout, reduce)

    def _prepare_transitions(self, rollout: Rollout, reduce: Reduce) -> tuple[dict, dict]:
        cfg = self.config
        advantages, returns = gae(
            rollout.rewards, rollout.values, rollout.next_values, rollout.terminated, rollout.truncated,
            rollout.mask, cfg.gamma, cfg.gae_lambda, bootstrap_truncated=rollout.bootstrap_truncated,
        )  # (B, T) each
        m = rollout.mask
        u_m = reduce.gather(m)  # statistics over all processes' sub-envs
        stats = {"value/explained_variance": float(explained_variance(reduce.gather(rollout.values),
                                                                      reduce.gather(returns), u_m))}
        if cfg.norm_adv:
            advantages = reduce.whiten(advantages, m)
        stats["reward/advantage_mean"] = float(masked_mean(reduce.gather(advantages), u_m))
        # Transitions are independent given (s, a): keep the real ones as a flat batch of samples.
        n = int(m.sum())
        data = {
            "obs": rollout.obs[m], "actions": rollout.actions[m], "logprobs": rollout.logprobs[m],
            "values": rollout.values[m], "advantages": advantages[m], "returns": returns[m],
            "action_mask": torch.ones(n, dtype=torch.bool, device=m.device),
        }
        return data, stats

    @torch.no_grad()
    def _prepare_tokens(self, ro: TokenRollout, reduce: Reduce) -> tuple[dict, dict]:
        """One no-grad forward recomputes old log-probs and values V(s_0..s_T) (TRL does the same); the
        recomputed log-probs must equal the sampled ones (a temperature/padding health check)."""
        cfg, m = self.config, ro.action_mask
        old_logprobs, entropy, values, last_values = self.policy.evaluate_batch(
            ro.input_ids, ro.attention_mask, ro.response_start)  # (B, T) ×3: the rollout policy's; (B,) V(s_T)
        rewards = reduce.whiten(ro.rewards, m, shift_mean=False) if cfg.whiten_rewards else ro.rewards
        advantages, returns = gae(rewards, values, next_action_values(values, last_values, m), ro.terminated,
                                  ro.truncated, m, cfg.gamma, cfg.gae_lambda,
                                  bootstrap_truncated=ro.bootstrap_truncated)
        # statistics over the whole (global) batch: the union of the processes' shards
        u_m = reduce.gather(m)
        ent = float(masked_mean(reduce.gather(entropy), u_m))
        stats = {
            "value/explained_variance": float(explained_variance(reduce.gather(values), reduce.gather(returns), u_m)),
            "policy/rollout_logprob_diff": float(reduce.max(torch.where(m, (old_logprobs - ro.logprobs).abs(), 0.0).max())),
            "policy/entropy": ent,
            "losses/entropy": -ent,  # replaced by the minibatches' value when an entropy bonus recomputes it
        }
        if cfg.norm_adv:
            advantages = reduce.whiten(advantages, m)
        stats["reward/advantage_mean"] = float(masked_mean(reduce.gather(advantages), u_m))
        return lm_batch(ro, logprobs=old_logprobs, values=values, advantages=advantages, returns=returns), stats

    # --- a minibatch → a loss -------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, mb: dict[str, Any], clip_range: float):
        """Clipped policy loss + vf_coef · value loss − ent_coef · entropy."""
        cfg, mask = self.config, mb["action_mask"]
        logprobs, entropy, values = self._forward(model, mb)
        pg, pstats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask, clip_range)
        vl, _ = value_loss(values, mb["values"], mb["returns"], mask, cfg.clip_range_vf)
        ent = masked_mean(entropy, mask) if entropy is not None else None
        loss = pg + cfg.vf_coef * vl - (cfg.ent_coef * ent if ent is not None else 0.0)
        terms = {"losses/policy": pg, "losses/value": vl}
        if ent is not None:
            terms.update({"losses/entropy": -ent, "policy/entropy": ent})
        return loss, terms, pstats

    def _forward(self, model: torch.nn.Module, mb: dict[str, Any]):
        """New log-probs, entropy and values for a minibatch, in the shape of its ``action_mask``."""
        if "input_ids" in mb:
            # Without an entropy bonus the entropy is not recomputed per minibatch: policy/entropy then comes
            # from the one no-grad pass over the rollout (the rollout policy's entropy).
            bonus = self.config.ent_coef > 0
            return lm_forward(model, mb, with_entropy=bonus, entropy_grad=bonus)
        # A classic env's categorical over a few actions, no temperature: log_softmax, as the MLP samples it
        # (textrl.logprobs' logsumexp form is equal in value but not in the last bit, and CartPole's golden
        # run then drifts after ~15 updates)
        logits, values = model(mb["obs"])
        logp_all = torch.log_softmax(logits, dim=-1)  # (N, A)
        logprobs = logp_all.gather(-1, mb["actions"].unsqueeze(-1)).squeeze(-1)  # (N,)
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
        return logprobs, entropy, values
