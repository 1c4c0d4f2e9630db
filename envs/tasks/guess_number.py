"""``textrl/GuessNumber-v0``: a multi-turn game. The env hides a number in 1–10; the agent guesses, the env
answers "Higher." or "Lower." (as the user), for at most 4 guesses of at most 6 tokens. Reward
1 − 0.25·(guesses − 1) for finding it (1 at the first guess, 0.25 at the fourth), 0 otherwise; ``found`` and
``turns`` are reported. A reply without a number counts as a guess, costs 0.1 (a format penalty: without it
the base model, which mostly answers in words, almost never earns a reward to learn from) and is told so."""

from __future__ import annotations

import random
import re
from typing import Any, ClassVar

from textrl.envs.text_gen import TextGenEnv
from textrl.envs.turns import MultiTurnEnv, Reply

__all__ = ["GuessNumberEnv", "GuessNumberSingleEnv", "guess_number_rows"]

PROMPT = ("Let's play a game. I am thinking of a whole number from 1 to 10, and you guess it. After each guess I "
          "say if my number is higher or lower. Reply with the number only, for example: 5")


def guess_number_rows(split: str = "train", seed: int = 0, n: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "secret"}``: 200 train games, 50 held-out games (secrets drawn with ``seed``)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    return [{"prompt": PROMPT, "secret": rng.randint(1, 10)} for _ in range(n or (200 if split == "train" else 50))]


class GuessNumberEnv(MultiTurnEnv):
    metrics: ClassVar[tuple[str, ...]] = ("found",)
    success: ClassVar[str] = "found"
    default_max_turns: ClassVar[int] = 4
    default_max_new_tokens: ClassVar[int] = 80
    default_max_turn_tokens: ClassVar[int | None] = 6

    @classmethod
    def rows(cls, split: str) -> list[dict[str, Any]]:
        return guess_number_rows(split)

    def respond(self, state: dict[str, Any], reply: str) -> Reply:
        state["guesses"] = state.get("guesses", 0) + 1
        numbers = re.findall(r"-?\d+", reply)
        if not numbers:
            return Reply("Reply with a number.", reward=-0.1)
        guess, secret = int(numbers[-1]), int(state["secret"])
        if guess == secret:
            return Reply(reward=1.0 - 0.25 * (state["guesses"] - 1), done=True, metrics={"found": 1.0})
        return Reply("Higher." if guess < secret else "Lower.")


class GuessNumberSingleEnv(TextGenEnv):
    vector_env = staticmethod(GuessNumberEnv)
