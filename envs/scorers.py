"""Reward scorers: what the text env calls to score a finished completion.

A scorer is any callable ``(prompts: list[str], completions: list[str]) -> tensor[B]``: text in, one score
per row out, so a reward model may use its own tokenizer. A *token-level* scorer (``token_level = True``)
instead receives ``(input_ids, attention_mask)`` of prompt + completion in the policy's own tokenizer and
skips the decode/re-encode round trip.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Scorer", "TokenScorer", "HFRewardModelScorer", "WeightedRewards", "call_scorer", "check_scores",
           "is_model_pair", "prompt_as_text",
           "resolve_scorer"]


class Scorer(Protocol):
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor: ...


@runtime_checkable
class TokenScorer(Protocol):
    token_level: bool

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


def resolve_scorer(scorer: Any) -> Any:
    """A scorer object, or a ``"module:attr"`` string naming one (a class or factory is called without
    arguments), so that configs can name scorers."""
    if not isinstance(scorer, str):
        return scorer
    from textrl.imports import load_attr

    obj = load_attr(scorer, "scorer")
    return obj() if inspect.isclass(obj) else obj


def check_scores(scores: Any, n: int, scorer: Callable) -> torch.Tensor:
    """Validate a scorer's output: ``n`` finite numbers, returned as a float tensor ``[n]``."""
    name = getattr(scorer, "__name__", type(scorer).__name__)
    try:
        t = torch.as_tensor(scores, dtype=torch.float32).detach().flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"scorer {name} must return a tensor or sequence of {n} numbers, got {type(scores).__name__}") from None
    if t.numel() != n:
        raise ValueError(f"scorer {name} returned {t.numel()} scores for {n} completions; expected one per completion")
    if not torch.isfinite(t).all():
        bad = [i for i, ok in enumerate(torch.isfinite(t).tolist()) if not ok][:5]
        raise ValueError(f"scorer {name} returned non-finite scores at rows {bad} ({t[bad].tolist()}); "
                         "scores must be finite numbers")
    return t


