"""Shared test helpers: a rollout of a text env with a causal LM through the public collection API; the device
the decoder tests run on."""

import os

import torch

from textrl.lm.collect import collect_tokens
from textrl.lm.generate import HFGenerator
from textrl.rollout import TokenRollout

#: where the decoder tests put their models and tensors: TEXTRL_TEST_DEVICE, cpu by default (the GPU check sets
#: cuda, so the compiled decode step is tested against the reference loop with CUDA graphs captured)
DEVICE = torch.device(os.environ.get("TEXTRL_TEST_DEVICE", "cpu"))


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


#: metrics that differ between runs of one seed: wall-clock times, and a CUDA process's peak memory (a resumed
#: run's process holds other caches and compiled graphs than the uninterrupted one's)
UNREPRODUCIBLE = ("time/", "memory/")


def reproducible(metrics: list[dict]) -> list[dict]:
    """``metrics`` (a run's metrics.jsonl rows) without the :data:`UNREPRODUCIBLE` ones: what a resumed or
    repeated run must equal."""
    return [{k: v for k, v in m.items() if not k.startswith(UNREPRODUCIBLE)} for m in metrics]
