"""``textrl/Arithmetic-v0``: verifiable single-turn maths. The agent answers "what is a + b?" for digits a, b in
1–9 (phrased four ways); the reward is 1 when the answer is right (lenient extractor: the last number of the
answer), else 0. The strict extractor (a number after "Answer:" / "answer is") is reported beside it as
``strict_correct``. SmolLM2-135M-Instruct answers about 40% right (lenient) and under 10% strictly at
temperature 0.7: room to learn both ways. The 81 (a, b) pairs are split 61 train / 20 held out, so held-out
questions are sums the agent never trained on."""

from __future__ import annotations

import random
from typing import Any, ClassVar

from textrl.envs.text_gen import TextGenEnv
from textrl.envs.turns import MultiTurnEnv, Reply
from textrl.envs.verifiable import exact_match

__all__ = ["ArithmeticEnv", "ArithmeticSingleEnv", "arithmetic_rows"]

PHRASES = ("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?")
SUFFIX = " End with 'Answer: <number>'."


def arithmetic_rows(split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "answer"}``: every phrasing of each (a, b) pair of the split (61 train pairs, 20 held
    out, fixed by ``seed``)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    random.Random(seed).shuffle(pairs)
    chosen = pairs[20:] if split == "train" else pairs[:20]
    return [{"prompt": p.format(a=a, b=b) + SUFFIX, "answer": a + b} for a, b in chosen for p in PHRASES]


class ArithmeticEnv(MultiTurnEnv):
    """One answer per episode; reward 1 for the right sum (lenient), ``correct``/``strict_correct`` reported."""

    metrics: ClassVar[tuple[str, ...]] = ("correct", "strict_correct")
    success: ClassVar[str] = "correct"
    default_max_turns: ClassVar[int] = 1
    default_max_new_tokens: ClassVar[int] = 32

    @classmethod
    def rows(cls, split: str) -> list[dict[str, Any]]:
        return arithmetic_rows(split)

    def respond(self, state: dict[str, Any], reply: str) -> Reply:
        lenient = exact_match([reply], [state["answer"]], "lenient")[0]
        strict = exact_match([reply], [state["answer"]], "strict")[0]
        return Reply(reward=lenient, done=True, metrics={"correct": lenient, "strict_correct": strict})


class ArithmeticSingleEnv(TextGenEnv):
    """The single-env form (``gym.make("textrl/Arithmetic-v0", tokenizer=...)``)."""

    vector_env = staticmethod(ArithmeticEnv)
