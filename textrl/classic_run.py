"""A run on a classic Gymnasium env: a vector env of sub-envs, an MLP actor-critic, PPO.

Data-parallel under ``accelerate launch``/``torchrun``: process r steps sub-envs r·n … r·n + n − 1 of the
global vector env, seeded seed + i like Gymnasium's reset(seed) seeds sub-env i, and draws those sub-envs'
actions from the one-process action stream; DDP averages the gradients; metrics are gathered and the files
written once. With one minibatch per epoch the run equals the one-process run; with several, each process
shuffles its own rows into them (see :mod:`textrl.parallel.learner`).
"""

from __future__ import annotations

import difflib
import math
import os

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from textrl.agents.base import agent_class
from textrl.agents.mlp import MLPActorCritic
from textrl.checkpoint import load_checkpoint, save_checkpoint
from textrl.collector import Collector
from textrl.config import TrainConfig, from_dict
from textrl.env_state import env_state, load_env_state
from textrl.imports import env_spec
from textrl.parallel.distributed import gather_objects, make_accelerator, process_shard, rank, world_size
from textrl.parallel.learner import Learner
from textrl.rollout import Rollout
from textrl.runs import Run, RunResult, resolve_output_dir, seed_everything, torch_device
from textrl.tracking import Tracker, check_report_to, logger

__all__ = ["ClassicRun", "make_envs", "check_env_id"]


def check_env_id(env_id: str) -> None:
    """Fail early, with suggestions, if ``env_id`` is not registered with Gymnasium."""
    try:
        env_spec(env_id)
    except gym.error.Error as err:
        close = difflib.get_close_matches(env_id, list(gym.envs.registry), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"env: unknown env id {env_id!r} ({err}).{hint} Register your env with gymnasium.register(...) "
            "in a module and pass 'your_module:YourEnv-v0' so it is imported first."
        ) from None


def make_envs(cfg: TrainConfig, num_envs: int | None = None) -> gym.vector.VectorEnv:
    """A vector env of ``cfg.num_envs`` sub-envs (or ``num_envs``: a process's shard). Envs with a native
    ``vector_entry_point`` are built by it; the rest run in a sync vector env with same-step autoreset."""
    check_env_id(cfg.env)
    num_envs = num_envs or cfg.num_envs
    if env_spec(cfg.env).vector_entry_point is not None:
        return gym.make_vec(cfg.env, num_envs=num_envs, **cfg.env_kwargs)
    return gym.make_vec(cfg.env, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **cfg.env_kwargs)


