"""Text generation as a natively batched Gymnasium ``VectorEnv`` at token level.

Layout: each row's tokens live in one buffer ``[B, L]``, ``L = max_prompt_tokens + max_new_tokens``, on
the model's device. The prompt is left-padded so that it ends at column ``P = max_prompt_tokens``; the
t-th generated token of a row goes to column ``P + t``.

Spaces (per row):
    observation: Dict(input_ids = Box(0, V-1, (L,), int64), attention_mask = Box(0, 1, (L,), int64))
    action:      Discrete(V), the next token id. The vector env takes a LongTensor ``[B]`` or a dict
                 ``{"token": LongTensor[B], "logprob": FloatTensor[B]}``; wrappers such as
                 :class:`~textrl.envs.kl_penalty.KLPenalty` read the policy's log-prob from the dict.
Episodes: EOS ends a row with ``terminated=True``; its ``max_new_tokens``-th token without EOS gives
``truncated=True``. The reward is 0 except at a row's last real token, where it is the scorer's score
(minus ``missing_eos_penalty`` if truncated). Rows that ended stay ended — reward 0, ``info["valid"]``
False, their action ignored — until ``reset``; ``metadata["autoreset_mode"]`` is DISABLED and
``reset(options={"reset_mask": mask})`` resets just the rows in ``mask``.
Observations are fresh copies of the buffers (the env never writes to a returned observation: safe to
keep across steps). Infos are dicts of ``[B]`` tensors, each key with Gymnasium's ``_key`` mask: ``reset``
gives ``prompt_index`` (which prompt each row answers) and ``response_start`` (``P``, the first response
column); ``step`` gives ``valid`` (this step's token is real) and ``score`` with ``_score`` marking the rows
scored now. Which prompt a row gets is decided by the env's :class:`~textrl.envs.prompts.PromptSampler`
(random or sequential order, k rows per prompt, a shard of a data-parallel batch); the env itself knows
nothing of trainers or processes. ``render_mode="ansi"``: ``render()`` returns one string per row, the
row's text so far (prompt and completion decoded, special tokens shown).

Arrays: the vector env speaks torch — observations, rewards, flags and infos are tensors on ``device`` (the
model's), so a GPU rollout never leaves the GPU. Gymnasium's stock vector wrappers
(``gymnasium.wrappers.vector.RecordEpisodeStatistics``, ``DictInfoToList``, ...) expect numpy: put
:class:`TorchToNumpy` under them, e.g. ``RecordEpisodeStatistics(TorchToNumpy(env))`` (numpy out, numpy or
torch actions in; a :class:`~textrl.envs.kl_penalty.KLPenalty` goes inside it, on the torch env). With
``array-api-compat`` installed, Gymnasium's own ``ArrayConversion(env, env_xp=torch, target_xp=numpy)`` does
the same. Episode statistics follow ``autoreset_mode`` DISABLED: a row's episode is reported at the step it
ends. The single env :class:`TextGenEnv` (``gym.make``, or ``gym.make_vec(..., vectorization_mode="sync")``)
is numpy already and needs no conversion.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from textrl.envs.prompts import PromptSampler, load_prompt_records, load_prompts, prompt_rows
from textrl.envs.scorers import TokenScorer, call_scorer, check_scores, clip_and_normalise, resolve_scorer

from textrl.shard import Shard

__all__ = ["TextGenVectorEnv", "TextGenEnv", "TorchToNumpy"]


class TextGenVectorEnv(gym.vector.VectorEnv):
    """Token-level text generation over ``num_envs`` rows at once (no Python loop over rows).

    Args:
        num_envs: rows B.
        tokenizer: the policy's tokenizer (encodes prompts, decodes completions for text scorers).
        prompts: list, file or dataset (see :func:`~textrl.envs.prompts.load_prompt_records`): strings or chat
            conversations, with optional extra columns; sampled with the env's seeded RNG.
        scorer: ``(prompts, completions) -> [B]`` or a token-level scorer (see :mod:`textrl.envs.scorers`); it
            also receives the prompts' other columns it names (or all, with ``**kwargs``) by keyword.
        max_new_tokens: generation length limit (truncation).
        max_prompt_tokens: prompt budget; longer prompts are rejected at construction. Default: longest prompt.
        context_length: the model's context; max_prompt_tokens + max_new_tokens must fit. Default: no check.
        pad_token_id: use this PAD instead of the tokenizer's (needed when the tokenizer's PAD equals EOS).
        missing_eos_penalty: subtracted from the score of rows that hit max_new_tokens without EOS.
        score_clip, score_scale, score_bias: score → clip(scale·score + bias, ±clip).
        device: where the token buffers live (the model's device).
        vocab_size: the policy's number of logits, where it is larger than ``len(tokenizer)`` (Qwen2 pads 151,665
            tokens to 151,936): the ids in between are actions that decode to nothing (see :meth:`fit_vocabulary`).
            Default: ``len(tokenizer)``.
        eval_prompts: held-out prompts (same forms as ``prompts``) for evaluation; not used for training.
        model: the default policy model of a registered env (read by ``textrl train``; unused here).
        chat_template: wrap each prompt as a user turn with the tokenizer's chat template (instruct models).
        prompt_order, num_generations, shard: how prompts are drawn (see
            :class:`~textrl.envs.prompts.PromptSampler`): "random" or "sequential"; k contiguous rows per
            prompt; the rows ``(offset, total)`` of a data-parallel batch this env holds.
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        num_envs: int,
        tokenizer: Any,
        prompts: Any,
        scorer: Any,
        max_new_tokens: int = 32,
        max_prompt_tokens: int | None = None,
        context_length: int | None = None,
        pad_token_id: int | None = None,
        missing_eos_penalty: float | None = None,
        score_clip: float | None = None,
        score_scale: float = 1.0,
        score_bias: float = 0.0,
        device: str | torch.device = "cpu",
        eval_prompts: Any = None,
        prompt_order: str = "random",
        model: str | None = None,
        chat_template: bool = False,
        num_generations: int = 1,
        shard: Shard | tuple[int, int] | None = None,
        render_mode: str | None = None,
        stop_token_ids: Any = None,
        vocab_size: int | None = None,
    ):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        if not isinstance(num_envs, int) or num_envs <= 0:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        scorer = resolve_scorer(scorer)
        if not callable(scorer):
            raise TypeError(f"scorer must be callable (prompts, completions) -> scores, got {type(scorer).__name__}")
        # the settings a held-out copy of this env keeps (see with_prompts)
        self._settings = dict(tokenizer=tokenizer, scorer=scorer, max_new_tokens=max_new_tokens,
                              max_prompt_tokens=max_prompt_tokens, context_length=context_length,
                              pad_token_id=pad_token_id, missing_eos_penalty=missing_eos_penalty,
                              score_clip=score_clip, score_scale=score_scale, score_bias=score_bias, device=device,
                              chat_template=chat_template, stop_token_ids=stop_token_ids)
        self.default_model = model
        self.chat_template = chat_template
        # held-out prompts as rows that keep their columns (a verifiable task's answers), see with_prompts
        self.eval_prompts = prompt_rows(*load_prompt_records(eval_prompts)) if eval_prompts is not None else None
        self.num_envs, self.tokenizer, self.scorer = num_envs, tokenizer, scorer
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.missing_eos_penalty = missing_eos_penalty
        self.score_clip, self.score_scale, self.score_bias = score_clip, score_scale, score_bias
        self.stop_token_ids = self._stop_ids(stop_token_ids, tokenizer)
        self.eos_token_id, self.pad_token_id = self._special_ids(tokenizer, pad_token_id, self.stop_token_ids)
        self._stop_tensor = torch.tensor(self.stop_token_ids, dtype=torch.long, device=self.device)
        self.tokenizer_size = len(tokenizer)  # (ids from here to vocab_size are a model's extra logits' ones)
        self.vocab_size = self.tokenizer_size if vocab_size is None else self._checked_vocabulary(vocab_size)
        self.prompts, self.columns = load_prompt_records(prompts)
        self.prompt_sampler = PromptSampler(len(self.prompts), num_envs, prompt_order, num_generations, shard)
        self._encode_prompts(max_prompt_tokens, context_length)
        self._make_spaces_and_buffers()

    def _special_ids(self, tokenizer: Any, pad_token_id: int | None, stops: tuple[int, ...]) -> tuple[int, int]:
        """(EOS, PAD); PAD must differ from EOS, or EOS would be masked as padding. When the tokenizer's PAD is
        missing or equals EOS (SmolLM2, Llama 3) another special token pads — padding is masked by the attention
        mask, never read by id — and ``pad_note`` says which."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("tokenizer has no eos_token_id; the env needs EOS to end rows")
        self.pad_note = None
        if pad_token_id is not None:
            if pad_token_id == eos or pad_token_id in stops:
                raise ValueError(f"pad_token_id={pad_token_id} equals eos_token_id={eos} or a stop token "
                                 f"({list(stops)}): it would be masked as padding and the model would never learn to "
                                 "stop; leave pad_token_id unset (the env picks one) or give another token id")
            return eos, pad_token_id
        pad = tokenizer.pad_token_id
        if pad is None or pad == eos or pad in stops:
            specials = [tokenizer.unk_token_id, tokenizer.bos_token_id, *getattr(tokenizer, "all_special_ids", [])]
            pad = next((i for i in specials if i is not None and i != eos and i not in stops),
                       next(i for i in range(len(stops) + 2) if i != eos and i not in stops))
            what = 'missing' if tokenizer.pad_token_id is None else 'EOS' if tokenizer.pad_token_id == eos else 'a stop token'
            self.pad_note = (f"the tokenizer's PAD is {what}: padding "
                             f"with token {pad} ({tokenizer.convert_ids_to_tokens(pad)!r}) instead (masked, never "
                             "read); set pad_token_id to choose another")
        return eos, pad

    @staticmethod
    def _stop_ids(stop_token_ids: Any, tokenizer: Any) -> tuple[int, ...]:
        """The ids that end a row (default: EOS alone), checked."""
        if stop_token_ids is None:
            return (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
        ids = tuple(dict.fromkeys(int(i) for i in ([stop_token_ids] if isinstance(stop_token_ids, int)
                                                    else stop_token_ids)))
        if not ids:
            raise ValueError("stop_token_ids is empty; give at least one id that ends a row (e.g. EOS, "
                             f"{tokenizer.eos_token_id}), or None for EOS alone")
        if any(not 0 <= i < len(tokenizer) for i in ids):
            raise ValueError(f"stop_token_ids={list(ids)} must be token ids in [0, {len(tokenizer)})")
        return ids

    def _encode_prompts(self, max_prompt_tokens: int | None, context_length: int | None) -> None:
        """Encode every prompt once, left-padded to P: ``[N_prompts, P]``. A conversation (list of messages)
        goes through the tokenizer's chat template, and so does a string with ``chat_template`` (as a user turn)."""
        def text(p: Any) -> str:
            if isinstance(p, str) and not self.chat_template:
                return p
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("prompts: a chat conversation (or chat_template=True) needs a tokenizer with a chat "
                                 "template; give plain string prompts for this tokenizer")
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        texts = [text(p) for p in self.prompts]
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in texts]
        longest = max(len(e) for e in encoded)
        self.max_prompt_tokens = longest if max_prompt_tokens is None else max_prompt_tokens
        too_long = [(i, len(e)) for i, e in enumerate(encoded) if len(e) > self.max_prompt_tokens]
        if too_long:
            i, n = too_long[0]
            raise ValueError(f"prompt #{i} has {n} tokens, more than max_prompt_tokens={self.max_prompt_tokens} "
                             f"({len(too_long)} prompts too long); raise max_prompt_tokens or shorten them")
        empty = [i for i, e in enumerate(encoded) if not e]
        if empty:
            raise ValueError(f"prompts {empty[:5]} encode to zero tokens")
        total = self.max_prompt_tokens + self.max_new_tokens
        if context_length is not None and total > context_length:
            raise ValueError(f"max_prompt_tokens + max_new_tokens = {self.max_prompt_tokens} + {self.max_new_tokens} "
                             f"= {total} exceeds the model's context_length={context_length}; lower one of them")
        P = self.max_prompt_tokens
        self._prompt_ids = torch.full((len(encoded), P), self.pad_token_id, dtype=torch.long)
        self._prompt_mask = torch.zeros((len(encoded), P), dtype=torch.long)
        for i, e in enumerate(encoded):
            self._prompt_ids[i, P - len(e):] = torch.tensor(e)
            self._prompt_mask[i, P - len(e):] = 1
        self._prompt_ids = self._prompt_ids.to(self.device)
        self._prompt_mask = self._prompt_mask.to(self.device)

    def _checked_vocabulary(self, vocab_size: Any) -> int:
        """``vocab_size`` checked, and at least the tokenizer's."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive integer (the policy's number of logits), got {vocab_size!r}")
        return max(self.tokenizer_size, vocab_size)

    def fit_vocabulary(self, vocab_size: int) -> None:
        """Take every id below ``vocab_size`` (the policy's number of logits) as an action where the model's
        output is wider than the tokenizer: Qwen2's 151,936 logits for 151,665 tokens. A sampled id in between is
        then a token that decodes to nothing, not an error. ``textrl train`` and ``textrl eval`` call it with the
        policy's number of logits (also the ``vocab_size`` argument); it never narrows the actions."""
        self.vocab_size = max(self.vocab_size, self._checked_vocabulary(vocab_size))
        self._make_spaces()

    def _make_spaces(self) -> None:
        B, L = self.num_envs, self.max_prompt_tokens + self.max_new_tokens
        self.single_observation_space = gym.spaces.Dict({
            "input_ids": gym.spaces.Box(0, self.vocab_size - 1, (L,), np.int64),
            "attention_mask": gym.spaces.Box(0, 1, (L,), np.int64),
        })
        self.single_action_space = gym.spaces.Discrete(self.vocab_size)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, B)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, B)

    def _make_spaces_and_buffers(self) -> None:
        self._make_spaces()
        B, L = self.num_envs, self.max_prompt_tokens + self.max_new_tokens
        self.input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long, device=self.device)
        self.attention_mask = torch.zeros((B, L), dtype=torch.long, device=self.device)
        self.prompt_index = torch.zeros(B, dtype=torch.long, device=self.device)
        self.num_generated = torch.zeros(B, dtype=torch.long, device=self.device)  # per row
        self.done = torch.ones(B, dtype=torch.bool, device=self.device)  # must reset first
        self._rows = torch.arange(B, device=self.device)

    # --- Gymnasium API ----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        reset_mask = None if options is None else options.get("reset_mask")
        if reset_mask is None:
            rows = self._rows
        else:
            reset_mask = torch.as_tensor(np.asarray(reset_mask) if not torch.is_tensor(reset_mask) else reset_mask)
            if reset_mask.dtype != torch.bool or reset_mask.shape != (self.num_envs,):
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},), "
                                 f"got {reset_mask.dtype} {tuple(reset_mask.shape)}")
            self.prompt_sampler.check_reset_mask(reset_mask)
            rows = self._rows[reset_mask.to(self.device)]
        picks = self.prompt_sampler.draw(len(rows), self.np_random, full=reset_mask is None).to(self.device)
        P = self.max_prompt_tokens
        self.prompt_index[rows] = picks
        self.input_ids[rows] = self.pad_token_id
        self.attention_mask[rows] = 0
        self.input_ids[rows, :P] = self._prompt_ids[picks]
        self.attention_mask[rows, :P] = self._prompt_mask[picks]
        self.num_generated[rows] = 0
        self.done[rows] = False
        self._on_reset(rows)
        every = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        start = torch.full((self.num_envs,), P, dtype=torch.long, device=self.device)
        return self._obs(), {"prompt_index": self.prompt_index.clone(), "_prompt_index": every,
                             "response_start": start, "_response_start": every}

    def _on_reset(self, rows: torch.Tensor) -> None:
        """Subclasses reset their own per-row state of ``rows`` here."""

    def step(self, actions):
        tokens = self._tokens_of(actions)
        valid, column = self._write(tokens)
        terminated = valid & torch.isin(tokens, self._stop_tensor)
        truncated = valid & ~terminated & (self.num_generated >= self.max_new_tokens)
        ended = terminated | truncated
        self.done |= ended

        rewards = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
        scores = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
        if ended.any():
            idx = self._rows[ended]
            s = self._score(idx).to(self.device)
            if self.missing_eos_penalty is not None:
                s = s - self.missing_eos_penalty * truncated[idx].float()
            scores[idx] = s
            rewards[idx] = s
        info = {"valid": valid, "_valid": torch.ones_like(valid), "column": column, "_column": valid,
                "score": scores, "_score": ended}
        return self._obs(), rewards, terminated, truncated, info

    def _write(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the token of each ``live`` row (default: every row not done) at its next response column.
        Returns ``valid`` ``[B]`` (the row was live: its token is real) and the response column each token
        went to ``[B]`` (0 where not valid)."""
        valid = ~self.done if live is None else live  # (B,) rows whose token is real this step
        # where each row writes; a finished row "writes" column 0's own value back (no host sync on a GPU)
        col = torch.where(valid, self.max_prompt_tokens + self.num_generated, 0)[:, None]
        self.input_ids.scatter_(1, col, torch.where(valid[:, None], tokens[:, None], self.input_ids.gather(1, col)))
        self.attention_mask.scatter_(1, col, torch.where(valid[:, None], 1, self.attention_mask.gather(1, col)))
        column = torch.where(valid, self.num_generated, 0)
        self.num_generated += valid.long()
        return valid, column

    # --- helpers ------------------------------------------------------------------------------
    def _tokens_of(self, actions) -> torch.Tensor:
        if isinstance(actions, dict):
            if "token" not in actions:
                raise ValueError(f"action dict needs a 'token' entry, got keys {sorted(actions)}")
            actions = actions["token"]
        tokens = torch.as_tensor(actions, device=self.device)
        if tokens.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},) (one token per row), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"actions must be integer token ids, got dtype {tokens.dtype}")
        tokens = tokens.long()
        outside = ((tokens < 0) | (tokens >= self.vocab_size)) & ~self.done
        if outside.any():  # one host sync per step
            bad = tokens[outside][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size}): a model with more logits "
                             f"than its tokenizer has tokens needs vocab_size=its number of logits (textrl train and "
                             f"eval pass it)")
        return tokens

    def with_prompts(self, prompts: Any, num_envs: int | None = None, shard: Shard | None = None) -> TextGenVectorEnv:
        """This env's settings (tokenizer, scorer — the same object —, lengths, PAD, chat template, device) over
        other ``prompts``, served in order, one row each (``num_envs`` rows, default one per prompt; ``shard``:
        the rows of a data-parallel batch): the held-out evaluation env. Subclasses whose constructor takes
        other arguments override it."""
        rows = num_envs if num_envs is not None else len(load_prompts(prompts))
        env = type(self)(rows, prompts=prompts, prompt_order="sequential", shard=shard, **self._settings)
        if self.vocab_size > env.vocab_size:  # (a model with more logits than tokens: see fit_vocabulary)
            env.fit_vocabulary(self.vocab_size)
        return env

    @property
    def num_generations(self) -> int:
        """k: rows per prompt in a batch (see :class:`~textrl.envs.prompts.PromptSampler`)."""
        return self.prompt_sampler.num_generations

    def _obs(self) -> dict[str, torch.Tensor]:
        """Copies of the token buffers: an observation stays as it was when returned."""
        return {"input_ids": self.input_ids.clone(), "attention_mask": self.attention_mask.clone()}

    def render(self) -> tuple[str, ...] | None:
        """``render_mode="ansi"``: one string per row, its prompt and completion so far decoded (special tokens
        such as EOS shown, padding left out); None without a render mode."""
        if self.render_mode is None:
            return None
        ids, mask = self.input_ids.cpu(), self.attention_mask.cpu().bool()
        return tuple(self.decode([row[m].tolist() for row, m in zip(ids, mask, strict=True)], skip_special_tokens=False))

    def decode(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """The texts of token id lists (the tokenizer's ``batch_decode``); ids past the tokenizer's (a model with
        more logits than tokens: :meth:`fit_vocabulary`) are nothing, whatever the tokenizer does with them."""
        if self.vocab_size > self.tokenizer_size:
            n = self.tokenizer_size
            rows = [[i for i in row if i < n] for row in rows]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)

    def completion_ids(self, rows: torch.Tensor) -> list[list[int]]:
        P = self.max_prompt_tokens
        gen = self.input_ids[rows, P:].tolist()  # one copy to the host for all rows
        lens = self.num_generated[rows].tolist()
        return [g[:n] for g, n in zip(gen, lens, strict=True)]

    def _score(self, rows: torch.Tensor) -> torch.Tensor:
        if isinstance(self.scorer, TokenScorer) and getattr(self.scorer, "token_level", False):
            ids, mask = self.input_ids[rows], self.attention_mask[rows]
            if self.vocab_size > self.tokenizer_size:  # ids past the tokenizer's are nothing, as in the texts
                past = ids >= self.tokenizer_size
                ids, mask = ids.masked_fill(past, self.pad_token_id), mask.masked_fill(past, 0)
            raw = self.scorer(ids, mask)
        else:
            which = self.prompt_index[rows].tolist()
            prompts = [self.prompts[i] for i in which]
            completions = self.decode(self.completion_ids(rows))
            columns = {name: [values[i] for i in which] for name, values in self.columns.items()}
            try:
                raw = call_scorer(self.scorer, prompts, completions, columns)
            except (ValueError, TypeError) as err:
                if str(err).startswith("reward function"):  # (call_scorer's own message: the columns it needs)
                    raise
                raise ValueError(_scorer_failed(self.scorer, err, completions)) from err
            except Exception as err:  # the user's code failed: say where, with what, before a long traceback
                raise ValueError(_scorer_failed(self.scorer, err, completions)) from err
        scores = check_scores(raw, len(rows), self.scorer)
        return clip_and_normalise(scores, self.score_clip, self.score_scale, self.score_bias)


def _scorer_failed(scorer: Any, err: BaseException, completions: list[str]) -> str:
    import traceback

    name = getattr(scorer, "__name__", type(scorer).__name__)
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" at {frame.filename}:{frame.lineno}" if frame else ""
    return (f"scorer: {name} raised {type(err).__name__}: {err}{where}, scoring {len(completions)} completion(s) (the "
            f"first: {completions[0][:60]!r}); a scorer must return one finite score per completion for any text, "
            "an empty or unparsable completion included")


class TextGenEnv(gym.Env):
    """The single-env form (``gym.make``, and ``gym.make_vec(..., vectorization_mode="sync")``): one row of
    :class:`TextGenVectorEnv`, numpy in and out, so that ``gymnasium.utils.env_checker.check_env`` applies.
    Action: an int token id. Info: ``prompt_index`` and ``response_start`` at reset; ``score`` at the step
    that ends the episode (so a sync vector env's ``_score`` marks the rows scored now, as the native env's).
    Stepping an ended episode raises: call ``reset()`` (a sync vector env autoresets on the next step).
    Subclasses for other registered tasks set :attr:`vector_env` to the task's vector entry point."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    #: builds the one-row vector env: ``vector_env(num_envs=1, render_mode=..., **kwargs)``
    vector_env = staticmethod(TextGenVectorEnv)

    def __init__(self, render_mode: str | None = None, **kwargs):
        self.vec = type(self).vector_env(num_envs=1, render_mode=render_mode, **kwargs)
        self.render_mode = render_mode
        self.observation_space = self.vec.single_observation_space
        self.action_space = self.vec.single_action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        obs, info = self.vec.reset(seed=seed if seed is not None else int(self.np_random.integers(2**31)))
        return self._np(obs), {"prompt_index": int(info["prompt_index"][0]),
                               "response_start": int(info["response_start"][0])}

    def step(self, action):
        if self.vec.done[0]:
            raise RuntimeError("step() called on an ended episode; call reset() first")
        obs, r, term, trunc, info = self.vec.step(torch.tensor([int(action)]))
        ended = {"score": float(info["score"][0])} if bool(info["_score"][0]) else {}
        return self._np(obs), float(r[0]), bool(term[0]), bool(trunc[0]), ended

    def render(self) -> str | None:
        """``render_mode="ansi"``: the row's prompt and completion so far, decoded; None without a render mode."""
        return None if self.render_mode is None else self.vec.render()[0]

    @staticmethod
    def _np(obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: v[0].cpu().numpy().astype(np.int64) for k, v in obs.items()}


class TorchToNumpy(gym.vector.VectorWrapper):
    """A text env (or a wrapper of one, e.g. :class:`~textrl.envs.kl_penalty.KLPenalty`) with numpy in and
    out, so that Gymnasium's stock vector wrappers apply: ``RecordEpisodeStatistics(TorchToNumpy(env))``,
    ``DictInfoToList(TorchToNumpy(env))``. Observations, rewards, flags and every info array come back as numpy
    copies on the host; actions (numpy arrays, lists or tensors, alone or in a dict such as
    ``{"token": ..., "logprob": ...}``) go to the env as tensors on ``device`` (default: the env's). Spaces,
    metadata and ``reset`` options pass through unchanged. Training (:mod:`textrl.lm.collect`) uses the torch
    env directly."""

    def __init__(self, env: gym.vector.VectorEnv, device: str | torch.device | None = None):
        super().__init__(env)
        self.device = torch.device(device if device is not None else getattr(env.unwrapped, "device", "cpu"))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        return _to_numpy(self.env.reset(seed=seed, options=options))

    def step(self, actions):
        return _to_numpy(self.env.step(_to_torch(actions, self.device)))


def _to_numpy(value: Any) -> Any:
    """Tensors → numpy copies, through dicts, tuples and lists; anything else as it is."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True).numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_to_numpy(v) for v in value)
    return value


def _to_torch(value: Any, device: torch.device) -> Any:
    """Arrays, numbers and lists of them → tensors on ``device``, through dicts; tensors moved there."""
    if isinstance(value, dict):
        return {k: _to_torch(v, device) for k, v in value.items()}
    if torch.is_tensor(value):
        return value.to(device)
    return torch.as_tensor(np.asarray(value), device=device)
