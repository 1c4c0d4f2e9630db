"""The agent contract: ``act`` for collection, ``update`` to learn from a rollout.

Agents differ only in how they turn a :class:`~textrl.rollout.Rollout` into a loss; collection, envs and
tracking are shared. An agent is built by name (``make_agent("ppo", envs, config)``) so that the CLI's
``--agent`` flag is the only change needed to swap one for another.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import gymnasium as gym
import torch

from textrl.rollout import ActOutput, Rollout

__all__ = ["Agent", "AGENTS", "agent_class", "register_agent"]


class Agent(ABC):
    """Base class of every textrl agent."""

    #: the dataclass that configures this agent; one field per hyperparameter, each with a docstring
    config_class: ClassVar[type]
    #: this agent's config instance (``num_steps`` sets the rollout length) and torch device
    config: Any
    device: torch.device

    @abstractmethod
    def act(self, obs: torch.Tensor) -> ActOutput:
        """Sample one action per row of a batched observation (no gradient)."""

    @abstractmethod
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s) per row (no gradient); critic-free agents may return zeros."""

    @abstractmethod
    def update(self, rollout: Rollout, progress_remaining: float) -> dict[str, float]:
        """Learn from one rollout. ``progress_remaining`` goes from 1 (start) to 0 (end), for schedules.

        Returns the metrics of this update under their fixed names (``losses/policy`` …).
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: ``{"model": tensors, "optimizer": ..., ...}``."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @classmethod
    def check_env(cls, envs: gym.vector.VectorEnv) -> None:
        """Raise a clear error if this agent cannot act in ``envs`` (called before training starts).
        The default accepts any env."""
        return None


# name -> "module:Class"; imported lazily so that `textrl --help` stays fast.
AGENTS: dict[str, str] = {
    "ppo": "textrl.agents.ppo:PPO",
    "rloo": "textrl.agents.rloo:RLOO",
    "grpo": "textrl.agents.grpo:GRPO",
}


def register_agent(name: str, target: str) -> None:
    """Make an agent available by name, e.g. ``register_agent("my_ppo", "my_pkg.agents:MyPPO")``."""
    AGENTS[name] = target


def agent_class(name: str) -> type[Agent]:
    if name not in AGENTS:
        raise ValueError(
            f"agent: unknown agent {name!r}; expected one of {sorted(AGENTS)}. "
            "Register your own with textrl.agents.register_agent(name, 'module:Class')."
        )
    module, _, attr = AGENTS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
