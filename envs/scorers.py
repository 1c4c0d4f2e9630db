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
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Scorer", "TokenScorer", "HFRewardModelScorer", "WeightedRewards", "call_scorer", "check_scores",
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
        self.format_fn = format_fn or (lambda p, c: p + c)

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


def call_scorer(scorer: Callable, prompts: list[str], completions: list[str], columns: dict[str, list]) -> Any:
    """``scorer(prompts, completions, **columns)``, passing the dataset columns (the ground truth of a verifiable
    task, …) the scorer's signature names — all of them if it takes ``**kwargs`` — so a plain
    ``(prompts, completions)`` function and a TRL-style ``(prompts, completions, answer, **kwargs)`` both work."""
    if not columns:
        return scorer(prompts, completions)
    try:
        params = inspect.signature(scorer).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: no columns
        return scorer(prompts, completions)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return scorer(prompts, completions, **columns)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return scorer(prompts, completions, **{k: v for k, v in columns.items() if k in named})


class WeightedRewards:
    """Several rewards as one scorer: ``Σ_i w_i · f_i(prompts, completions, **columns)``. Each function's
    scores are checked (one finite number per completion); ``last`` holds each one's mean over the last call,
    by name, for logging."""

    def __init__(self, funcs: Sequence[Callable], weights: Sequence[float] | None = None):
        if not funcs:
            raise ValueError("reward_funcs: give at least one reward function")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights: expected {len(funcs)} finite numbers, one per function, got {weights}")
        self.funcs, self.weights = list(funcs), weights
        names = [getattr(f, "__name__", type(f).__name__) for f in funcs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.last: dict[str, float] = {}

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> torch.Tensor:
        total = torch.zeros(len(completions))
        for name, f, w in zip(self.names, self.funcs, self.weights, strict=True):
            scores = check_scores(call_scorer(f, prompts, completions, columns), len(completions), f)
            self.last[name] = float(scores.mean()) if len(scores) else 0.0
            total += w * scores
        return total

    def __repr__(self) -> str:
        return "WeightedRewards(" + ", ".join(f"{w:g}·{n}" for n, w in zip(self.names, self.weights, strict=True)) + ")"


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