class ClassicRun(Run):
    """PPO (or any agent for Box observations and Discrete actions) on a Gymnasium vector env."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool = False):
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        seed_everything(cfg.seed)
        self.cfg, self.quiet, self.history, self.returns = cfg, quiet, [], []
        self.notes: list[str] = []  # messages from before the tracker exists, shown at start()
        accelerator, world, self.rank, local = None, 1, 0, cfg.num_envs
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch / torchrun: data-parallel
            accelerator = make_accelerator(torch_device(cfg.device, auto_gpu=False))
            world, self.rank = world_size(), rank()
            if cfg.num_envs % world:
                raise ValueError(f"num_envs={cfg.num_envs} is the global number of sub-envs and must be a multiple "
                                 f"of the number of processes ({world})")
            local = cfg.num_envs // world
        self.main, self.world, self.local_envs = self.rank == 0, world, local
        check_report_to(cfg.report_to)  # a missing tracker package fails here, before any model loads
        # data-parallel: each process on its own device (cuda:LOCAL_RANK on GPUs), as accelerate assigned it
        device = torch_device(cfg.device, auto_gpu=False)  # "auto": an MLP runs faster on the CPU
        self.device = torch.device(device if accelerator is None or device == "cpu" else accelerator.device)
        self.output_dir, resume = resolve_output_dir(cfg, resume)
        self.envs = make_envs(cfg, local)
        seed_everything(cfg.seed)  # again: setting up the process group may have drawn from the global stream
        self.agent, self.learner = self._build_agent(accelerator)
        if world > 1:  # the one-process action draws: the global stream on every process, each keeping its rows
            self.agent.policy.shard = process_shard(local)
        num_steps = self.agent.config.num_steps
        self.steps_per_update = cfg.num_envs * num_steps
        self.num_updates = math.ceil(cfg.total_steps / self.steps_per_update)
        self.collector = Collector(self.envs, num_steps, device=self.device)
        if resume:
            self._resume()
        else:
            self.collector.reset(seed=cfg.seed + self.rank * local)
            self.envs.action_space.seed(cfg.seed)
        resolved = self.write_config()
        self.tracker = Tracker(self.output_dir, resolved, total=self.num_updates * self.steps_per_update,
                               initial=self.global_step, enabled=self.main, quiet=quiet, report_to=cfg.report_to,
                               postfix_keys={"env/episode_return_mean20": "return", "losses/policy": "pg_loss",
                                             "policy/approx_kl": "kl"})

    def _build_agent(self, accelerator):
        cls = agent_class(self.cfg.agent)
        agent_cfg = from_dict(cls.config_class, self.cfg.agent_config)
        cls.check_env(self.envs, agent_cfg)
        num_steps = getattr(agent_cfg, "num_steps", None)
        if num_steps is None:
            raise TypeError(f"agent: {self.cfg.agent} learns from text envs; {self.cfg.env} is a classic Gymnasium "
                            "env. Use --agent ppo")
        n = self.local_envs
        agent_cfg.check_batch(n * num_steps, f"num_envs × num_steps = {n} × {num_steps} = {n * num_steps}")
        policy = MLPActorCritic.for_env(self.envs, agent_cfg.hidden_sizes).to(self.device)
        agent = cls(agent_cfg, policy)
        return agent, Learner.for_agent(agent, accelerator, n * num_steps)

    def _resume(self) -> None:
        agent_state, state = load_checkpoint(self.output_dir, device=self.device)
        self.learner.load_state_dict(agent_state)
        self.start_update, self.global_step = state["update"], state["global_step"]
        self.returns = state.get("episode_returns", [])
        saved = (state.get("env_states") or [None] * self.world)[self.rank] if len(state.get("env_states") or []) \
            == self.world else None
        if saved is not None:  # the episodes go on where they were: the resumed run is the uninterrupted one
            load_env_state(self.collector.envs, saved["envs"])
            self.collector.load_state_dict(saved["collector"])
        else:  # an env whose state is not plain data (see env_state): fresh episodes from a derived seed
            why = state.get("env_state_note") or ("another process count saved it" if state.get("env_states")
                                                  else "the checkpoint is from an older textrl")
            self.notes.append(f"note: the env's state could not be restored ({why}): the sub-envs start fresh "
                              "episodes, so this resumed run is not the uninterrupted one")
            self.collector.reset(seed=self.cfg.seed + 7919 * self.start_update + self.rank * self.local_envs)

    def start(self) -> None:
        for note in self.notes:
            self.tracker.message(note)
        if not self.quiet:
            self.tracker.message(
                f"textrl: {self.cfg.agent} on {self.cfg.env}: {self.num_updates} updates × {self.steps_per_update} "
                f"steps -> {self.output_dir}" + (f" ({self.world} processes × {self.local_envs} sub-envs)"
                                                 if self.world > 1 else ""))

    def collect(self) -> Rollout:
        return self.collector.collect(self.agent.policy)

    def after_update(self, batch: Rollout, stats: dict[str, float], elapsed: float) -> dict[str, float]:
        out: dict[str, float] = {}
        finished = gather_objects(batch.episode_returns)  # every process's episodes, in rank order
        self.returns += finished
        if finished:
            out["env/episode_return"] = float(np.mean(finished))
            out["env/episode_length"] = float(np.mean(gather_objects(batch.episode_lengths)))
        if self.returns:
            out["env/episode_return_mean20"] = float(np.mean(self.returns[-20:]))
        out["time/steps_per_s"] = (self.global_step - self.start_update * self.steps_per_update) / elapsed
        return out

    def checkpoint(self, update: int) -> None:
        envs, why = env_state(self.collector.envs)
        mine = {"envs": envs, "collector": self.collector.state_dict()} if envs is not None else None
        states = gather_objects([mine])  # every process's sub-envs, in rank order
        if self.main:
            exact = all(s is not None for s in states)
            save_checkpoint(self.output_dir, self.learner.state_dict(), {
                "update": update, "global_step": self.global_step, "episode_returns": self.returns[-1000:],
                "env_states": states if exact else None, "env_state_note": why,
            }, keep=self.cfg.keep_checkpoints)
        self.barrier()

    def close(self) -> None:
        super().close()
        self.envs.close()

    def finish(self, stats: dict[str, float]) -> RunResult:
        result = RunResult(self.output_dir, self.global_step, self.num_updates, self.history, stats,
                           episode_returns=self.returns)
        if not self.quiet and self.main:
            logger.info(f"final: mean return of the last 20 episodes = {result.mean_return():.1f} "
                        f"({self.global_step} steps, {len(self.returns)} episodes) -> {self.output_dir}")
        return result
