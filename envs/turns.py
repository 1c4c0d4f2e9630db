"""Multi-turn text envs written at the level of chat messages, run as a batched token-level ``VectorEnv``.

A user writes the episode's logic in text; :class:`MultiTurnEnv` does the tokens::

    class GuessNumber(MultiTurnEnv):
        def respond(self, state, reply):                 # the agent's reply to this turn, as text
            guess = last_int(reply)
            if guess == state["secret"]:
                return Reply(reward=1.0, done=True)
            return Reply("higher" if guess is None or guess < state["secret"] else "lower")

    env = GuessNumber(num_envs=8, tokenizer=tok, prompts=[{"prompt": "Guess my number (1-10).", "secret": 7}, ...])

**An episode** opens with its row's ``prompt`` (a string, sent as a user message, or a list of chat messages)
through the tokenizer's chat template; ``state`` is a fresh copy of the row (its other columns: the hidden
number, the correct answer), or whatever :meth:`MultiTurnEnv.start` makes of it. The agent then writes a turn,
token by token (each token is one ``step``). A turn ends at a stop token (any id of ``stop_token_ids``: by default
EOS, the chat template's end of turn and ``generation_eos_ids``) or after ``max_turn_tokens`` tokens. The env
calls :meth:`MultiTurnEnv.respond` with the turn's text; its :class:`Reply` says the reward of this turn, whether
the episode is over, and the message (role ``user`` or ``tool``) to append. The appended tokens are rendered with
the chat template — the end of the agent's turn (unless its stop token already wrote it), the message, the
assistant header — and written after the agent's tokens (see below); they are context, not actions.

**Limits.** ``max_turns`` agent turns and ``max_new_tokens`` response columns (agent and env tokens together) per
episode. A turn cut by a limit is still answered: :meth:`respond` sees its text and its reward counts. When a
limit leaves no room for another agent turn (the last turn, no budget left, or a reply too long for what is
left) the episode ends ``truncated`` with the rewards paid so far; a ``done`` reply ends it ``terminated``.

**The env's tokens are steps too.** After a reply, the row writes the reply's tokens one per step (the
env speaking: the row's action is ignored, ``info["valid"]`` is False, ``info["env_token"]`` is the token
written, marked by ``info["_env_token"]``; :attr:`MultiTurnEnv.replying` says which rows are at it), so a
generator and a per-token reference extend their KV caches by one column per row every step, whether the
row's model reads its own token or the env's: rows whose turns end at different steps never widen a
forward, and nothing is re-encoded. The observation holds everything written so far.

**What else the token-level env reports** (beyond :class:`~textrl.envs.text_gen.TextGenVectorEnv`'s keys): the
reward of each turn at its last token; ``info["column"]`` (the response column the agent's token went to); at
a row's last step ``info["score"]`` (the episode's summed reward), ``info["turns"]`` and every name in
:attr:`metrics` (summed over the episode's replies). The action mask of the rollout marks agent tokens only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from textrl.envs.text_gen import TextGenVectorEnv

__all__ = ["Reply", "MultiTurnEnv", "stop_ids_of", "reply_suffix"]

_MARK = "\u2063textrl-agent-turn\u2063"  # a string no chat template changes, to find where a turn ends


@dataclass
class Reply:
    """What the env answers to an agent's turn."""

    message: str | None = None
    """Text appended as the next message (None: nothing; the episode must then end or the agent goes on)."""
    reward: float = 0.0
    """Reward of this turn, paid at the turn's last token."""
    done: bool = False
    """The episode is over (terminated) after this turn."""
    role: str = "user"
    """Role of ``message``: "user" (a user's or opponent's reply) or "tool" (a tool's result)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Counts to add up over the episode and report, e.g. ``{"tool_calls": 1}`` (names listed in
    :attr:`MultiTurnEnv.metrics`)."""


def reply_suffix(tokenizer: Any, role: str, content: str) -> str:
    """The text a chat template writes after an assistant message's content when a ``role`` message with
    ``content`` follows it and the assistant answers again: the end of the assistant's turn, the message and
    the next assistant header."""
    convo = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARK}, {"role": role, "content": content}]
    full = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    at = full.find(_MARK)
    if at < 0:
        raise ValueError("the tokenizer's chat template does not write an assistant message's content verbatim; "
                         "a multi-turn env cannot place the env's replies after the agent's turns with it")
    return full[at + len(_MARK):]


