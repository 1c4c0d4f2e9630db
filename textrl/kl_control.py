"""KL coefficient controllers (β in reward_t = score − β·KL_t).

Both expose ``value`` (the current β), ``update(current_kl, n_steps)`` and ``state_dict`` /
``load_state_dict`` so a resumed run continues with the same β.
"""

from __future__ import annotations

import math

__all__ = ["FixedKLController", "AdaptiveKLController", "make_kl_controller"]


class FixedKLController:
    """A constant β."""

    def __init__(self, kl_coef: float):
        if not (kl_coef >= 0 and math.isfinite(kl_coef)):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", §2.2): it steers the observed KL towards ``target``.

    e_t = clip(KL_t / target − 1, −0.2, 0.2)
    β_{t+1} = β_t · (1 + e_t · n_steps / horizon)

    ``n_steps`` is the number of samples (episodes) the KL was measured on; ``horizon`` sets how many
    samples it takes to close the error (the paper uses 10 000).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not (init_kl_coef > 0 and math.isfinite(init_kl_coef)):
            raise ValueError(f"init_kl_coef must be > 0 for an adaptive controller, got {init_kl_coef!r}")
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target!r}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):  # a NaN KL must not poison β for the rest of the run
            return self.value
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


def make_kl_controller(
    kl_coef: float, target_kl: float | None = None, horizon: int = 10_000
) -> FixedKLController | AdaptiveKLController:
    """A fixed controller, or an adaptive one when ``target_kl`` is given."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
