"""Masked statistics over token/step tensors.

One mask convention runs through textrl: a boolean ``mask`` of the same shape as the data, ``True`` where a
position is real (a generated token, a real environment transition) and ``False`` where it is padding.
Values at masked-out positions are never read: they are replaced before any arithmetic, so padding that
holds garbage (even NaN or inf) cannot leak into a statistic.
"""

from __future__ import annotations

import torch

__all__ = ["masked_mean", "masked_sum", "masked_var", "masked_whiten", "check_mask"]


def check_mask(x: torch.Tensor, mask: torch.Tensor, name: str = "x") -> None:
    """Raise a clear error unless ``mask`` is a boolean tensor with the shape of ``x``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal {name} shape {tuple(x.shape)}")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x over the positions where ``mask`` is True (padding contributes exactly 0)."""
    check_mask(x, mask)
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over real positions: Σ_m x / Σ_m 1.

    An empty mask gives 0 rather than NaN (count clamped to 1), so a row with no real tokens adds nothing.
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all real positions; Bessel-corrected (n / (n - 1)) when ``unbiased``."""
    n = int(mask.sum())
    if n == 0:
        raise ValueError("masked_var needs at least one real position; the mask is all False")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        if n < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 real positions, got {n}")
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten over real positions: (x − μ) / sqrt(σ² + eps), with μ, σ² from :func:`masked_var`.

    With ``shift_mean=False`` the mean is added back, so only the scale changes (the usual choice for
    rewards, whose sign matters). Padding positions come out as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=int(mask.sum()) > 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))
