"""What a training run is: the pieces built once (envs, policy, agent, learner, tracker) and the few steps
the loop (:mod:`textrl.loop`) drives. Two kinds exist: :class:`~textrl.classic_run.ClassicRun` (a Gymnasium
env with an MLP policy) and :class:`~textrl.lm.run.LMRun` (a text env with a language model);
:func:`textrl.train.make_run` picks one.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from textrl.checkpoint import CHECKPOINT_DIR, recover_checkpoint
from textrl.config import TrainConfig, to_dict
from textrl.parallel.distributed import barrier, broadcast_object, is_main
from textrl.tracking import logger

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


#: updates in a row undone for non-finite weights (see Learner.apply) after which a run stops
UNDONE_LIMIT = 3
#: the lock a training process holds on its run directory (released when it exits, however it exits)
LOCK_FILE = ".textrl.lock"
_LOCKS: dict[Path, int] = {}

#: what a run writes in its directory (``overwrite`` removes these, and only these)
RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoint", "checkpoint.tmp", "checkpoint.old", "checkpoint.corrupt",
             "checkpoint_deepspeed",
             "samples.md", "curves.png")


def resolve_output_dir(cfg: TrainConfig, resume: bool = False) -> tuple[Path, bool]:
    """The run directory (the configured one, or one named after the clock by the main process), locked by
    this process, and whether the run resumes. A directory that holds a run already is refused unless the
    run is resumed, or ``cfg.overwrite`` (then the main process deletes that run's files first) — a second
    run never mixes its metrics into the first's. A resume first recovers the checkpoint (see
    :func:`~textrl.checkpoint.recover_checkpoint`); a run that stopped before its first checkpoint starts
    again from the beginning (its logs deleted, its config kept), and says so."""
    path = Path(cfg.output_dir if cfg.output_dir is not None else broadcast_object(default_output_dir(cfg)))
    problem = None
    if is_main():  # (its refusal goes to every process, so none waits for a main process that stopped)
        try:
            lock_run_dir(path)
        except ValueError as err:
            problem = str(err)
    problem = broadcast_object(problem)
    if problem:
        raise ValueError(problem)
    # decided by the main process (another must not look after the main one deleted the old files)
    held = broadcast_object([n for n in ("config.yaml", "metrics.jsonl", "checkpoint") if (path / n).exists()])
    if resume:
        for note in broadcast_object(recover_checkpoint(path) if is_main() else None):
            logger.warning(note)
        barrier()
        check_resume_settings(cfg, path)
        if not (path / CHECKPOINT_DIR / "trainer_state.json").is_file():
            logger.warning(f"resume: {str(path)!r} holds no checkpoint (the run stopped before its first one): "
                           "the run starts again from the beginning")
            if is_main():
                _delete_run_files(path, keep=("config.yaml",))
            barrier()
            return path, False
    if held and not resume:
        if not cfg.overwrite:
            raise ValueError(f"output_dir: {str(path)!r} holds a run already ({', '.join(held)}); continue it with "
                             f"--resume {path}, replace it with --overwrite, or choose another --output-dir")
        if not broadcast_object(is_run_dir(path)):
            raise ValueError(f"output_dir: {str(path)!r} holds {', '.join(held)} but is not a textrl run directory "
                             "(its config.yaml is not a run's): --overwrite deletes only runs; choose another --output-dir")
        if is_main():
            _delete_run_files(path)
        barrier()
    return path, resume


#: settings that may differ when a run is resumed (the rest would change what the checkpoint means)
RESUME_MAY_CHANGE = ("total_steps", "checkpoint_every", "keep_checkpoints", "device", "report_to", "torch_threads",
                     "output_dir", "overwrite", "eval.generations", "eval.samples", "agent_config.learning_rate",
                     "agent_config.max_grad_norm", "agent_config.target_kl")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data and prefix.count(".") < 2:  # (sections flatten; deeper values compare whole)
        return {k: v for key, val in data.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def _opaque(value: Any) -> bool:  # an object rendered by its repr (an address differs in every session)
    return isinstance(value, str) and " at 0x" in value


def check_resume_settings(cfg: TrainConfig, path: Path) -> None:
    """Refuse, before anything loads, a resume whose settings differ from the run's ``config.yaml`` in
    anything but :data:`RESUME_MAY_CHANGE`, naming each difference."""
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return  # (no readable config: the resume says what is missing when it loads)
    if not isinstance(saved, dict):
        return
    from textrl.presets import with_preset

    given = to_dict(with_preset(cfg))  # the settings the resumed run would use (its env's preset included)
    if not given.get("agent_config"):
        given.pop("agent_config", None)  # the Python API's default: the run's own agent config
    old, new, unset = _flat(saved), _flat(given), "(unset)"
    defaults = _flat(to_dict(TrainConfig()))  # a field the run's textrl did not have yet behaved as its default
    keys = [k for k in dict.fromkeys([*new, *old]) if (k in new or not k.startswith("agent_config."))
            and not (k not in old and k in defaults and new.get(k) == defaults[k])]
    differ = [f"{key}: {old.get(key, unset)!r} (the run) -> {new.get(key, unset)!r} (given)" for key in keys
              if key not in RESUME_MAY_CHANGE and new.get(key, unset) != old.get(key, unset)
              and not (_opaque(new.get(key)) or _opaque(old.get(key)))]
    if differ:
        raise ValueError(f"resume: {len(differ)} setting(s) differ from {str(path / 'config.yaml')!r} and cannot "
                         f"change on resume: {'; '.join(differ)}. Resume with the run's values (drop those flags), or "
                         "start a new run (another --output-dir, or --overwrite). These may change on resume: "
                         + ", ".join(RESUME_MAY_CHANGE))


def _delete_run_files(path: Path, keep: tuple[str, ...] = ()) -> None:
    for target in [path / name for name in RUN_FILES if name not in keep] + list(path.glob("checkpoint-*")):
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def lock_run_dir(path: Path) -> None:
    """Take this process's exclusive lock on run directory ``path`` (an ``flock`` on its lock file: the system
    drops it when the process ends, even killed), or say which process holds it. Two runs writing one
    directory would interleave their metrics and checkpoints."""
    key = path.resolve()
    if key in _LOCKS:
        return
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir: {str(path)!r} is a file, not a directory; choose another --output-dir")
    path.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # (no flock on this platform: runs are not guarded)
        return
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"output_dir: {str(path)!r} is in use by another textrl process (pid {holder}): wait for it "
                         "to finish, or choose another --output-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[key] = fd


def unlock_run_dir(path: Path) -> None:
    """Release :func:`lock_run_dir`'s lock (a no-op when this process holds none on ``path``)."""
    fd = _LOCKS.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


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
    undone_in_a_row: int = 0  # updates undone for non-finite weights, in a row (see log)
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
        self.undone_in_a_row = self.undone_in_a_row + 1 if stats.get("train/nan_undone") else 0
        if self.undone_in_a_row:
            self.tracker.message(f"warning: step {self.global_step}: an optimiser step made weights non-finite; "
                                 "this update was undone (weights and optimiser state back to its start)")
        if self.undone_in_a_row >= UNDONE_LIMIT:
            raise FloatingPointError(
                f"{UNDONE_LIMIT} updates in a row made the weights non-finite and were undone, so the run stops "
                f"here (its last checkpoint holds finite weights). learning_rate={self.agent.config.learning_rate} "
                "is likely too high: lower it (e.g. --learning-rate 1e-5), or lower max_grad_norm, and --resume")

    def checkpoint(self, update: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.tracker.close()
        unlock_run_dir(self.output_dir)

    def finish(self, stats: dict[str, float]) -> RunResult:
        raise NotImplementedError

    def barrier(self) -> None:
        barrier()
