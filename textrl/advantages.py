"""Advantage estimators as pure tensor functions.

Shapes: ``B`` rows (parallel environments or sequences) × ``T`` steps. Every function takes a boolean
``mask`` ``[B, T]`` (True = a real transition) and keeps ``terminated`` (the episode reached a terminal
state: nothing follows, V = 0) apart from ``truncated`` (the episode was cut by a time/length limit: the
state after it still has value, so we bootstrap from it). Bootstrapping is decided here and nowhere else.
"""

from __future__ import annotations

import torch

__all__ = ["gae", "next_values_from"]


def next_values_from(values: torch.Tensor, last_values: torch.Tensor) -> torch.Tensor:
    """V(s_{t+1}) for every step of a rollout whose rows run on without gaps.

    ``values`` ``[B, T]`` holds V(s_t); ``last_values`` ``[B]`` holds V(s_T), the state after the last step.
    Returns ``[B, T]`` = ``values`` shifted left by one with ``last_values`` appended. Steps whose next
    state is not ``values[:, t+1]`` (a truncated episode under same-step autoreset) must be patched by
    the caller with the value of their true final observation.
    """
    return torch.cat([values[:, 1:], last_values.unsqueeze(1)], dim=1)  # (B, T)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

    δ_t = r_t + γ·(1 − terminated_t)·V(s_{t+1}) − V(s_t)
    Â_t = δ_t + γλ·(1 − end_t)·Â_{t+1},   end_t = terminated_t ∨ truncated_t

    So a terminated step never bootstraps; a truncated step bootstraps from ``next_values`` (the value of
    the state the limit cut off) but does not chain into the next episode. Masked-out steps (padding, or
    the dead step of a next-step autoreset) get Â = 0 and pass the running Â through unchanged, so they
    neither add to nor break the chain; their inputs are never read (they may hold NaN).

    Args:
        rewards, values, next_values: float ``[B, T]``; ``next_values[:, t]`` = V(s_{t+1}) as step t saw it.
        terminated, truncated, mask: bool ``[B, T]``.
        gamma: discount γ in [0, 1]. lam: GAE λ in [0, 1] (0 → one-step TD, 1 → Monte-Carlo).

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, with returns = advantages + values, 0 where masked.
    """
    for name, t in (("values", values), ("next_values", next_values)):
        if t.shape != rewards.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal rewards shape {tuple(rewards.shape)}")
    for name, t in (("terminated", terminated), ("truncated", truncated), ("mask", mask)):
        if t.dtype != torch.bool or t.shape != rewards.shape:
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(rewards.shape)}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")

    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    # Read nothing from masked positions: replace them before any arithmetic.
    r = torch.where(mask, rewards, zero)
    v = torch.where(mask, values, zero)
    nv = torch.where(mask & ~terminated, next_values, zero)  # terminal states are worth 0
    delta = r + gamma * nv - v  # (B, T)
    carry = (~(terminated | truncated)).to(rewards.dtype) * (gamma * lam)  # (B, T) chain weight

    advantages = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # (B,) Â_{t+1}
    for t in reversed(range(r.shape[1])):
        step_adv = delta[:, t] + carry[:, t] * running
        running = torch.where(mask[:, t], step_adv, running)  # padding passes the chain through
        advantages[:, t] = torch.where(mask[:, t], step_adv, zero)
    returns = torch.where(mask, advantages + v, zero)
    return advantages, returns
