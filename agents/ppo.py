"""Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) with a critic and GAE.

One implementation for every Gymnasium vector env with a Discrete action space. The agent only implements
``update``; collection is shared (:mod:`textrl.rollout`), the maths is in :mod:`textrl.advantages` and
:mod:`textrl.losses`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from textrl.agents.base import Agent
from torch import nn

from textrl.advantages import gae, next_values_from
from textrl.distributed import (
    Shard,
    all_max,
    all_sum,
    configure_deepspeed,
    gather_rows,
    is_deepspeed,
    world_size,
)
from textrl.losses import explained_variance, policy_loss, value_loss
from textrl.masking import masked_mean, masked_whiten
from textrl.rollout import ActOutput, Rollout
from textrl.text_rollout import TextRollout

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
    gradient_accumulation_steps: int = 1
    """Split each minibatch into this many micro-batches (same gradient, less memory)."""
    whiten_rewards: bool = False
    """Text envs: scale per-token rewards to unit variance (mean kept) before GAE."""

    def __post_init__(self) -> None:
        self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
        for name in ("num_steps", "num_epochs", "num_minibatches", "gradient_accumulation_steps"):
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

    def check_batch(self, num_envs: int, rows_only: bool = False) -> None:
        """Fail before training if the rollout batch does not split into minibatches (and micro-batches).
        Classic envs: the batch is num_envs × num_steps transitions; text envs (``rows_only``): num_envs rows."""
        batch = num_envs if rows_only else num_envs * self.num_steps
        what = f"num_envs = {num_envs}" if rows_only else \
            f"num_envs × num_steps = {num_envs} × {self.num_steps} = {batch}"
        if batch % self.num_minibatches:
            divisors = [d for d in range(1, min(batch, 64) + 1) if batch % d == 0]
            raise ValueError(
                f"num_minibatches={self.num_minibatches} does not divide the batch size {what}; "
                f"choose num_minibatches from {divisors} or change num_steps/num_envs"
            )
        per_mb = batch // self.num_minibatches
        if per_mb % self.gradient_accumulation_steps:
            raise ValueError(f"gradient_accumulation_steps={self.gradient_accumulation_steps} does not divide the "
                             f"minibatch size {per_mb} ({what} / num_minibatches={self.num_minibatches})")


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
    """Actor-critic PPO: GAE advantages, clipped policy and value losses, epochs × minibatches.

    Classic envs (Box observations, Discrete actions) get an :class:`MLPActorCritic` and learn from
    :class:`~textrl.rollout.Rollout` batches of independent transitions. Text envs get the
    :class:`~textrl.lm_policy.LMActorCritic` passed as ``policy`` and learn from
    :class:`~textrl.text_rollout.TextRollout` batches, minibatched by row. The optimisation loop is shared.
    """

    config_class = PPOConfig

    def __init__(
        self,
        envs: gym.vector.VectorEnv,
        config: PPOConfig | None = None,
        device: str = "cpu",
        policy: nn.Module | None = None,
        accelerator: Any = None,
    ):
        self.config = config or PPOConfig()
        self.accelerator = accelerator  # accelerate.Accelerator: backward and grad clipping go through it
        self.device = torch.device(device)
        self.is_text = policy is not None
        if self.is_text:
            self.policy = policy
            self.config.check_batch(envs.num_envs, rows_only=True)
        else:
            self.check_env(envs)
            self.config.check_batch(envs.num_envs)
            obs_dim = int(np.prod(envs.single_observation_space.shape))
            n_actions = int(envs.single_action_space.n)
            self.policy = MLPActorCritic(obs_dim, n_actions, self.config.hidden_sizes).to(self.device)
        self.params = self._trainable_parameters()
        # fused Adam: one kernel for all parameters (CPU and CUDA); the per-tensor loop dominates small nets
        self.optimizer = torch.optim.Adam(self.params, lr=self.config.learning_rate, eps=self.config.adam_eps,
                                          fused=True)
        # ``model`` is what the update calls: the policy itself, or accelerate's wrapper of it (DDP when several
        # processes run, a DeepSpeed engine under DeepSpeed) that synchronises the gradients. ``policy`` stays
        # the plain module (rollouts, checkpoints).
        self.model = self.policy
        self.deepspeed = is_deepspeed(accelerator)
        if self.deepspeed:  # a micro-batch: this process's share of a minibatch, split for accumulation
            batch = envs.num_envs if self.is_text else envs.num_envs * self.config.num_steps
            configure_deepspeed(accelerator, batch // self.config.num_minibatches //
                                self.config.gradient_accumulation_steps, self.config.max_grad_norm)
        if accelerator is not None:
            self.model, self.optimizer = accelerator.prepare(self.policy, self.optimizer)
        self.temperature = 1.0  # text envs: the sampling temperature, set by the trainer

    def _trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

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

    def _evaluate(self, mb: dict[str, torch.Tensor]):
        """New log-probs, entropy and values for a minibatch, in the shape of ``mb["mask"]``."""
        if self.is_text:
            # Without an entropy bonus the entropy is not recomputed per minibatch: policy/entropy then comes
            # from the one no-grad pass over the rollout (the rollout policy's entropy).
            bonus = self.config.ent_coef > 0
            logprobs, entropy, values, _ = self.model(
                mb["input_ids"], mb["attention_mask"], response_start=mb["response_start"],
                temperature=self.temperature, entropy_grad=bonus, with_entropy=bonus)
            return logprobs, entropy, values
        logits, values = self.model(mb["obs"])
        logp_all = torch.log_softmax(logits, dim=-1)  # (N, A)
        logprobs = logp_all.gather(-1, mb["actions"].unsqueeze(-1)).squeeze(-1)  # (N,)
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
        return logprobs, entropy, values

    # --- preparing a batch --------------------------------------------------------------------
    def _prepare_classic(self, rollout: Rollout) -> tuple[dict, dict]:
        cfg = self.config
        advantages, returns = gae(
            rollout.rewards, rollout.values, rollout.next_values, rollout.terminated, rollout.truncated,
            rollout.mask, cfg.gamma, cfg.gae_lambda,
        )  # (B, T) each
        m = rollout.mask
        u_m = gather_rows(m)  # statistics over all processes' sub-envs
        stats = {"value/explained_variance": float(explained_variance(gather_rows(rollout.values),
                                                                      gather_rows(returns), u_m))}
        if cfg.norm_adv:
            advantages = self._whiten(advantages, m)
        stats["reward/advantage_mean"] = float(masked_mean(gather_rows(advantages), u_m))
        # Transitions are independent given (s, a): keep the real ones as a flat batch of samples.
        n = int(m.sum())
        data = {
            "obs": rollout.obs[m], "actions": rollout.actions[m], "logprobs": rollout.logprobs[m],
            "values": rollout.values[m], "advantages": advantages[m], "returns": returns[m],
            "mask": torch.ones(n, dtype=torch.bool, device=m.device),
        }
        return data, stats

    @torch.no_grad()
    def _prepare_text(self, ro: TextRollout) -> tuple[dict, dict]:
        """One no-grad forward recomputes old log-probs and values V(s_0..s_T) (TRL does the same); the
        recomputed log-probs must equal the sampled ones (a temperature/padding health check)."""
        cfg = self.config
        input_ids, attn = ro.input_ids, ro.attention_mask
        m = ro.mask
        chunks = self._rollout_forward(ro)
        old_logprobs = torch.cat([c[0] for c in chunks])  # (B, T)
        entropy = torch.cat([c[1] for c in chunks])  # (B, T) of the rollout policy
        values = torch.cat([c[2] for c in chunks])  # (B, T) V(s_t)
        last_values = torch.cat([c[3] for c in chunks])  # (B,) V(s_T)
        next_values = next_values_from(values, last_values)
        rewards = ro.rewards
        if cfg.whiten_rewards:
            rewards = self._whiten(rewards, m, shift_mean=False)
        # A text episode's score is paid at its last token whether it ended at EOS or at max_new_tokens, so
        # both ends are terminal for the advantage: bootstrapping a truncated completion from V(s_T) would add
        # the critic's guess of a score that was already paid (the critic's target would chase itself).
        ended = ro.terminated | ro.truncated
        advantages, returns = gae(rewards, values, next_values, ended, torch.zeros_like(ended), m, cfg.gamma,
                                  cfg.gae_lambda)
        # statistics over the whole (global) batch: the union of the processes' shards
        u_m, u_values, u_returns = gather_rows(m), gather_rows(values), gather_rows(returns)
        stats = {
            "value/explained_variance": float(explained_variance(u_values, u_returns, u_m)),
            "policy/rollout_logprob_diff": float(all_max(((old_logprobs - ro.logprobs).abs() * m).max())),
            "policy/entropy": float(masked_mean(gather_rows(entropy), u_m)),
        }
        if cfg.norm_adv:
            advantages = self._whiten(advantages, m)
        stats["reward/advantage_mean"] = float(masked_mean(gather_rows(advantages), u_m))
        data = {"input_ids": input_ids, "attention_mask": attn, "mask": m, "logprobs": old_logprobs,
                "values": values, "advantages": advantages, "returns": returns}
        return data, stats

    @staticmethod
    def _whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """:func:`masked_whiten` with the statistics of the global batch (all processes' rows); unchanged
        when it has fewer than two real positions."""
        if world_size() == 1:
            return masked_whiten(x, mask, shift_mean) if int(mask.sum()) > 1 else x
        u_x, u_m = gather_rows(x), gather_rows(mask)
        if int(u_m.sum()) <= 1:
            return x
        return Shard.current(x.shape[0]).take(masked_whiten(u_x, u_m, shift_mean), x.shape[0])

    @torch.no_grad()
    def _rollout_forward(self, ro: TextRollout, with_entropy: bool = True, rows: int = 16) -> list[tuple]:
        """``evaluate_response`` over the rollout in chunks of ``rows`` (bounds the [rows, T, V] logits)."""
        P = ro.prompt_ids.shape[1]
        ids, attn = ro.input_ids, ro.attention_mask
        return [self.policy.evaluate_response(ids[i : i + rows], attn[i : i + rows], P, self.temperature,
                                              with_entropy=with_entropy) for i in range(0, ids.shape[0], rows)]

    # --- learning -----------------------------------------------------------------------------
    def update(self, rollout: Rollout | TextRollout, progress_remaining: float) -> dict[str, float]:
        cfg = self.config
        lr = cfg.learning_rate * (progress_remaining if cfg.anneal_lr else 1.0)
        clip = cfg.clip_range * (progress_remaining if cfg.anneal_clip_range else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if isinstance(rollout, TextRollout):
            data, stats = self._prepare_text(rollout)
            response_start = rollout.prompt_ids.shape[1]
        else:
            data, stats = self._prepare_classic(rollout)
            response_start = 0
        stats.update(self._optimise(data, clip, response_start))
        if "policy/entropy" in stats and "losses/entropy" not in stats:
            stats["losses/entropy"] = -stats["policy/entropy"]
        stats.update({"charts/learning_rate": lr, "policy/clip_range": clip})
        return stats

    #: what a minibatch loss averages over: "token" (every real token weighs the same) or "row" (completions)
    loss_unit: str = "token"
    #: logged terms that are means over tokens whatever ``loss_unit`` is (averaged over micro-batches and
    #: processes by token count, so they equal the value over the whole minibatch)
    token_mean_stats: frozenset[str] = frozenset({"policy/entropy", "losses/entropy"})

    def _units(self, mask: torch.Tensor) -> int:
        """How many loss units (real tokens, or rows with a real token) a micro-batch's ``mask`` holds."""
        return int(mask.sum()) if self.loss_unit == "token" else int(mask.reshape(mask.shape[0], -1).any(1).sum())

    def _optimise(self, data: dict[str, torch.Tensor], clip: float, response_start: int) -> dict[str, float]:
        """Epochs × minibatches (× gradient-accumulation micro-batches) over the leading dim of ``data``.

        Data-parallel runs: each process takes the same number of rows from its shard for every minibatch, and
        each micro-batch loss is weighted by its share of the global minibatch's loss units (× the process
        count, which DDP's gradient average divides out), so the synchronised gradient is the gradient of the
        loss over the union of the shards. Decisions that change control flow (a non-finite loss, the
        target_kl stop) are taken on global values, so every process takes the same path.
        """
        cfg = self.config
        n = data["mask"].shape[0]
        world = world_size()
        dev = data["mask"].device
        if n < cfg.num_minibatches:
            raise ValueError(f"the batch has {n} samples, fewer than num_minibatches={cfg.num_minibatches}")
        sums: dict[str, float] = {}
        count, nan_skipped, epochs_run, first_ratio_dev, grad_norm_sum = 0, 0, 0, float("nan"), 0.0
        for epoch in range(cfg.num_epochs):
            epochs_run = epoch + 1
            stop = False
            if cfg.num_minibatches == 1:  # full batch: order does not matter, skip the gather
                minibatches = [torch.arange(n, device=dev)]
            else:
                minibatches = list(torch.randperm(n, device=dev).chunk(cfg.num_minibatches))
            for idx in minibatches:
                self.optimizer.zero_grad(set_to_none=True)
                finite, mb_stats = True, {}
                micro = idx.chunk(cfg.gradient_accumulation_steps)
                units = [self._units(data["mask"][mi]) for mi in micro]
                tokens = [int(data["mask"][mi].sum()) for mi in micro]
                total, total_tokens = (max(float(x), 1.0) for x in all_sum(
                    torch.tensor([float(sum(units)), float(sum(tokens))], dtype=torch.float64, device=dev)))
                for j, mi in enumerate(micro):
                    mb: dict[str, Any] = {k: v[mi] for k, v in data.items()}
                    mb["response_start"] = response_start
                    weight = units[j] / total  # this micro-batch's share of the global minibatch's loss
                    with self._sync_gradients(j == len(micro) - 1):
                        loss, terms, pstats = self._loss(mb, clip)
                        if count == 0 and j == 0 and math.isnan(first_ratio_dev):
                            first_ratio_dev = float(pstats["ratio_max_dev"])  # health check: must be ~0
                        approx_kl, bad = pstats["approx_kl"].detach().float(), not bool(torch.isfinite(loss))
                        if world > 1:  # one collective: the global approx_kl and whether any process saw a NaN
                            agreed = all_sum(torch.stack([approx_kl * units[j], torch.tensor(float(units[j]),
                                             device=dev), torch.tensor(float(bad), device=dev)]))
                            approx_kl, bad = agreed[0] / agreed[1].clamp(min=1), bool(agreed[2] > 0)
                        if cfg.target_kl is not None and float(approx_kl) > 1.5 * cfg.target_kl:
                            stop = True
                            break
                        if bad:
                            finite = False
                            break
                        self._backward(loss * (weight * world), last=j == len(micro) - 1)
                    terms.update({"losses/total": loss, "policy/approx_kl": pstats["approx_kl"],
                                  "policy/clipfrac": pstats["clipfrac"]})
                    for key, val in terms.items():  # token means weigh by tokens, the rest by loss units
                        w = tokens[j] / total_tokens if key in self.token_mean_stats else weight
                        mb_stats[key] = mb_stats.get(key, 0.0) + float(val.detach()) * w
                if stop:
                    break
                grad_norm = self._clip_grad_norm() if finite else None
                if not finite or not torch.isfinite(grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    nan_skipped += 1  # skip the step, keep the weights; logged as train/nan_skipped
                    continue
                self.optimizer.step()
                count += 1
                grad_norm_sum += float(grad_norm)  # after synchronisation: the same on every process
                for key, val in mb_stats.items():
                    sums[key] = sums.get(key, 0.0) + val
            if stop:
                break
        self.optimizer.zero_grad(set_to_none=True)
        if world > 1 and sums:  # each process holds its shards' weighted share: the sum is the global value
            keys = list(sums)
            totals = all_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=dev)).tolist()
            sums = dict(zip(keys, totals, strict=True))
            first_ratio_dev = float(all_max(torch.tensor(first_ratio_dev, device=dev)))
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        if count:
            stats["train/grad_norm"] = grad_norm_sum / count
        stats.update({"policy/first_ratio_dev": first_ratio_dev, "train/epochs_run": float(epochs_run),
                      "train/nan_skipped": float(nan_skipped)})
        return stats

    def _sync_gradients(self, sync: bool):
        """Inside a data-parallel run, skip DDP's gradient all-reduce on all but a minibatch's last micro-batch."""
        if sync or self.accelerator is None or world_size() == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def _loss(self, mb: dict[str, Any], clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        """The minibatch loss: clipped policy loss + vf_coef · value loss − ent_coef · entropy.
        Returns ``(loss, terms to log, policy_loss stats)``; critic-free agents override this."""
        cfg = self.config
        logprobs, entropy, values = self._evaluate(mb)
        pg, pstats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], clip)
        vl, _ = value_loss(values, mb["values"], mb["returns"], mb["mask"], cfg.clip_range_vf)
        ent = masked_mean(entropy, mb["mask"]) if entropy is not None else None
        loss = pg + cfg.vf_coef * vl - (cfg.ent_coef * ent if ent is not None else 0.0)
        terms = {"losses/policy": pg, "losses/value": vl}
        if ent is not None:
            terms.update({"losses/entropy": -ent, "policy/entropy": ent})
        return loss, terms, pstats

    def _backward(self, loss: torch.Tensor, last: bool = True) -> None:
        if self.accelerator is not None:
            if self.deepspeed:  # DeepSpeed steps inside backward at an accumulation boundary: mark it ourselves
                self.accelerator.gradient_state._set_sync_gradients(last)
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _clip_grad_norm(self) -> torch.Tensor:
        if self.accelerator is not None:
            norm = self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
            # DeepSpeed clipped (and stepped) inside backward and reports the norm it saw (None if it has none)
            return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32) if self.deepspeed else norm
        return nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)

    # --- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Trained weights and optimiser state (under DeepSpeed the optimiser state is partitioned across the
        processes and lives in the engine's own checkpoint: :meth:`save_engine`)."""
        trained = {id(p) for p in self.params}
        model = {n: p.detach() for n, p in self.policy.named_parameters() if id(p) in trained}
        return {"model": model, "optimizer": {} if self.deepspeed else self.optimizer.state_dict()}

    def save_engine(self, folder: str | Path, tag: str) -> None:
        """DeepSpeed only, on every process: the engine's checkpoint (each process writes its partition)."""
        self.model.save_checkpoint(str(folder), tag=tag)

    def load_engine(self, folder: str | Path, tag: str) -> None:
        path, _ = self.model.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise FileNotFoundError(f"resume: no DeepSpeed checkpoint {tag!r} in {str(folder)!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = self.policy.load_state_dict(state["model"], strict=False).missing_keys
        trained = {id(p) for p in self.params}
        trainable = {n for n, p in self.policy.named_parameters() if id(p) in trained}
        if trainable & set(missing):
            raise ValueError(f"checkpoint lacks trainable weights {sorted(trainable & set(missing))[:5]}")
        if not self.deepspeed:
            self.optimizer.load_state_dict(state["optimizer"])
