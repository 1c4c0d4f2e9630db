"""Shared test helpers: a rollout of a text env with a causal LM through the public collection API."""

import torch

from textrl.lm.collect import collect_tokens
from textrl.lm.generate import HFGenerator
from textrl.rollout import TokenRollout


def rollout(env, model, temperature: float = 1.0, seed: int | None = None, rng: torch.Generator | None = None,
            **sampling) -> TokenRollout:
    """``collect_tokens`` with an :class:`HFGenerator` over ``model`` (a Hugging Face causal LM)."""
    return collect_tokens(env, HFGenerator(model, temperature, rng=rng, **sampling), seed=seed)


def run_readme_snippet(marker: str, folder, monkeypatch) -> dict:
    """Execute the README's Python block under ``<!-- marker -->`` in ``folder`` (its run directories and
    saved models go there); returns its namespace."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(folder)
    namespace: dict = {"__name__": f"readme_{marker.replace('-', '_')}"}
    exec(compile(snippet, "README.md", "exec"), namespace)
    return namespace
