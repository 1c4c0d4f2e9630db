"""PPO losses, KL estimators and diagnostics as pure, masked tensor functions.

Every function takes a boolean ``mask`` of the data's shape; averages are over real positions only, and
padding is never read (see :mod:`textrl.masking`).
"""

from __future__ import annotations

from typing import Literal

import torch

from textrl.masking import masked_mean, masked_sum, masked_var

__all__ = [
    "policy_loss",
    "sequence_policy_loss",
    "aggregate",
    "value_loss",
    "explained_variance",
    "kl_estimate",
    "KLEstimator",
]

KLEstimator = Literal["k1", "k2", "k3"]


def _where_real(x: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return torch.where(mask, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    aggregation: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss of PPO (Schulman et al. 2017, eq. 7), negated for minimisation.

    r_t = exp(log π_θ(a_t|s_t) − log π_old(a_t|s_t))
    L = −E_m[min(r_t·Â_t, clip(r_t, 1−ε, 1+ε)·Â_t)] = E_m[max(−r_t·Â_t, −clip(r_t)·Â_t)]

    ``old_logprobs`` and ``advantages`` are treated as constants (detached here). ``aggregation`` says
    what E_m averages over: ``"token"`` — every real token of the batch weighs the same (PPO; DAPO's
    and TRL's ``loss_type="dapo"``); ``"sequence"`` — mean over each row's real tokens, then over rows
    (GRPO's 1/G Σ_i 1/|o_i| Σ_t; TRL's ``loss_type="grpo"``), so short completions weigh more per token.

    Returns:
        ``(loss, stats)`` with stats ``approx_kl`` (k3 form, E[(r − 1) − log r], Schulman's low-variance
        unbiased estimator of KL(π_old‖π_θ)), ``clipfrac`` (share of real tokens with |r − 1| > ε) and
        ``ratio_max_dev`` (max |r − 1|; 0 on the first minibatch of an update when log-probs are consistent).
    """
    logratio = _where_real(logprobs - old_logprobs.detach(), mask)  # padding → log r = 0
    ratio = torch.exp(logratio)
    adv = _where_real(advantages.detach(), mask)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean((ratio - 1.0) - logratio, mask),
            "clipfrac": masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask),
            "ratio_max_dev": _where_real((ratio - 1.0).abs(), mask).max(),
        }
    return loss, stats


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Average a ``[B, T]`` per-token loss over real tokens: ``"token"`` (all tokens equal) or
    ``"sequence"`` (per-row mean, then mean over the rows that have a real token)."""
    if aggregation == "token":
        return masked_mean(per_token, mask)
    if aggregation == "sequence":
        rows = mask.any(-1)
        return masked_mean(masked_mean(per_token, mask, dim=-1), rows)
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")


def sequence_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate with one ratio per completion, the completion being a single action (RLOO,
    Ahmadian et al. 2024; TRL's RLOOTrainer):

    ρ_i = exp(Σ_t m_t·(log π_θ − log π_old)),   L = −mean_i min(ρ_i·A_i, clip(ρ_i, 1−ε, 1+ε)·A_i)

    ``logprobs``/``old_logprobs``/``mask`` are ``[B, T]``; ``advantages`` ``[B]``. Stats as :func:`policy_loss`:
    ``approx_kl`` per token (the mean over real tokens of each token's k3, as PPO's, so the same warning
    thresholds and ``target_kl`` apply); ``clipfrac`` per completion (the share whose ratio ρ_i is clipped: the
    clip acts on sequences).
    """
    token_logratio = torch.where(mask, logprobs.detach() - old_logprobs.detach(), 0.0)
    logratio = masked_sum(logprobs - old_logprobs.detach(), mask, dim=-1)  # (B,)
    ratio = torch.exp(logratio)
    adv = advantages.detach()
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean(torch.expm1(token_logratio) - token_logratio, mask),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).to(ratio.dtype).mean(),
            "ratio_max_dev": (ratio - 1.0).abs().max(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_vf: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss as in the seed reference (``shared/reference/ppo-concepts.md``):

    L_V = E_m[max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²)],   R = Â + V_old

    With ``clip_range_vf=None`` it is the plain E_m[(V − R)²] (Stable-Baselines3's default).
    Note the scale: TRL and CleanRL put a factor 0.5 in front, so their ``vf_coef`` is 2 × ours.
    """
    returns = returns.detach()
    old_values = old_values.detach()
    sq = (values - returns) ** 2
    if clip_range_vf is None:
        loss_per = sq
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
        sq_clipped = (v_clipped - returns) ** 2
        loss_per = torch.maximum(sq, sq_clipped)
        clipfrac = masked_mean((sq_clipped > sq).to(values.dtype), mask).detach()
    return masked_mean(_where_real(loss_per, mask), mask), {"clipfrac": clipfrac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var_m[R − V] / Var_m[R]: 1 = perfect critic, 0 = no better than a constant, < 0 = worse.

    NaN when the returns have zero variance (nothing to explain), as in Stable-Baselines3.
    """
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r.item() == 0.0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_r


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimators of KL(π_θ ‖ π_ref) from samples a_t ~ π_θ (Schulman, "Approximating KL
    Divergence", 2020). With log r = log π_ref(a_t) − log π_θ(a_t):

    - k1 = −log r = log π_θ − log π_ref          (unbiased; can be negative per token)
    - k2 = ½ (log r)²                            (biased, low variance, ≥ 0)
    - k3 = (r − 1) − log r                       (unbiased, low variance, ≥ 0)

    The direction is policy-minus-reference, as the seed requires: it penalises the policy for moving
    away from the reference, not the other way round.
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"estimator must be one of 'k1', 'k2', 'k3', got {estimator!r}")
