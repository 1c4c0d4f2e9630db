"""Shared validators for config fields: each names the field, the expected and the given value.

Configs call them from ``__post_init__`` so that a bad value fails at construction — from the CLI, a YAML
file or Python alike — before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["positive_int", "non_negative_int", "finite_number", "in_range", "one_of", "optional_positive", "device_name"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def non_negative_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def finite_number(name: str, value: Any, minimum: float | None = None, strict: bool = True) -> None:
    """A finite int/float, above ``minimum`` (``strict``: > minimum; else >= minimum) when one is given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def in_range(name: str, value: Any, low: float, high: float) -> None:
    """``low <= value <= high`` (a finite number)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high):
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], got {value!r}")


def one_of(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def optional_positive(name: str, value: Any) -> None:
    """None (off) or a finite number > 0."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 or null (off), got {value!r}")


def device_name(name: str, value: Any) -> None:
    """"auto", "cpu", "cuda" or "cuda:N" (and "mps"), and a CUDA device only where torch sees one."""
    import torch

    fix = "use --device auto (a GPU when there is one, else the CPU) or --device cpu"
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}; {fix}")
    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}; {fix}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={value!r}, but this torch ({torch.__version__}) sees no CUDA GPU "
                             f"(torch.cuda.is_available() is False: a CPU-only build, or no driver); {fix}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={value!r}, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); {fix}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{name}={value!r}, but torch.backends.mps.is_available() is False; {fix}")
    elif device.type != "cpu":
        raise ValueError(f"{name} must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}; {fix}")
