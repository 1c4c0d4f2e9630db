"""Verifiable rewards: answer extraction, exact match and pass@k, reusable as reward functions.

The reward functions take TRL's signature — ``(completions, answer, **kwargs) -> list[float]`` — so they work
as ``reward_funcs`` of :class:`textrl.Trainer` (the dataset's ``answer`` column arrives by keyword) and as
scorers of a text env::

    from textrl.envs.verifiable import lenient_match, strict_match
    trainer = Trainer("smollm2-135m-instruct", [lenient_match, strict_match], data, reward_weights=[1, 0])

Two extractors, reported separately because they answer different questions (can the model do the sum? does
it follow the answer format?):

- **strict**: the number after a final-answer marker — ``Answer: 42``, ``answer is 42``, ``#### 42`` or
  ``\\boxed{42}`` (the last such marker counts); None without one.
- **lenient**: the last number anywhere in the text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["extract_answer", "normalise_number", "exact_match", "strict_match", "lenient_match", "pass_at_k"]

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_MARKED = re.compile(rf"(?:answer\s*(?:is)?\s*[:=]?\s*\$?|####\s*|\\boxed\{{\s*)({_NUMBER})", re.IGNORECASE)
_ANY = re.compile(_NUMBER)


def normalise_number(text: str) -> str | None:
    """``"1,234.0"`` → ``"1234"``: thousands separators and a zero fraction dropped; None if not a number."""
    text = text.strip().replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """The final answer of ``text`` as a normalised number string (see the module docstring), or None."""
    if mode not in ("strict", "lenient"):
        raise ValueError(f"mode must be 'strict' or 'lenient', got {mode!r}")
    found = _MARKED.findall(text) if mode == "strict" else _ANY.findall(text)
    return normalise_number(found[-1]) if found else None


def exact_match(completions: Sequence[str], answer: Sequence[Any], mode: str = "strict") -> list[float]:
    """1.0 where the extracted answer equals ``answer`` (numbers compared normalised), else 0.0."""
    if len(completions) != len(answer):
        raise ValueError(f"exact_match: {len(completions)} completions but {len(answer)} answers; give one answer "
                         "per completion")
    out = []
    for text, truth in zip(completions, answer, strict=True):
        got, want = extract_answer(str(text), mode), normalise_number(str(truth))
        out.append(float(got is not None and got == want))
    return out


def strict_match(completions: Sequence[str], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """Reward 1 when the answer after a final-answer marker is right (a TRL-style reward function)."""
    return exact_match(completions, answer, "strict")


def lenient_match(completions: Sequence[str], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """Reward 1 when the last number of the completion is the answer (a TRL-style reward function)."""
    return exact_match(completions, answer, "lenient")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021, arXiv:2107.03374): the chance that at least one of
    ``k`` answers drawn without replacement from ``n`` answers, ``c`` of them correct, is correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)) or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs integers 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))
