"""The agent contract: an agent turns a rollout into a batch and a minibatch into a loss. Nothing else.

Agents are plain torch. Collection (:mod:`textrl.collector`, :mod:`textrl.lm.collect`), the optimisation
loop, data-parallel synchronisation and checkpoints are the :class:`~textrl.parallel.learner.Learner`'s and
the run's; an agent sees the global batch only through the ``reduce`` object the learner hands to
:meth:`Agent.prepare`. Each agent declares what the run must build for it:

- ``kl_in``: where the KL to the reference goes — ``"reward"`` (the env's per-token penalty −β·KL_t, the
  :class:`~textrl.envs.kl_penalty.KLPenalty` wrapper) or ``"loss"`` (the agent adds β·KL to its loss; the
  wrapper then only reports the reference log-probs). β is the run's ``kl.coef`` either way.
- ``has_critic``: whether a value head is built on the policy's trunk (critic-free agents get none).
- ``num_generations``: completions per prompt in a batch (the env serves each prompt that many times).

Agents are built by name (``agent_class("ppo")``), so ``--agent`` is the only change needed to swap one for
another; ``register_agent`` adds yours.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import gymnasium as gym
import torch

from textrl.imports import load_attr
from textrl.masking import masked_mean
from textrl.validate import finite_number, optional_positive, positive_int

__all__ = ["Agent", "UpdateConfig", "OnPolicyConfig", "Reduce", "AGENTS", "ALIASES", "agent_class", "canonical_agent", "register_agent", "lm_batch",
           "lm_forward", "on_policy_logprobs", "entropy_terms", "is_token_env", "check_text_env"]


class Reduce(Protocol):
    """Global-batch statistics (given by the learner; the identity on one process)."""

    def gather(self, t: torch.Tensor) -> torch.Tensor: ...  # every process's rows, in one-process order

    def max(self, t: torch.Tensor) -> torch.Tensor: ...  # the max over processes

    def local(self, t: torch.Tensor, rows: int) -> torch.Tensor: ...  # this process's rows of a global tensor

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor: ...


@dataclass
class UpdateConfig:
    """What every agent's update needs (read by the learner). Defaults are PPO's (the RLHF seed's)."""

    num_epochs: int = 4
    """Passes over each rollout (PPO epochs; TRL's num_iterations)."""
    num_minibatches: int = 4
    """Minibatches per epoch; must divide the batch (classic envs: num_envs × num_steps; text envs: num_envs)."""
    learning_rate: float = 3e-4
    """Adam learning rate at the start of training."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over training."""
    adam_eps: float = 1e-5
    """Adam epsilon (1e-5, not PyTorch's 1e-8, as in the PPO reference implementations)."""
    clip_range: float = 0.2
    """Policy ratio clip ε."""
    anneal_clip_range: bool = False
    """Decay the clip range linearly to 0 over training (rl-zoo's lin_ schedules)."""
    max_grad_norm: float = 0.5
    """Clip the global gradient norm to this value."""
    target_kl: float | None = None
    """Stop the epochs early once a minibatch's approx_kl exceeds 1.5 × target_kl; null never stops."""
    gradient_accumulation_steps: int = 1
    """Split each minibatch into this many micro-batches (same gradient, less memory)."""

    def __post_init__(self) -> None:
        for name in ("num_epochs", "num_minibatches", "gradient_accumulation_steps"):
            positive_int(name, getattr(self, name))
        for name in ("learning_rate", "clip_range", "max_grad_norm", "adam_eps"):
            finite_number(name, getattr(self, name), minimum=0)
        optional_positive("target_kl", self.target_kl)

    def check_batch(self, batch: int, what: str | None = None) -> None:
        """Fail before training unless the rollout batch (``what`` says what it is made of) splits into
        minibatches and micro-batches."""
        what = what or f"num_envs = {batch}"
        if batch % self.num_minibatches:
            divisors = [d for d in range(1, min(batch, 64) + 1) if batch % d == 0]
            raise ValueError(f"num_minibatches={self.num_minibatches} does not divide the batch size {what}; "
                             f"choose num_minibatches from {divisors} or change num_steps/num_envs")
        per_mb = batch // self.num_minibatches
        if per_mb % self.gradient_accumulation_steps:
            raise ValueError(f"gradient_accumulation_steps={self.gradient_accumulation_steps} does not divide the "
                             f"minibatch size {per_mb} ({what} / num_minibatches={self.num_minibatches})")


@dataclass
class OnPolicyConfig(UpdateConfig):
    """The critic-free agents' defaults (the papers', TRL's and OpenRLHF's): one optimisation pass per batch, so
    the update is on-policy; Adam eps 1e-8; gradient norm clipped at 1."""

    num_epochs: int = 1
    """Passes over each batch (TRL's num_iterations μ); > 1 makes later passes off-policy (the clip matters)."""
    num_minibatches: int = 1
    """Minibatches per epoch (by completion); must divide num_envs."""
    learning_rate: float = 1e-6
    """Adam learning rate at the start (the papers' 1e-6 is for full fine-tuning; LoRA wants ~1e-4–1e-3)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (TRL's default 1.0)."""


class Agent(ABC):
    """Base class of every textrl agent: a config, a policy, and the maths of one update."""

    #: the dataclass that configures this agent (an :class:`UpdateConfig`); one docstring per field
    config_class: ClassVar[type]
    #: where the KL to the reference goes: "reward" (the env's penalty) or "loss" (a term of this agent's loss)
    kl_in: ClassVar[str] = "reward"
    #: whether the policy needs a value head (critic-free agents get none built)
    has_critic: ClassVar[bool] = False
    #: what a minibatch loss averages over: "token" (every real token weighs the same) or "row" (completions)
    loss_unit: str = "token"
    #: logged terms that are means over tokens whatever ``loss_unit`` is (averaged over micro-batches and
    #: processes by token count, so they equal the value over the whole minibatch)
    token_mean_stats: frozenset[str] = frozenset({"policy/entropy", "losses/entropy"})

    def __init__(self, config: Any = None, policy: torch.nn.Module | None = None, kl_coef: float = 0.0):
        if self.kl_in not in ("reward", "loss"):
            raise TypeError(f"{type(self).__name__}.kl_in must be 'reward' or 'loss', got {self.kl_in!r}")
        self.config = config if config is not None else self.config_class()
        self.policy = policy
        self.kl_coef = float(kl_coef)  # β of the KL loss term (agents with kl_in = "loss")
        if not self.has_critic and policy is not None:  # a policy built with a value head or critic: frozen, so
            for name in ("value_head", "critic"):      # neither the optimiser nor DDP sees parameters with no loss
                module = getattr(policy, name, None)
                for p in module.parameters() if isinstance(module, torch.nn.Module) else ():
                    p.requires_grad_(False)

    @classmethod
    def completions_per_prompt(cls, config: Any) -> int | None:
        """How many completions of each prompt a batch must hold for this agent with ``config`` (the env serves
        each prompt that many times in contiguous rows); None: the agent does not care."""
        k = getattr(config, "num_generations", None)
        return None if k is None else int(k)

    @property
    def num_generations(self) -> int:
        """Completions per prompt in each batch (1 unless the agent asks for more)."""
        return self.completions_per_prompt(self.config) or 1

    @classmethod
    def check_env(cls, envs: gym.vector.VectorEnv, config: Any = None) -> None:
        """Raise a clear error if this agent (with ``config``) cannot learn from ``envs``; runs call it before
        training starts. The default accepts any env."""
        return None

    @abstractmethod
    def prepare(self, rollout: Any, reduce: Reduce) -> tuple[dict[str, Any], dict[str, float]]:
        """A rollout → (the batch to optimise on, statistics of the rollout). Batch tensors share dim 0 (the
        rows the learner minibatches) and hold ``action_mask``; other entries pass to every minibatch."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, minibatch: dict[str, Any], clip_range: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(loss, terms to log, ratio statistics)``; the ratio statistics are ``approx_kl``, ``clipfrac``
        and ``ratio_max_dev``. ``model`` is the policy or its data-parallel wrapper: call it, not the policy."""

    def loss_units(self, mask: torch.Tensor) -> int:
        """How many loss units (real tokens, or rows with a real token) a micro-batch's ``mask`` holds."""
        return int(mask.sum()) if self.loss_unit == "token" else int(mask.reshape(mask.shape[0], -1).any(1).sum())


# --- pieces the LM agents share --------------------------------------------------------------------------
def is_token_env(envs: gym.vector.VectorEnv) -> bool:
    """A textrl text env: token-buffer observations (``input_ids``/``attention_mask``)."""
    space = envs.single_observation_space
    return isinstance(space, gym.spaces.Dict) and "input_ids" in space.spaces


def check_text_env(envs: gym.vector.VectorEnv, name: str, k: int) -> None:
    """An LM-only agent needs a text env that serves each prompt ``k`` times per batch."""
    if not is_token_env(envs):
        raise TypeError(f"env: {name} needs a text env and an LM policy (it learns from completions); got "
                        f"{type(envs.unwrapped).__name__}. Use PPO for classic Gymnasium envs.")
    served = envs.unwrapped.num_generations
    if served != k:
        raise ValueError(f"num_generations: the env serves each prompt {served} time(s) per batch but {name} "
                         f"expects {k}; build the env with num_generations={k} (textrl train does this for you)")


def lm_batch(rollout: Any, **tensors: torch.Tensor) -> dict[str, Any]:
    """The token batch of a :class:`~textrl.rollout.TokenRollout` plus the agent's own per-row ``tensors``."""
    return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "action_mask": rollout.action_mask, "response_start": rollout.response_start, **tensors}


