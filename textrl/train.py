"""``train(cfg)``: build the run the config describes and drive it with the loop.

    from textrl.config import TrainConfig
    from textrl.train import train

    result = train(TrainConfig(env="textrl/TargetToken-v0", agent="reinforce++"))

A config whose env has a policy model (``model.name``, or a ``model`` in the env's registered kwargs) is a
text run (:class:`~textrl.lm.run.LMRun`); any other Gymnasium env is a classic run
(:class:`~textrl.classic_run.ClassicRun`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from textrl.classic_run import ClassicRun, check_env_id
from textrl.config import TrainConfig
from textrl.imports import env_spec
from textrl.lm.run import LMRun
from textrl.loop import loop
from textrl.presets import with_preset
from textrl.runs import Run, RunResult

__all__ = ["train", "make_run", "is_text_env", "config_from_run_dir"]


def is_text_env(cfg: TrainConfig) -> bool:
    """A run is a text run when a policy model is given or the env's spec names a default one."""
    return cfg.model.name is not None or "model" in env_spec(cfg.env).kwargs


def make_run(cfg: TrainConfig, resume: bool = False, quiet: bool = False, model: Any = None,
             tokenizer: Any = None) -> Run:
    """Build every piece of the run ``cfg`` describes (resuming from its checkpoint with ``resume``), the
    env's preset (``experiments/presets/``) filling the fields ``cfg``'s caller did not give. Everything is
    validated before the first step. ``model`` / ``tokenizer`` (text runs): a policy model object and its
    tokenizer, used instead of loading ``cfg.model.name``."""
    check_env_id(cfg.env)
    cfg = with_preset(cfg)  # from Python as from the CLI: the env's preset under the fields the caller gave
    if is_text_env(cfg) or model is not None:
        return LMRun(cfg, resume=resume, quiet=quiet, model=model, tokenizer=tokenizer)
    if tokenizer is not None:
        raise ValueError(f"tokenizer: {cfg.env} is a classic Gymnasium env (no language model); drop tokenizer=")
    return ClassicRun(cfg, resume=resume, quiet=quiet)


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> RunResult:
    """Train ``cfg.agent`` on ``cfg.env`` for ``cfg.total_steps``; with ``resume`` continue the run in
    ``cfg.output_dir`` from its last checkpoint."""
    return loop(make_run(cfg, resume=resume, quiet=quiet))


def config_from_run_dir(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config a run saved in its directory (what ``--resume`` continues)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        from textrl.runs import LOCK_FILE

        folder = Path(run_dir)
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
            raise FileNotFoundError(
                f"resume: {str(run_dir)!r} holds no config.yaml: the run in it stopped during start-up, before "
                "writing it (nothing was trained or saved). Start it again with its original command, without "
                "--resume (the directory is reused)")
        raise FileNotFoundError(f"resume: {str(run_dir)!r} has no config.yaml; is it a textrl run directory?")
    return yaml.safe_load(path.read_text())
