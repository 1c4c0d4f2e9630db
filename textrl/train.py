"""The training loop. It reads as: ``rollout = collector.collect(agent)``, ``stats = agent.update(rollout)``,
``tracker.log(stats)``, with a checkpoint every ``checkpoint_every`` updates."""

from __future__ import annotations

import difflib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml
from gymnasium.vector import AutoresetMode

from textrl.agents.base import Agent, agent_class
from textrl.checkpoint import load_checkpoint, save_checkpoint
from textrl.config import TrainConfig, from_dict, to_dict
from textrl.distributed import (
    barrier,
    broadcast_object,
    gather_objects,
    make_accelerator,
    weight_divergence,
    world_size,
)
from textrl.distributed import rank as rank_of_process
from textrl.rollout import Collector
from textrl.tracking import Tracker

__all__ = ["train", "RunResult", "make_envs", "check_env_id", "build_agent"]


@dataclass
class RunResult:
    output_dir: Path
    global_step: int
    updates: int
    episode_returns: list[float] = field(default_factory=list)  # every finished episode, in order
    last_stats: dict[str, float] = field(default_factory=dict)

    def mean_return(self, last: int = 20) -> float:
        """Mean return of the last ``last`` finished episodes (NaN if none finished)."""
        tail = self.episode_returns[-last:]
        return float(np.mean(tail)) if tail else float("nan")


def check_env_id(env_id: str) -> None:
    """Fail early, with suggestions, if ``env_id`` is not registered with Gymnasium."""
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        known = list(gym.envs.registry)
        close = difflib.get_close_matches(env_id, known, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"env: unknown env id {env_id!r} ({err}).{hint} Register your env with gymnasium.register(...) "
            "in a module and pass 'your_module:YourEnv-v0' so it is imported first."
        ) from None


def make_envs(cfg: TrainConfig, num_envs: int | None = None) -> gym.vector.VectorEnv:
    """A vector env of ``cfg.num_envs`` sub-envs (or ``num_envs``: a process's shard). Envs with a native
    ``vector_entry_point`` are built by it; the rest run in a sync vector env with same-step autoreset."""
    check_env_id(cfg.env)
    spec = gym.spec(cfg.env)
    num_envs = num_envs or cfg.num_envs
    if spec.vector_entry_point is not None:
        return gym.make_vec(cfg.env, num_envs=num_envs, **cfg.env_kwargs)
    return gym.make_vec(
        cfg.env, num_envs=num_envs, vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **cfg.env_kwargs,
    )


