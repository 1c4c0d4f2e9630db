"""Advantage estimators as pure tensor functions.

Shapes: ``B`` rows (parallel environments or sequences) × ``T`` steps. Every function takes a boolean
``mask`` ``[B, T]`` (True = a real transition) and keeps ``terminated`` (the episode reached a terminal
state: nothing follows, V = 0) apart from ``truncated`` (the episode was cut by a time/length limit: the
state after it may still have value). Whether a truncated step bootstraps is decided in :func:`gae` and
nowhere else, from what the rollout says of its env (``Rollout.bootstrap_truncated``: yes for classic envs;
no for text envs, whose score is paid at the last token however the episode ended).
"""

from __future__ import annotations

import torch

__all__ = ["gae", "next_values_from", "next_action_values", "leave_one_out", "group_normalise", "check_groups"]


def next_values_from(values: torch.Tensor, last_values: torch.Tensor) -> torch.Tensor:
    """V(s_{t+1}) for every step of a rollout whose rows run on without gaps.

    ``values`` ``[B, T]`` holds V(s_t); ``last_values`` ``[B]`` holds V(s_T), the state after the last step.
    Returns ``[B, T]`` = ``values`` shifted left by one with ``last_values`` appended. Steps whose next
    state is not ``values[:, t+1]`` (a truncated episode under same-step autoreset) must be patched by
    the caller with the value of their true final observation.
    """
    return torch.cat([values[:, 1:], last_values.unsqueeze(1)], dim=1)  # (B, T)


def next_action_values(values: torch.Tensor, last_values: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """V of the state in which each column's *next action* is chosen, ``[B, T]``: the value at the row's next
    action column after t (``last_values`` ``[B]`` when none follows). A multi-turn text episode's env tokens
    are context, not time steps: the step after a turn's last token is the first token of the agent's next
    turn, whose state includes the env's reply. Equals :func:`next_values_from` at every action column
    followed by another (single-turn rows, whose actions are contiguous)."""
    B, T = action_mask.shape
    cols = torch.arange(T, device=action_mask.device).expand(B, T)
    at = torch.where(action_mask, cols, T)  # (B, T) an action's own column, T elsewhere
    after = torch.cat([at[:, 1:], torch.full_like(at[:, :1], T)], 1)  # the column after t, if an action
    following = after.flip(1).cummin(1).values.flip(1)  # (B, T) the first action column > t, or T
    return torch.cat([values, last_values.unsqueeze(1)], 1).gather(1, following)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    bootstrap_truncated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

    δ_t = r_t + γ·(1 − terminal_t)·V(s_{t+1}) − V(s_t)
    Â_t = δ_t + γλ·(1 − end_t)·Â_{t+1},   end_t = terminated_t ∨ truncated_t

    terminal_t = terminated_t, or end_t when ``bootstrap_truncated`` is False. So a terminated step never
    bootstraps; a truncated step bootstraps from ``next_values`` (the value of the state the limit cut off)
    unless the env already paid everything at that step (text envs), and never chains into the next episode. Masked-out steps (padding, or
    the dead step of a next-step autoreset) get Â = 0 and pass the running Â through unchanged, so they
    neither add to nor break the chain; their inputs are never read (they may hold NaN).

    Args:
        rewards, values, next_values: float ``[B, T]``; ``next_values[:, t]`` = V(s_{t+1}) as step t saw it.
        terminated, truncated, mask: bool ``[B, T]``.
        gamma: discount γ in [0, 1]. lam: GAE λ in [0, 1] (0 → one-step TD, 1 → Monte-Carlo).
        bootstrap_truncated: whether a truncated step's next state still has value (see above).

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
    terminal = terminated if bootstrap_truncated else terminated | truncated
    nv = torch.where(mask & ~terminal, next_values, zero)  # terminal states are worth 0
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


def check_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` → ``[B / k, k]``: rows ``i·k … i·k + k − 1`` are the k completions of one prompt."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B] (one per completion), got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (a group baseline needs siblings), got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"batch of {rewards.shape[0]} completions does not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def leave_one_out(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740, eq. 6).

    A_i = R_i − 1/(k−1) · Σ_{j≠i} R_j  over the k completions of the same prompt,
    equivalently k/(k−1) · (R_i − mean_j R_j). The baseline excludes the sample itself, so the estimator
    stays unbiased. ``rewards`` ``[B]``, grouped contiguously (see :func:`check_groups`); returns ``[B]``.
    """
    g = check_groups(rewards, group_size)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def group_normalise(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, arXiv:2402.03300, §4.1.2 outcome supervision).

    A_i = (R_i − mean(group)) / (std(group) + eps) with ``scale="group"`` (the paper; std is Bessel-
    corrected, as TRL's); ``"batch"`` divides by the std of the whole batch instead, ``"none"`` only
    centres (Dr. GRPO). A group whose rewards are all equal gets advantages exactly 0 (no signal), not
    0/0. Returns ``[B]``.
    """
    g = check_groups(rewards, group_size)
    centred = g - g.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (g.std(1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centred.reshape(-1)