def lm_forward(model: torch.nn.Module, mb: dict[str, Any], with_entropy: bool = True, entropy_grad: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """New log-probs ``[b, T]`` (with gradient), the entropy ``[b, T]`` (None without ``with_entropy``; a
    gradient only with ``entropy_grad``) and the values ``[b, T]`` (None without a value head) of a
    minibatch, from one forward of ``model`` (the :class:`~textrl.lm.policy.LMActorCritic` or its wrapper)."""
    logprobs, entropy, values, _ = model(mb["input_ids"], mb["attention_mask"], response_start=mb["response_start"],
                                         entropy_grad=entropy_grad, with_entropy=with_entropy)
    return logprobs, entropy, values


def on_policy_logprobs(policy: torch.nn.Module, rollout: Any) -> torch.Tensor:
    """The old log-probs of a one-update-per-rollout agent: the sampled ones (the weights have not moved since),
    recomputed only when the update runs another numeric path (bf16 autocast)."""
    if torch.is_autocast_enabled(rollout.input_ids.device.type):
        return policy.evaluate_batch(rollout.input_ids, rollout.attention_mask, rollout.response_start,
                                     with_entropy=False)[0]
    return rollout.logprobs


def entropy_terms(entropy: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    ent = masked_mean(entropy, mask)
    return {"policy/entropy": ent, "losses/entropy": -ent}


# name -> "module:Class"; imported lazily so that `textrl --help` stays fast.
AGENTS: dict[str, str] = {
    "ppo": "textrl.agents.ppo:PPO",
    "rloo": "textrl.agents.rloo:RLOO",
    "grpo": "textrl.agents.grpo:GRPO",
    "reinforce++": "textrl.agents.reinforce_pp:ReinforcePP",
}
#: other names of registered agents -> their name in AGENTS
ALIASES: dict[str, str] = {"reinforce_pp": "reinforce++"}


def register_agent(name: str, target: str, aliases: tuple[str, ...] = ()) -> None:
    """Make an agent available by name, e.g. ``register_agent("my_ppo", "my_pkg.agents:MyPPO")`` (imported when
    first used; a malformed target or a module that cannot be found fails here, naming the agent)."""
    import importlib.util

    module, sep, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or not module or not attr:
        raise ValueError(f"register_agent({name!r}, {target!r}): expected 'module:Class', e.g. 'my_pkg.agents:MyPPO'")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    top = module.split(".")[0]
    in_cwd = (Path.cwd() / f"{top}.py").is_file() or (Path.cwd() / top).is_dir()  # (found when first used)
    if not found and top not in sys.modules and not in_cwd:
        raise ValueError(f"register_agent({name!r}, {target!r}): module {module!r} cannot be found; install it or add "
                         "its folder to sys.path (PYTHONPATH) first")
    AGENTS[name] = target
    ALIASES.update(dict.fromkeys(aliases, name))


def canonical_agent(name: str) -> str:
    """An agent's registered name (``reinforce_pp`` → ``reinforce++``); other names are returned as they are."""
    return ALIASES.get(name, name)


def agent_class(name: str) -> type[Agent]:
    name = canonical_agent(name)
    if name not in AGENTS:
        raise ValueError(
            f"agent: unknown agent {name!r}; expected one of {sorted([*AGENTS, *ALIASES])}. "
            "Register your own with textrl.agents.register_agent(name, 'module:Class')."
        )
    return load_attr(AGENTS[name], f"agent {name!r}")