def build_agent(cfg: TrainConfig, envs: gym.vector.VectorEnv, accelerator: Any = None) -> Agent:
    cls = agent_class(cfg.agent)
    cls.check_env(envs)
    agent_cfg = from_dict(cls.config_class, cfg.agent_config)
    if accelerator is None:
        return cls(envs, agent_cfg, device=_device(cfg.device))
    # data-parallel: each process on its own device (cuda:LOCAL_RANK on GPUs), as accelerate assigned it
    device = "cpu" if _device(cfg.device) == "cpu" else str(accelerator.device)
    return cls(envs, agent_cfg, device=device, accelerator=accelerator)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_output_dir(cfg: TrainConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{cfg.env.replace('/', '_').replace(':', '_')}__{cfg.agent}__s{cfg.seed}__{stamp}")


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> RunResult:
    """Train ``cfg.agent`` on ``cfg.env`` for ``cfg.total_steps``; with ``resume`` continue the run in
    ``cfg.output_dir`` from its last checkpoint. Everything is validated before the first step."""
    check_env_id(cfg.env)
    from textrl.text_train import is_text_env, train_text

    if is_text_env(cfg):
        return train_text(cfg, resume=resume, quiet=quiet)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)
    accelerator, world, rank, local_envs = None, 1, 0, cfg.num_envs
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch / torchrun: data-parallel
        accelerator = make_accelerator(_device(cfg.device))
        world, rank = world_size(), rank_of_process()
        if cfg.num_envs % world:
            raise ValueError(f"num_envs={cfg.num_envs} is the global number of sub-envs and must be a multiple of "
                             f"the number of processes ({world})")
        local_envs = cfg.num_envs // world
    main = rank == 0
    if cfg.output_dir is None:
        cfg.output_dir = broadcast_object(default_output_dir(cfg))
    out = Path(cfg.output_dir)

    # Process r steps sub-envs r·n … r·n + n − 1 of the global vector env, seeded seed + i like Gymnasium's
    # reset(seed) seeds sub-env i; DDP averages the gradients; metrics are gathered, files written once.
    envs = make_envs(cfg, local_envs)
    agent = build_agent(cfg, envs, accelerator)
    if world > 1:
        seed_everything(cfg.seed + rank)  # independent action noise per process (the weights are synchronised)
    steps_per_update = cfg.num_envs * agent.config.num_steps
    num_updates = math.ceil(cfg.total_steps / steps_per_update)
    collector = Collector(envs, agent.config.num_steps, device=agent.device)

    start_update, global_step, returns = 0, 0, []
    if resume:
        agent_state, state = load_checkpoint(out, device=agent.device)
        agent.load_state_dict(agent_state)
        start_update, global_step = state["update"], state["global_step"]
        returns = state.get("episode_returns", [])
        # Env internals are not checkpointed: sub-envs restart fresh episodes from a derived seed.
        collector.reset(seed=cfg.seed + 7919 * start_update + rank * local_envs)
    else:
        collector.reset(seed=cfg.seed + rank * local_envs)
        envs.action_space.seed(cfg.seed)
    resolved = {**to_dict(cfg), "agent_config": to_dict(agent.config)}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    tracker = Tracker(out, resolved, total=num_updates * steps_per_update, initial=global_step, enabled=main,
                      postfix_keys={"env/episode_return_mean20": "return", "losses/policy": "pg_loss",
                                    "policy/approx_kl": "kl"})
    if not quiet:
        tracker.message(f"textrl: {cfg.agent} on {cfg.env}: {num_updates} updates × {steps_per_update} steps "
                        f"-> {out}" + (f" ({world} processes × {local_envs} sub-envs)" if world > 1 else ""))
    stats: dict[str, float] = {}
    start_time, start_step = time.perf_counter(), global_step
    try:
        for update in range(start_update, num_updates):
            rollout = collector.collect(agent)
            global_step += steps_per_update
            stats = agent.update(rollout, progress_remaining=1.0 - update / num_updates)
            finished = gather_objects(rollout.episode_returns)  # every process's episodes, in rank order
            returns += finished
            if finished:
                stats["env/episode_return"] = float(np.mean(finished))
                stats["env/episode_length"] = float(np.mean(gather_objects(rollout.episode_lengths)))
            if returns:
                stats["env/episode_return_mean20"] = float(np.mean(returns[-20:]))
            stats["time/steps_per_s"] = (global_step - start_step) / (time.perf_counter() - start_time)
            if world > 1:  # 0 when every process holds the same weights (DDP keeps them in step)
                stats["dist/weight_divergence"] = weight_divergence(agent.params)
            tracker.log(stats, global_step)
            if stats.get("train/nan_skipped"):
                tracker.message(f"update {update}: skipped {int(stats['train/nan_skipped'])} non-finite minibatch step(s)")
            last = update + 1 == num_updates
            if last or (cfg.checkpoint_every and (update + 1) % cfg.checkpoint_every == 0):
                if main:
                    save_checkpoint(out, agent.state_dict(), {
                        "update": update + 1, "global_step": global_step, "episode_returns": returns[-1000:],
                    })
                barrier()
    finally:
        tracker.close()
        envs.close()

    result = RunResult(out, global_step, num_updates, returns, stats)
    if not quiet and main:
        print(f"final: mean return of the last 20 episodes = {result.mean_return():.1f} "
              f"({global_step} steps, {len(returns)} episodes) -> {out}", file=sys.stderr)
    return result


def config_from_run_dir(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"resume: {str(run_dir)!r} has no config.yaml; is it a textrl run directory?")
    return yaml.safe_load(path.read_text())
