"""What a training run is: the pieces built once (envs, policy, agent, learner, tracker) and the few steps
the loop (:mod:`textrl.loop`) drives. Two kinds exist: :class:`~textrl.classic_run.ClassicRun` (a Gymnasium
env with an MLP policy) and :class:`~textrl.lm.run.LMRun` (a text env with a language model);
:func:`textrl.train.make_run` picks one.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from textrl.config import TrainConfig, to_dict
from textrl.parallel.distributed import barrier, broadcast_object, is_main

__all__ = ["Run", "RunResult", "seed_everything", "default_output_dir", "resolve_output_dir", "torch_device"]


@dataclass
class RunResult:
    """What a finished run returns (classic runs fill the episode fields, text runs the held-out ones)."""

    output_dir: Path
    global_step: int
    updates: int
    history: list[dict[str, float]] = field(default_factory=list)  # every update's metrics, with global_step
    last_stats: dict[str, float] = field(default_factory=dict)
    episode_returns: list[float] = field(default_factory=list)  # classic: every finished episode, in order
    before: Any = None  # text: the held-out EvalResult before training (None when resumed)
    after: Any = None  # text: the held-out EvalResult after training

    def mean_return(self, last: int = 20) -> float:
        """Classic runs: mean return of the last ``last`` finished episodes (NaN if none finished)."""
        tail = self.episode_returns[-last:]
        return float(np.mean(tail)) if tail else float("nan")


def torch_device(name: str, auto_gpu: bool = True) -> str:
    """The torch device a ``device`` field names: "auto" is cuda where torch sees a GPU and ``auto_gpu``."""
    if name == "auto":
        return "cuda" if auto_gpu and torch.cuda.is_available() else "cpu"
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_output_dir(cfg: TrainConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{cfg.env.replace('/', '_').replace(':', '_')}__{cfg.agent}__s{cfg.seed}__{stamp}")


#: what a run writes in its directory (``overwrite`` removes these, and only these)
RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoint", "checkpoint.tmp", "checkpoint_deepspeed",
             "samples.md", "curves.png")


def resolve_output_dir(cfg: TrainConfig, resume: bool = False) -> Path:
    """The run directory: the configured one, or one named after the clock by the main process. A directory
    that holds a run already is refused unless the run is resumed, or ``cfg.overwrite`` (then the main
    process deletes that run's files first) — a second run never mixes its metrics into the first's."""
    path = Path(cfg.output_dir if cfg.output_dir is not None else broadcast_object(default_output_dir(cfg)))
    # decided by the main process (another must not look after the main one deleted the old files)
    held = broadcast_object([n for n in ("config.yaml", "metrics.jsonl", "checkpoint") if (path / n).exists()])
    if held and not resume:
        if not cfg.overwrite:
            raise ValueError(f"output_dir: {str(path)!r} holds a run already ({', '.join(held)}); continue it with "
                             f"--resume {path}, replace it with --overwrite, or choose another --output-dir")
        if not broadcast_object(is_run_dir(path)):
            raise ValueError(f"output_dir: {str(path)!r} holds {', '.join(held)} but is not a textrl run directory "
                             "(its config.yaml is not a run's): --overwrite deletes only runs; choose another --output-dir")
        if is_main():
            for target in [path / name for name in RUN_FILES] + list(path.glob("checkpoint-*")):
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        barrier()
    return path


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a textrl run: its config.yaml is a run's resolved config."""
    try:
        data = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and {"env", "agent", "agent_config", "output_dir"} <= set(data)


class Run:
    """The base of both run kinds. Subclasses build their pieces in ``__init__`` (resuming if asked) and
    implement :meth:`collect`, :meth:`update`, :meth:`after_update`, :meth:`checkpoint`, :meth:`finish`."""

    cfg: TrainConfig
    output_dir: Path
    tracker: Any
    main: bool
    agent: Any
    learner: Any
    num_updates: int
    steps_per_update: int
    start_update: int = 0
    global_step: int = 0
    quiet: bool = False
    #: data-parallel weights can be compared across processes (not under ZeRO-3, where each holds a partition)
    comparable_weights: bool = True

    def resolved_config(self) -> dict[str, Any]:
        """The config as run: the user's config with the output directory and the agent's full config."""
        config = {**to_dict(self.cfg), "output_dir": str(self.output_dir), "agent_config": to_dict(self.agent.config)}
        config.pop("overwrite", None)  # an instruction to this session, not part of the run (a rerun must not wipe it)
        return config

    def write_config(self) -> dict[str, Any]:
        resolved = self.resolved_config()
        if self.main:  # the main process writes every file of the run; the others only train
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        return resolved

    # --- what the loop calls --------------------------------------------------------------------
    def start(self) -> None:
        """Before the first update of this session (e.g. the held-out evaluation before training)."""

    def collect(self) -> Any:
        raise NotImplementedError

    def update(self, batch: Any, progress_remaining: float) -> dict[str, float]:
        return self.learner.update(self.agent, batch, progress_remaining)

    def after_update(self, batch: Any, stats: dict[str, float], elapsed: float) -> dict[str, float]:
        """Run-specific metrics of this update (episode returns, rollout statistics, throughput)."""
        raise NotImplementedError

    def log(self, stats: dict[str, float]) -> None:
        self.tracker.log(stats, self.global_step)
        self.history.append({"global_step": self.global_step, **stats})
        if stats.get("train/nan_skipped"):
            self.tracker.message(f"warning: step {self.global_step}: skipped {int(stats['train/nan_skipped'])} optimiser "
                                 "step(s) with a non-finite loss or gradient (weights kept)")

    def checkpoint(self, update: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.tracker.close()

    def finish(self, stats: dict[str, float]) -> RunResult:
        raise NotImplementedError

    def barrier(self) -> None:
        barrier()
