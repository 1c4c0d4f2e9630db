"""The rollout data types: what collection returns and agents learn from. Data only, no behaviour.

- :class:`Rollout`: a classic env's transitions, ``[B, T]`` = sub-envs × steps (:mod:`textrl.collector`).
- :class:`TokenRollout`: a text env's episodes, one row per episode (:mod:`textrl.lm.collect`).

One mask convention: boolean, True where a position is real; padding is never read (see :mod:`textrl.masking`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

__all__ = ["ActOutput", "Rollout", "TokenRollout"]


@dataclass
class ActOutput:
    """What a classic policy returns for one batched step."""

    actions: torch.Tensor  # (B,) sampled actions
    logprobs: torch.Tensor  # (B,) log π(a|s) of the sampled actions
    values: torch.Tensor  # (B,) V(s)


@dataclass
class Rollout:
    """A batch of transitions, rows × steps. All tensors are ``[B, T]`` unless noted.

    ``mask[b, t]`` is True for a real transition. It is False for the dead step a next-step autoreset
    spends resetting a finished sub-env (its action is ignored by the env).
    ``next_values[b, t]`` is V(s_{t+1}) as step t saw it: the value of the true final observation where a
    same-step autoreset replaced it.
    """

    obs: torch.Tensor  # (B, T, *obs_shape)
    actions: torch.Tensor  # (B, T)
    logprobs: torch.Tensor  # (B, T) log π_old(a_t|s_t)
    values: torch.Tensor  # (B, T) V_old(s_t)
    next_values: torch.Tensor  # (B, T) V_old(s_{t+1})
    rewards: torch.Tensor  # (B, T)
    terminated: torch.Tensor  # (B, T) bool
    truncated: torch.Tensor  # (B, T) bool
    mask: torch.Tensor  # (B, T) bool
    episode_returns: list[float] = field(default_factory=list)  # episodes that finished in this rollout
    episode_lengths: list[int] = field(default_factory=list)

    #: a truncated step's next state still has value: GAE bootstraps from ``next_values`` there
    bootstrap_truncated: ClassVar[bool] = True


@dataclass
class TokenRollout:
    """A batch of text episodes, one per row.

    The model's view is ``input_ids``/``attention_mask`` ``[B, L]``: left-padded prompts in the columns before
    ``response_start`` = P, then the response. Per-token tensors are ``[B, T]``, T = L − P, column t of them
    being sequence column P + t. ``action_mask`` marks the agent's tokens (the actions: losses, advantages,
    the KL and every logged token average count them only); ``attention_mask`` marks every real token the
    model reads, so a response column may hold context that is not an action: the tokens a multi-turn env
    (:mod:`textrl.envs.turns`) appends between the agent's turns. Rewards sit at action columns (a turn's
    reward at its last token); ``terminated``/``truncated`` at the episode's last agent token.
    """

    input_ids: torch.Tensor  # (B, L) token ids, PAD where attention_mask is 0
    attention_mask: torch.Tensor  # (B, L) long: 1 where the model reads the column
    response_start: int  # P: the first response column
    action_mask: torch.Tensor  # (B, T) bool: the agent's tokens
    logprobs: torch.Tensor  # (B, T) log π(a_t|s_t) at sampling (at the sampling temperature); 0 off actions
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(a_t|s_t) (0 without a KL wrapper)
    rewards: torch.Tensor  # (B, T) env reward: score at the last token − β·KL per token
    scores: torch.Tensor  # (B,) task score of each episode
    kl: torch.Tensor  # (B, T) per-token KL estimate (0 off actions)
    terminated: torch.Tensor  # (B, T) bool, True at a stop token
    truncated: torch.Tensor  # (B, T) bool, True at the length limit without a stop token
    prompt_index: torch.Tensor  # (B,) which prompt each row answered
    #: per-episode counts an env reports at each row's end (a multi-turn env's ``turns``, ``tool_calls``), [B] each
    episode_stats: dict[str, torch.Tensor] = field(default_factory=dict)

    #: a text episode's score is paid at its last token whether a stop token or the length limit ended it, so
    #: a truncated episode has nothing left to bootstrap: V(s_T) would add a guess of a score already paid
    bootstrap_truncated: ClassVar[bool] = False

    @property
    def prompt_ids(self) -> torch.Tensor:
        """``[B, P]`` left-padded prompts."""
        return self.input_ids[:, :self.response_start]

    @property
    def prompt_mask(self) -> torch.Tensor:
        return self.attention_mask[:, :self.response_start]

    @property
    def tokens(self) -> torch.Tensor:
        """``[B, T]`` the response columns (agent and env tokens; PAD after a row's end)."""
        return self.input_ids[:, self.response_start:]
