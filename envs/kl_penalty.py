"""KL-to-reference reward wrapper: reward_t = score_t − β·KL_t with KL_t an estimate of KL(π ‖ π_ref) at
the sampled token (k1 = log π(a_t|s_t) − log π_ref(a_t|s_t) by default; see :func:`textrl.losses.kl_estimate`).

Contract: the policy's log-prob of each chosen token travels **with the action** —
``env.step({"token": LongTensor[B], "logprob": FloatTensor[B]})`` — so no second policy forward is needed.
That log-prob must be of the temperature-scaled distribution that was sampled, with the same
``temperature`` given here.

Two ways to compute the reference (``reference_pass``), giving equal batches (tested to 1e-5):

- ``"per_token"``: the reference steps with the env in its own KV cache (a prefill at reset, then one
  batched forward of one token per step; a reset by ``reset_mask`` prefills the restarted rows alone and joins
  them to that cache), and every ``step`` already returns the penalised reward with
  ``info`` keys ``kl`` (the per-token estimate, 0 on invalid rows), ``kl_penalty`` (β·kl), ``ref_logprob``
  and ``kl_coef`` (β) — what a user stepping the env by hand sees.
- ``"sequence"`` (what ``textrl train`` uses): ``step`` returns the task reward only and adds nothing to
  ``info``; after the episodes end, :meth:`KLPenalty.on_episode_end` (the collection hook) runs one parallel
  reference forward over the finished sequences and fills the rollout's ``ref_logprobs``, ``kl`` and
  penalised ``rewards`` (as TRL does after ``generate``; cheaper than a decode step per token).

Agents with the KL in their loss (GRPO) get the wrapper with β = 0: it still reports the reference log-probs.

Spaces: ``action_space`` says what ``step`` accepts, ``Dict(token = the env's action space (MultiDiscrete),
logprob = Box(-inf, 0, (B,), float32))`` (``single_action_space`` per row), so ``action_space.sample()``
steps (a sampled log-prob is just a made-up value). Observations pass through; every info key added has its
``_key`` mask. For Gymnasium's stock vector wrappers put
:class:`~textrl.envs.text_gen.TorchToNumpy` around this wrapper (see :mod:`textrl.envs.text_gen`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from textrl.kl_control import AdaptiveKLController, FixedKLController
from textrl.lm.collect import context_column
from textrl.lm.decoding import CachedForward, sequence_logprobs
from textrl.losses import KLEstimator, kl_estimate
from textrl.rollout import TokenRollout

__all__ = ["KLPenalty"]


class KLPenalty(gym.vector.VectorWrapper):
    """Adds −β·KL(π‖π_ref) per generated token to a text env's reward.

    Args:
        env: a :class:`~textrl.envs.text_gen.TextGenVectorEnv` (or a wrapper of one).
        ref_model: the frozen reference causal LM (put in eval mode with gradients off here), or any callable
            with the same forward signature (e.g. the LoRA policy with adapters disabled, left untouched).
        kl_coef: β as a number, or a Fixed/Adaptive KL controller (its ``value`` is read every step).
        estimator: "k1" (default), "k2" or "k3".
        temperature: the sampling temperature; reference log-probs use logits / temperature.
        reference_pass: "per_token" or "sequence" (see the module docstring).
    """

    def __init__(
        self,
        env: gym.vector.VectorEnv,
        ref_model: torch.nn.Module,
        kl_coef: float | FixedKLController | AdaptiveKLController = 0.05,
        estimator: KLEstimator = "k1",
        temperature: float = 1.0,
        reference_pass: str = "per_token",
    ):
        super().__init__(env)
        if reference_pass not in ("per_token", "sequence"):
            raise ValueError(f"reference_pass must be 'per_token' or 'sequence', got {reference_pass!r}")
        if estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.reference_pass = reference_pass
        self.ref_model, self.temperature, self.estimator = ref_model, float(temperature), estimator
        self.controller = kl_coef if hasattr(kl_coef, "value") else FixedKLController(float(kl_coef))
        if isinstance(ref_model, torch.nn.Module):  # a separate frozen copy; a view of the policy
            ref_model.eval()                          # (LoRA adapters off) must not freeze its weights
            for p in ref_model.parameters():
                p.requires_grad_(False)
        self.ref = CachedForward(ref_model) if reference_pass == "per_token" else None  # the per-step reference
        self._ended: torch.Tensor | None = None  # (B,) rows whose episode ended since their reset
        logprob = gym.spaces.Box(-np.inf, 0.0, (), np.float32)
        self.single_action_space = gym.spaces.Dict({"token": env.single_action_space, "logprob": logprob})
        self.action_space = gym.spaces.Dict({"token": env.action_space,
                                             "logprob": gym.vector.utils.batch_space(logprob, env.num_envs)})

    @property
    def kl_coef(self) -> float:
        return self.controller.value

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        if self.reference_pass == "per_token":
            reset = options.get("reset_mask") if options else None
            if reset is None or self.ref.mask is None or bool(torch.as_tensor(reset).all()):
                self.ref.prefill(obs["input_ids"], obs["attention_mask"])
            else:  # rows restarted by mask join the cache; the others keep theirs (continuous batching)
                rows = torch.as_tensor(reset, device=obs["input_ids"].device).nonzero().squeeze(1)
                if rows.numel():
                    self.ref.admit(rows, obs["input_ids"][rows], obs["attention_mask"][rows])
            self._ended = self._ended_after_reset(options, obs["input_ids"].shape[0], obs["input_ids"].device)
        return obs, info

    def _ended_after_reset(self, options: dict | None, rows: int, device: torch.device) -> torch.Tensor:
        """The rows whose episode ended and was not reset since (the reference stops computing them)."""
        reset = options.get("reset_mask") if options else None
        if reset is None or self._ended is None:
            return torch.zeros(rows, dtype=torch.bool, device=device)
        return self._ended & ~torch.as_tensor(reset, device=self._ended.device)

    def step(self, actions: Any):
        if not isinstance(actions, dict) or "logprob" not in actions:
            raise TypeError(
                "KLPenalty needs the policy's log-prob of each chosen token with the action: "
                "step({'token': LongTensor[B], 'logprob': FloatTensor[B]}) (log-prob at the sampling temperature)"
            )
        if self.reference_pass == "sequence":  # the KL comes later, from on_episode_end: the task reward only
            return self.env.step(actions)
        tokens = torch.as_tensor(actions["token"]).long()
        logprob = torch.as_tensor(actions["logprob"], dtype=torch.float32)
        ref_logprob = self.ref.logprobs_of(tokens.to(self.ref.next_logits.device), self.temperature)  # (B,)
        obs, reward, terminated, truncated, info = self.env.step(actions)
        valid = info["valid"]
        kl = kl_estimate(logprob.to(ref_logprob.device), ref_logprob, self.estimator)
        kl = torch.where(valid, kl, torch.zeros_like(kl))
        beta = self.controller.value
        reward = reward - beta * kl.to(reward.device)
        new, mask = context_column(tokens.to(valid.device), info)  # ended rows: a masked slot; env tokens read
        self._ended |= (terminated | truncated).to(self._ended.device)
        if (mask.squeeze(1) & ~self._ended).any():  # the last step needs no next-token distribution
            self.ref.retire(self._ended)  # rows that ended leave the reference's cache
            self.ref.extend(new.to(self.ref.next_logits.device), mask)
        every = torch.ones_like(valid)
        info = {**info, "kl": kl, "_kl": every, "kl_penalty": beta * kl, "_kl_penalty": every,
                "ref_logprob": torch.where(valid, ref_logprob, 0.0), "_ref_logprob": every,
                "kl_coef": torch.full_like(kl, beta), "_kl_coef": every}
        return obs, reward, terminated, truncated, info

    @torch.no_grad()
    def on_episode_end(self, rollout: TokenRollout) -> TokenRollout:
        """The collection hook (see :mod:`textrl.lm.collect`). reference_pass "sequence": log π_ref of every
        agent token from one parallel forward, the per-token KL and the penalised rewards (0 off the action
        mask). "per_token": nothing to add (every step already carried its term)."""
        if self.reference_pass == "per_token":
            return rollout
        mask = rollout.action_mask
        ref = sequence_logprobs(self.ref_model, rollout.input_ids, rollout.attention_mask, rollout.response_start,
                                self.temperature)
        ref = torch.where(mask, ref, 0.0)
        kl = torch.where(mask, kl_estimate(rollout.logprobs.to(ref.device), ref, self.estimator), 0.0)
        return dataclasses.replace(rollout, ref_logprobs=ref, kl=kl, rewards=rollout.rewards - self.controller.value * kl)