def prompt_as_text(prompt: Any, tokenizer: Any = None) -> str:
    """A prompt as the text a reward model reads: a string as it is; a chat conversation through
    ``tokenizer``'s chat template (generation prompt added), or its messages' contents, one per line."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['content']}\n" for m in messages)


class HFRewardModelScorer:
    """Adapter for a Hugging Face sequence-classification reward model with its own tokenizer.

    Scores ``prompt + completion`` (or a chat-formatted pair via ``format_fn``) in batches, in eval mode,
    without gradients; the score is logit ``label_index`` of the classification head.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        batch_size: int = 32,
        max_length: int = 512,
        label_index: int = 0,
        format_fn: Callable[[str, str], str] | None = None,
    ):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            raise ValueError("reward model tokenizer has no pad token; set tokenizer.pad_token before scoring")
        self.batch_size = batch_size
        self.max_length = max_length
        self.label_index = label_index
        self.format_fn = format_fn or (lambda p, c: prompt_as_text(p, tokenizer) + c)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        texts = [self.format_fn(p, c) for p, c in zip(prompts, completions, strict=True)]
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length).to(self.device)
            logits = self.model(**enc).logits  # (b, num_labels)
            out.append(logits[:, self.label_index].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def call_scorer(scorer: Callable, prompts: list[Any], completions: list[str], columns: dict[str, list]) -> Any:
    """Call a scorer with the prompts, the completions and the dataset columns (the ground truth of a
    verifiable task, …) its signature names — all of them if it takes ``**kwargs``. A plain ``(prompts,
    completions)`` function, a TRL-style ``(completions, answer, **kwargs)`` one and ``(prompts, completions,
    **kwargs)`` all work: ``prompts``/``completions`` go by keyword where the signature names them (or takes
    ``**kwargs``), else by position."""
    try:
        params = list(inspect.signature(scorer).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: positional, no columns
        return scorer(prompts, completions)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    given = {k: v for k, v in columns.items() if var_kw or k in named}
    if "completions" in named or (var_kw and _positional(params) == 0):  # by keyword
        call = {"completions": completions, **given}
        if "prompts" in named or var_kw:
            call["prompts"] = prompts
        args: tuple = ()
    else:
        args, call = (prompts, completions), given
    needed = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
              and p.name not in call][len(args):]
    if needed:
        name = getattr(scorer, "__name__", type(scorer).__name__)
        raise ValueError(f"reward function {name} needs the column(s) {needed}, and the prompts' columns are "
                         f"{sorted(columns)}: add them to every row of the train and eval datasets, or give the "
                         "parameter a default")
    return scorer(*args, **call)


def _positional(params: list[inspect.Parameter]) -> int:
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


class WeightedRewards:
    """Several rewards as one scorer: ``Σ_i w_i · f_i(prompts, completions, **columns)`` (see
    :func:`call_scorer`). An item may also be a reward model to load — a name or path, or a ``(model,
    tokenizer)`` pair — which the run loads on its device with :meth:`resolve` before the first score. Each
    function's scores are checked (one finite number per completion); :meth:`take_means` gives each one's mean
    over the completions scored since it was last called, by name (a run logs them as ``reward/<name>``)."""

    def __init__(self, funcs: Sequence[Any], weights: Sequence[float] | None = None):
        funcs = list(funcs)
        if not funcs:
            raise ValueError("reward_funcs: give at least one reward function")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights: expected {len(funcs)} finite numbers, one per function, got {weights}")
        for f in funcs:
            if isinstance(f, torch.nn.Module) and not callable(getattr(f, "score", None)):
                raise TypeError(f"reward_funcs: a model object needs its tokenizer: pass ({type(f).__name__}, tokenizer)")
            if getattr(f, "token_level", False):
                raise TypeError(f"reward_funcs: {type(f).__name__} is a token-level scorer (it reads the policy's token "
                                "ids); use it alone as the env's scorer, not in a list of text rewards")
            if not (callable(f) or isinstance(f, (str, Path)) or is_model_pair(f)):
                raise TypeError(f"reward_funcs: expected functions, reward model names/paths or (model, tokenizer) "
                                f"pairs, got {f!r}")
        self.funcs, self.weights = funcs, weights
        names = [_name(f) for f in funcs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self._sums: dict[str, float] = {}
        self._count = 0

    def resolve(self, load: Callable[[Any], Callable]) -> None:
        """Replace every reward model still to load (a name, path or pair) by ``load(item)``, a scorer."""
        self.funcs = [load(f) if isinstance(f, (str, Path)) or is_model_pair(f) else f for f in self.funcs]

    def __call__(self, prompts: list[Any], completions: list[str], **columns: list) -> torch.Tensor:
        total = torch.zeros(len(completions))
        for name, f, w in zip(self.names, self.funcs, self.weights, strict=True):
            if not callable(f):
                raise RuntimeError(f"reward model {f!r} is not loaded yet: call resolve(loader) first (textrl's runs do)")
            scores = check_scores(call_scorer(f, prompts, completions, columns), len(completions), f)
            self._sums[name] = self._sums.get(name, 0.0) + float(scores.sum())
            total += w * scores
        self._count += len(completions)
        return total

    def take_means(self) -> dict[str, float]:
        """Each function's mean score (unweighted) over the completions scored since the last call."""
        means = {name: total / self._count for name, total in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return means

    def __repr__(self) -> str:
        return "WeightedRewards(" + ", ".join(f"{w:g}·{n}" for n, w in zip(self.names, self.weights, strict=True)) + ")"


def is_model_pair(f: Any) -> bool:
    """Whether ``f`` is a ``(model, tokenizer)`` pair: a reward model given as objects."""
    return isinstance(f, tuple) and len(f) == 2 and isinstance(f[0], torch.nn.Module)


def _name(f: Any) -> str:
    if isinstance(f, (str, Path)):
        return Path(str(f)).name or str(f)
    if is_model_pair(f):
        return type(f[0]).__name__
    return getattr(f, "__name__", type(f).__name__)


def clip_and_normalise(scores: torch.Tensor, clip: float | None, scale: float, bias: float) -> torch.Tensor:
    """score → clip(scale · score + bias, −clip, clip) (clip None: no clipping)."""
    scores = scores * scale + bias
    if clip is not None:
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"score_clip must be a finite number > 0, got {clip!r}")
        scores = scores.clamp(-clip, clip)
    return scores


CHEERFUL = [
    "What a wonderful, happy day, I love it!", "This is great news and it makes me smile.",
    "I feel joyful, grateful and full of hope.", "Everything turned out beautifully, how delightful!",
    "It was fun, warm and cheerful, a real pleasure.",
]
GLOOMY = [
    "What a terrible, miserable day, I hate it.", "This is awful news and it makes me sad.",
    "I feel hopeless, tired and full of dread.", "Everything went wrong, it was a disaster.",
    "It was dull, cold and depressing, a real misery.",
]


class MiniLMStyleScorer:
    """A style reward from a real pretrained sentence encoder (all-MiniLM-L6-v2, shipped offline).

    score = scale · (mean cos(e(completion), e(positive anchors)) − mean cos(e(completion), e(negative anchors)))
    with e = mean-pooled, L2-normalised MiniLM embeddings. Defaults score cheerfulness. Only the completion
    is embedded; the encoder has its own WordPiece tokenizer (nothing is shared with the policy).
    """

    def __init__(self, positive: Sequence[str] = tuple(CHEERFUL), negative: Sequence[str] = tuple(GLOOMY),
                 scale: float = 5.0, model_path: str | None = None, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        from textrl.lm.models import disable_dropout, minilm_path

        path = model_path or str(minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = disable_dropout(AutoModel.from_pretrained(path)).eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.scale, self.batch_size = scale, batch_size
        self.pos, self.neg = self.embed(list(positive)), self.embed(list(negative))

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True, max_length=128,
                                 return_tensors="pt").to(self.model.device)
            h = self.model(**enc).last_hidden_state  # (b, L, 384)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
        return torch.cat(out).float().cpu()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        e = self.embed([c if c.strip() else "." for c in completions])  # (B, 384)
        return self.scale * ((e @ self.pos.T).mean(-1) - (e @ self.neg.T).mean(-1))
