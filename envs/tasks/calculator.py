"""``textrl/Calculator-v0``: tool use. The agent is asked a product of a two-digit and a one-digit number (which
SmolLM2-135M-Instruct almost never gets right unaided) and may call a calculator by writing
``<calc>EXPRESSION</calc>`` and ending its turn; the env appends the result as a ``tool`` message and the agent
goes on. A turn without a call is the final answer: reward 1 if its last number is the product, else 0.
``tool_calls``, ``tool_errors`` (an expression the calculator cannot evaluate) and ``correct`` are reported.
At most 3 turns."""

from __future__ import annotations

import ast
import operator
import random
import re
from typing import Any, ClassVar

from textrl.envs.text_gen import TextGenEnv
from textrl.envs.turns import MultiTurnEnv, Reply
from textrl.envs.verifiable import exact_match

__all__ = ["CalculatorEnv", "CalculatorSingleEnv", "calculator_rows", "calculate"]

PROMPT = ("What is {a} * {b}? You may use a calculator: write <calc>expression</calc>, for example "
          "<calc>12 * 3</calc>, and stop; I will reply with the result. Then give the final answer as "
          "'Answer: <number>'.")
_CALL = re.compile(r"<calc>(.*?)(?:</calc>|$)", re.DOTALL)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float:
    """Evaluate + − × ÷ and parentheses over numbers (no names, no calls: nothing else runs); ValueError for
    anything else or a result too large."""
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")
    text = expression.replace("×", "*").replace("x", "*").replace("÷", "/").strip()
    if len(text) > 100:
        raise ValueError("expression too long")
    try:
        result = value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ZeroDivisionError, RecursionError) as e:
        raise ValueError(str(e)) from None
    if abs(result) > 1e12:
        raise ValueError("result too large")
    return result


def calculator_rows(split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "answer"}``: 200 train and 50 held-out products a·b, a in 11–99, b in 3–9."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    pairs = [(a, b) for a in range(11, 100) for b in range(3, 10)]
    random.Random(seed).shuffle(pairs)
    chosen = pairs[50:250] if split == "train" else pairs[:50]
    return [{"prompt": PROMPT.format(a=a, b=b), "answer": a * b} for a, b in chosen]


class CalculatorEnv(MultiTurnEnv):
    metrics: ClassVar[tuple[str, ...]] = ("correct", "tool_calls", "tool_errors")
    success: ClassVar[str] = "correct"
    default_max_turns: ClassVar[int] = 3
    default_max_new_tokens: ClassVar[int] = 160
    default_max_turn_tokens: ClassVar[int | None] = 48

    @classmethod
    def rows(cls, split: str) -> list[dict[str, Any]]:
        return calculator_rows(split)

    def respond(self, state: dict[str, Any], reply: str) -> Reply:
        call = _CALL.search(reply)
        if call is None:
            correct = exact_match([reply], [state["answer"]], "lenient")[0]
            return Reply(reward=correct, done=True, metrics={"correct": correct})
        try:
            result = calculate(call.group(1))
        except ValueError as e:
            return Reply(f"error: {e}", role="tool", metrics={"tool_calls": 1, "tool_errors": 1})
        shown = int(result) if float(result).is_integer() else round(result, 6)
        return Reply(str(shown), role="tool", metrics={"tool_calls": 1})


class CalculatorSingleEnv(TextGenEnv):
    vector_env = staticmethod(CalculatorEnv)
