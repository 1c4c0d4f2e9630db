"""KL-to-reference reward wrapper: reward_t = score_t − β·KL_t with KL_t an estimate of
KL(π ‖ π_ref) at the sampled token (k1 = log π(a_t|s_t) − log π_ref(a_t|s_t) by default; see
:func:`textrl.losses.kl_estimate`).

Contract: the policy's log-prob of each chosen token travels **with the action** —
``env.step({"token": LongTensor[B], "logprob": FloatTensor[B]})`` — so no second policy forward is needed.
That log-prob must be of the temperature-scaled distribution that was sampled, with the same
``temperature`` given here. The reference runs incrementally with its own KV cache: a prefill at reset,
then one batched forward of one token per step.

``info`` after each step carries the reward terms: ``score`` (task score, at a row's last token), ``kl``
(the per-token estimate, 0 on invalid rows), ``kl_penalty`` (β·kl), ``ref_logprob`` and ``kl_coef`` (β),
so that an agent that wants KL in its loss (GRPO) can add ``kl_penalty`` back and use ``ref_logprob``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch

from textrl.decoding import CachedDecoder, sequence_logprobs
from textrl.kl_control import AdaptiveKLController, FixedKLController
from textrl.losses import KLEstimator, kl_estimate

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
        reference_pass: "per_token" — the reference steps with the env in its own KV cache, and every
            ``step`` reward already carries −β·KL_t (what a user stepping the env by hand sees); "sequence"
            — ``step`` returns the task reward only and :meth:`penalise` applies the KL after the episode
            from one parallel reference forward over the finished sequences (what TRL does after
            ``generate``; cheaper than a decode step per token). :func:`~textrl.text_rollout.text_rollout`
            handles both; the batches they return are equal (tested to 1e-5).
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
        self.deferred = reference_pass == "sequence"
        self.ref_model, self.temperature = ref_model, temperature
        if estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")
        self.controller = kl_coef if hasattr(kl_coef, "value") else FixedKLController(float(kl_coef))
        self.estimator = estimator
        if isinstance(ref_model, torch.nn.Module):  # a separate frozen copy; a view of the policy
            ref_model.eval()                          # (LoRA adapters off) must not freeze its weights
            for p in ref_model.parameters():
                p.requires_grad_(False)
        self.ref = CachedDecoder(ref_model, temperature)

    @property
    def kl_coef(self) -> float:
        return self.controller.value

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        # Any reset (full or by mask) re-encodes the current buffers: rows still generating keep their prefix.
        if not self.deferred:
            self.ref.prefill(obs["input_ids"], obs["attention_mask"])
        return obs, info

    @torch.no_grad()
    def penalise(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                 logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference pass "sequence": log π_ref of every response token from one parallel forward, and
        the per-token KL and penalty β·KL_t (0 where ``mask`` is False). Shapes ``[B, T]``."""
        ref_logprob = sequence_logprobs(self.ref_model, input_ids, attention_mask, response_start, self.temperature)
        ref_logprob = torch.where(mask, ref_logprob, 0.0)
        kl = torch.where(mask, kl_estimate(logprobs.to(ref_logprob.device), ref_logprob, self.estimator), 0.0)
        return {"ref_logprob": ref_logprob, "kl": kl, "kl_penalty": self.controller.value * kl}

    def step(self, actions: Any):
        if not isinstance(actions, dict) or "logprob" not in actions:
            raise TypeError(
                "KLPenalty needs the policy's log-prob of each chosen token with the action: "
                "step({'token': LongTensor[B], 'logprob': FloatTensor[B]}) (log-prob at the sampling temperature)"
            )
        if self.deferred:  # the KL comes later, from penalise(): the task reward only
            return self.env.step(actions)
        tokens = torch.as_tensor(actions["token"]).long()
        logprob = torch.as_tensor(actions["logprob"], dtype=torch.float32)
        ref_logprob = self.ref.logprobs_of(tokens.to(self.ref.next_logits.device))  # (B,) before the env moves on
        obs, reward, terminated, truncated, info = self.env.step(actions)
        valid = info["valid"]
        kl = kl_estimate(logprob.to(ref_logprob.device), ref_logprob, self.estimator)
        kl = torch.where(valid, kl, torch.zeros_like(kl))
        beta = self.controller.value
        reward = reward - beta * kl.to(reward.device)
        still_running = valid & ~(terminated | truncated)
        if still_running.any():  # the last step needs no next-token distribution
            pad = torch.full_like(tokens, self.env.unwrapped.pad_token_id)
            self.ref.step(torch.where(valid.to(tokens.device), tokens, pad), valid)
        info = {**info, "kl": kl, "kl_penalty": beta * kl, "ref_logprob": torch.where(valid, ref_logprob, 0.0),
                "kl_coef": beta}
        return obs, reward, terminated, truncated, info