def stop_ids_of(tokenizer: Any, extra: Any = ()) -> tuple[int, ...]:
    """The ids that end an agent's turn: EOS, the chat template's end-of-turn token (the first token after an
    assistant message, when it is a special token) and ``extra`` (e.g. ``generation_config.eos_token_id``)."""
    ids = [tokenizer.eos_token_id, *([extra] if isinstance(extra, int) else list(extra or ()))]
    if getattr(tokenizer, "chat_template", None):
        after = tokenizer(reply_suffix(tokenizer, "user", "u"), add_special_tokens=False)["input_ids"]
        if after and after[0] in set(getattr(tokenizer, "all_special_ids", ())):
            ids.append(after[0])
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


class MultiTurnEnv(TextGenVectorEnv):
    """Base class of multi-turn (and tool-use) text envs: override :meth:`respond` (and :meth:`start`).

    Args (beyond :class:`~textrl.envs.text_gen.TextGenVectorEnv`'s, whose ``scorer`` is not used: rewards
    come from :meth:`respond`):
        max_turns: agent turns per episode (default :attr:`default_max_turns`).
        max_turn_tokens: tokens per agent turn (default: no limit but ``max_new_tokens``).
        stop_token_ids: the ids that end a turn (default :func:`stop_ids_of` the tokenizer, plus
            ``generation_eos_ids``).
        generation_eos_ids: the policy's ``generation_config.eos_token_id`` (an id or a list), added to the
            default stop set.
    ``max_new_tokens`` is the episode's budget of response columns (agent and env tokens).
    """

    #: names of the per-episode counts (from :attr:`Reply.metrics`) reported at each episode's end
    metrics: ClassVar[tuple[str, ...]] = ()
    #: the default of ``max_turns``
    default_max_turns: ClassVar[int] = 4
    #: the name in :attr:`metrics` that is 1 for a solved episode and 0 otherwise (a verifiable task's; gives
    #: accuracy and pass@k in ``textrl eval``), or None
    success: ClassVar[str | None] = None

    #: the defaults of ``max_new_tokens`` and ``max_turn_tokens`` (None: the episode's budget)
    default_max_new_tokens: ClassVar[int] = 128
    default_max_turn_tokens: ClassVar[int | None] = None

    @classmethod
    def rows(cls, split: str) -> list[dict[str, Any]] | None:
        """A task's own data: its ``"train"`` and ``"eval"`` rows, used when ``prompts`` / ``eval_prompts``
        are not given. Default: none (``prompts`` is required)."""
        return None

    def __init__(self, num_envs: int, tokenizer: Any, prompts: Any = None, scorer: Any = None, *,
                 max_turns: int | None = None, max_turn_tokens: int | None = None,
                 stop_token_ids: Any = None, generation_eos_ids: Any = (), max_new_tokens: int | None = None,
                 chat_template: bool = True, eval_prompts: Any = None, **kwargs: Any):
        name = type(self).__name__
        prompts = prompts if prompts is not None else self.rows("train")
        if prompts is None:
            raise ValueError(f"env {name}: prompts is required (rows with a 'prompt' column and the episode's other "
                             "columns), or define the classmethod rows(split)")
        eval_prompts = eval_prompts if eval_prompts is not None else self.rows("eval")
        max_new_tokens = max_new_tokens if max_new_tokens is not None else self.default_max_new_tokens
        max_turn_tokens = max_turn_tokens if max_turn_tokens is not None else self.default_max_turn_tokens
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"env {name}: the tokenizer has no chat template, which a multi-turn env needs to write "
                             "the turns; use an instruct/chat model's tokenizer or set tokenizer.chat_template")
        max_turns = self.default_max_turns if max_turns is None else max_turns
        for arg, value in (("max_turns", max_turns), ("max_turn_tokens", max_turn_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"env {name}: {arg} must be a positive integer, got {value!r}")
        stops = stop_ids_of(tokenizer, generation_eos_ids) if stop_token_ids is None else \
            tuple(int(i) for i in ([stop_token_ids] if isinstance(stop_token_ids, int) else stop_token_ids))
        if not stops:
            raise ValueError(f"env {name}: stop_token_ids is empty; give at least one id that ends a turn (EOS, "
                             f"{tokenizer.eos_token_id}, or the chat template's end-of-turn token)")
        self.max_turns, self.max_turn_tokens = max_turns, max_turn_tokens or max_new_tokens
        super().__init__(num_envs, tokenizer, prompts, scorer if scorer is not None else _no_scorer,
                         max_new_tokens=max_new_tokens, chat_template=True, stop_token_ids=stops,
                         eval_prompts=eval_prompts, **kwargs)
        self._settings.update(max_turns=max_turns, max_turn_tokens=max_turn_tokens, stop_token_ids=stops)
        self._stop_text = {i: tokenizer.decode([i]) for i in stops}
        self._states = [self.start(self._row(i)) for i in range(len(self.prompts))]
        bad = next((i for i, st in enumerate(self._states) if not isinstance(st, dict)), None)
        if bad is not None:
            raise TypeError(f"env {name}: start() for prompt row {bad} returned {type(self._states[bad]).__name__}; "
                            "return a dict (the episode's state, e.g. dict(row, secret=7))")
        B = num_envs
        self.turns = torch.zeros(B, dtype=torch.long, device=self.device)
        self.turn_start = torch.zeros(B, dtype=torch.long, device=self.device)  # response column of the turn's 1st token
        self.returns = torch.zeros(B, dtype=torch.float32, device=self.device)  # rewards paid so far this episode
        self.totals = {k: torch.zeros(B, dtype=torch.float32, device=self.device) for k in self.metrics}
        self.state: list[dict] = [{} for _ in range(B)]
        # the env's reply being written, one token per step: ids, length, tokens written so far
        self.reply_ids = torch.zeros(B, max_new_tokens, dtype=torch.long, device=self.device)
        self.reply_len = torch.zeros(B, dtype=torch.long, device=self.device)
        self.reply_pos = torch.zeros(B, dtype=torch.long, device=self.device)

    @property
    def episode_stat_names(self) -> tuple[str, ...]:
        """The per-episode counts each row's last step reports (collection gathers them)."""
        return ("turns", *self.metrics)

    # --- what a user's env says --------------------------------------------------------------------
    def start(self, row: dict[str, Any]) -> dict[str, Any]:
        """The state an episode of ``row`` starts from (a deep copy is given to each episode). Default: the row
        (``prompt`` and its other columns)."""
        return dict(row)

    def respond(self, state: dict[str, Any], reply: str) -> Reply:
        """The env's answer to the agent's turn ``reply`` (text, special tokens skipped) in the episode whose
        ``state`` this is (mutable: keep what the next turns need)."""
        raise NotImplementedError(f"{type(self).__name__} must define respond(state, reply) -> Reply")

    # --- the token-level env -------------------------------------------------------------------------
    def _row(self, i: int) -> dict[str, Any]:
        return {"prompt": self.prompts[i], **{k: v[i] for k, v in self.columns.items()}}

    def _on_reset(self, rows: torch.Tensor) -> None:
        for b, p in zip(rows.tolist(), self.prompt_index[rows].tolist(), strict=True):
            self.state[b] = copy.deepcopy(self._states[p])
        for t in (self.turns, self.turn_start, self.returns, self.reply_len, self.reply_pos, *self.totals.values()):
            t[rows] = 0

    @property
    def replying(self) -> torch.Tensor:
        """``[B]`` rows whose next step writes a token of the env's reply (their action is ignored)."""
        return ~self.done & (self.reply_pos < self.reply_len)

    def step(self, actions):
        tokens = self._tokens_of(actions)
        live, replying = ~self.done, self.replying
        env_token = self.reply_ids.gather(1, self.reply_pos.clamp(max=self.max_new_tokens - 1)[:, None]).squeeze(1)
        _, col = self._write(torch.where(replying, env_token, tokens), live)  # the agent's token, or the env's
        self.reply_pos += replying.long()
        valid = live & ~replying  # the agent acted: its token is an action
        turn_end = valid & (torch.isin(tokens, self._stop_tensor) | (self.num_generated - self.turn_start
                                                                     >= self.max_turn_tokens)
                            | (self.num_generated >= self.max_new_tokens))
        B, dev = self.num_envs, self.device
        rewards = torch.zeros(B, dtype=torch.float32, device=dev)
        terminated, truncated = torch.zeros(B, dtype=torch.bool, device=dev), torch.zeros(B, dtype=torch.bool, device=dev)
        info: dict[str, Any] = {"valid": valid, "_valid": torch.ones_like(valid), "column": col, "_column": valid,
                                "env_token": torch.where(replying, env_token, 0), "_env_token": replying}
        if turn_end.any():  # Python from here: the user's respond is Python (turn ends are rare among steps)
            self._end_turns(self._rows[turn_end].tolist(), tokens.tolist(), rewards, terminated, truncated)
        ended = terminated | truncated
        self.done |= ended
        info.update({"score": torch.where(ended, self.returns, 0.0), "_score": ended,
                     "turns": torch.where(ended, self.turns, 0), "_turns": ended})
        for k, v in self.totals.items():
            info[k], info["_" + k] = torch.where(ended, v, 0.0), ended
        return self._obs(), rewards, terminated, truncated, info

    def _end_turns(self, rows: list[int], tokens: list[int], rewards: torch.Tensor, terminated: torch.Tensor,
                   truncated: torch.Tensor) -> None:
        """Ask :meth:`respond` about each row's finished turn; pay, end, or queue the reply's tokens."""
        starts, ends = self.turn_start[rows].tolist(), self.num_generated[rows].tolist()
        P = self.max_prompt_tokens
        texts = self.decode([self.input_ids[b, P + s:P + e].tolist() for b, s, e in zip(rows, starts, ends, strict=True)])
        for b, text, end in zip(rows, texts, ends, strict=True):
            reply = self._check_reply(self.respond(self.state[b], text), b)
            self.turns[b] += 1
            rewards[b] = reply.reward
            self.returns[b] += reply.reward
            for k, v in reply.metrics.items():
                self.totals[k][b] += float(v)
            if reply.done:
                terminated[b] = True
                continue
            ids = self._reply_ids(reply, tokens[b]) if reply.message is not None else []
            if int(self.turns[b]) >= self.max_turns or end + len(ids) >= self.max_new_tokens:
                truncated[b] = True  # no room for another agent turn
                continue
            self.reply_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            self.reply_len[b], self.reply_pos[b] = len(ids), 0
            self.turn_start[b] = end + len(ids)  # the agent's next turn starts after the reply

    def _check_reply(self, reply: Any, row: int) -> Reply:
        where = f"env {type(self).__name__}: respond() for row {row}"
        if not isinstance(reply, Reply):
            raise TypeError(f"{where} returned {type(reply).__name__}; return textrl.envs.Reply(message=..., "
                            "reward=..., done=...)")
        if reply.message is not None and not isinstance(reply.message, str):
            raise TypeError(f"{where}: Reply.message must be a string or None, got {type(reply.message).__name__}; "
                            "convert the env's answer with str()")
        if isinstance(reply.reward, bool) or not isinstance(reply.reward, int | float) or not math.isfinite(reply.reward):
            raise ValueError(f"{where}: Reply.reward must be a finite number, got {reply.reward!r}")
        if reply.role not in ("user", "tool"):
            raise ValueError(f"{where}: Reply.role must be 'user' or 'tool', got {reply.role!r}")
        unknown = set(reply.metrics) - set(self.metrics)
        if unknown:
            raise ValueError(f"{where}: Reply.metrics has {sorted(unknown)}, not in {type(self).__name__}.metrics = "
                             f"{self.metrics}; list every reported count there")
        return reply

    def _reply_ids(self, reply: Reply, last_token: int) -> list[int]:
        """The tokens appended after the agent's turn: the template's text between the agent's content and its
        next turn, without the stop token the agent already wrote."""
        text = reply_suffix(self.tokenizer, reply.role, reply.message)
        stop = self._stop_text.get(last_token)
        if stop and text.startswith(stop):
            text = text[len(stop):]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_new_tokens:
            raise ValueError(f"env {type(self).__name__}: a {reply.role} message of {len(ids)} tokens cannot fit an "
                             f"episode of max_new_tokens={self.max_new_tokens}; raise max_new_tokens or shorten the "
                             f"env's replies (message starts {reply.message[:60]!r})")
        return ids


def _no_scorer(prompts, completions):
    raise RuntimeError("a multi-turn env is scored by its respond(), not by a scorer")
