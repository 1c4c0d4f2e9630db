"""The Python API: :class:`Trainer` (a language model, reward functions and a prompt dataset, as in TRL) and
:class:`PPO` (a classic Gymnasium env, as in Stable-Baselines3).

    trainer = Trainer("HuggingFaceTB/SmolLM2-135M-Instruct", reward_funcs=[is_correct, brevity],
                      reward_weights=[1.0, 0.1], train_dataset=ds, eval_dataset=held_out,
                      args=TrainConfig(agent="grpo", total_steps=50_000, model={"lora_r": 16}))
    result = trainer.train()          # RunResult: held-out reward before -> after, metrics, run directory
    trainer.evaluate()                # EvalResult on the eval dataset, with the current weights
    trainer.save_pretrained("out")    # Hugging Face layout (a peft adapter with LoRA; merged=True: full model)

    model = PPO("CartPole-v1").learn(30_000)
    action, _ = model.predict(obs, deterministic=True)

Both build the same :class:`~textrl.config.TrainConfig` the CLI builds (the env's preset fills the fields
not given) and run it through :func:`textrl.train.make_run` and :func:`textrl.loop.loop`, as ``textrl
train`` does. Objects a config file cannot hold — a model object, a tokenizer, reward functions, datasets —
are passed to the run as they are and recorded in ``config.yaml`` by import path or repr.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textrl.config import ModelConfig, TrainConfig, from_dict, given_fields, to_dict
from textrl.loop import loop
from textrl.runs import Run, RunResult

__all__ = ["Trainer", "PPO", "reward_scorer"]

TEXT_ENV = "textrl/TextGen-v0"


def _config(args: TrainConfig | dict | None) -> TrainConfig:
    if args is None:
        return TrainConfig()
    if isinstance(args, dict):
        return from_dict(TrainConfig, args)
    if not isinstance(args, TrainConfig):
        raise TypeError(f"args: expected a TrainConfig or a mapping of its fields, got {type(args).__name__}")
    return args


def _extend(cfg: TrainConfig, model: dict[str, Any] | None = None, **changes: Any) -> TrainConfig:
    """``cfg`` with ``changes`` (and ``model`` section fields) given on top of the fields its caller gave —
    the others stay free for the env's preset (``dataclasses.replace`` would give them all)."""
    fields = {name: getattr(cfg, name) for name in given_fields(cfg)}
    if model:
        section = cfg.model
        fields["model"] = ModelConfig(**{**{k: getattr(section, k) for k in given_fields(section)}, **model})
    return TrainConfig(**{**fields, **changes})


def reward_scorer(reward_funcs: Any, weights: Sequence[float] | None = None) -> Any:
    """One scorer from ``reward_funcs``: a function ``(prompts, completions, **columns) -> scores`` (TRL's
    ``(completions, **kwargs)`` form too), a reward model (a Hugging Face sequence classifier's name or path, a
    ``textrl train-rm`` directory, or a ``(model, tokenizer)`` pair — loaded by the run, on its device), or a
    list of these summed with ``weights`` (:class:`~textrl.envs.scorers.WeightedRewards`)."""
    from textrl.envs.scorers import WeightedRewards, is_model_pair

    single = not isinstance(reward_funcs, (list, tuple)) or is_model_pair(reward_funcs)
    funcs = [reward_funcs] if single else list(reward_funcs)
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"reward_weights: {len(weights)} weights for {len(funcs)} reward functions; give one per "
                         "function (or none: all 1)")
    if len(funcs) == 1 and weights is None and callable(funcs[0]) and not isinstance(funcs[0], torch.nn.Module):
        return funcs[0]
    return WeightedRewards(funcs, weights)


class Trainer:
    """Train a policy with any registered agent, from Python.

    Args:
        model: the policy: a Hugging Face causal LM object, a hub id or a local path (default: the env's own
            model, e.g. ``textrl/TargetToken-v0``'s tiny one). A model object is trained in place.
        reward_funcs: see :func:`reward_scorer`; functions also receive the dataset's other columns as
            keyword arguments (those they name, or all with ``**kwargs``) — the answer of a verifiable task.
            Default: the env's own scorer.
        train_dataset: prompts — a list of strings, a ``datasets.Dataset`` (or list of dicts) with a
            ``prompt`` column, or a ``.txt``/``.jsonl`` file.
        eval_dataset: held-out prompts in the same forms, evaluated before and after training.
        args: a :class:`~textrl.config.TrainConfig` or a mapping of its fields (flat CLI names accepted).
        agent, env: override ``args.agent`` / ``args.env``; ``env`` defaults to ``textrl/TextGen-v0`` when
            a model or a dataset is given.
        tokenizer: the model's tokenizer (needed with a model object whose ``name_or_path`` has none).
        reward_weights: one weight per reward function (default 1 each).
        quiet: only warnings on stderr (metrics still go to TensorBoard and ``metrics.jsonl``).
    """

    def __init__(self, model: Any = None, reward_funcs: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, *, args: TrainConfig | dict | None = None, agent: str | None = None,
                 env: str | None = None, tokenizer: Any = None, reward_weights: Sequence[float] | None = None,
                 quiet: bool = False):
        cfg = _config(args)
        self.model_object = model if isinstance(model, torch.nn.Module) else None
        self.tokenizer_object, self.quiet = tokenizer, quiet
        if model is not None and self.model_object is None and not isinstance(model, (str, Path)):
            raise TypeError(f"model: expected a model object, a hub id or a path, got {type(model).__name__}")
        changes: dict[str, Any] = {}
        if agent is not None:
            changes["agent"] = agent
        texty = any(x is not None for x in (model, reward_funcs, train_dataset, eval_dataset))
        if env is not None or texty and "env" not in given_fields(cfg):  # any text argument: the generic text env
            changes["env"] = env or TEXT_ENV
        env_kwargs = dict(cfg.env_kwargs)
        if train_dataset is not None:
            env_kwargs["prompts"] = train_dataset
        if eval_dataset is not None:
            env_kwargs["eval_prompts"] = eval_dataset
        model_fields = {"name": self._model_name(model)} if model is not None else {}
        if reward_funcs is not None:
            if cfg.model.reward_model is not None:
                raise ValueError(f"reward_funcs: given with args.model.reward_model={cfg.model.reward_model!r}, which "
                                 "would replace them; give the reward model in reward_funcs, or drop reward_funcs")
            if isinstance(reward_funcs, (str, Path)) and reward_weights is None:  # one model: recorded, resumable
                model_fields["reward_model"] = str(reward_funcs)
            else:
                env_kwargs["scorer"] = reward_scorer(reward_funcs, reward_weights)
        elif reward_weights is not None:
            raise ValueError("reward_weights: given without reward_funcs; pass the functions they weigh")
        if env_kwargs != cfg.env_kwargs:
            changes["env_kwargs"] = env_kwargs
        self.config = _extend(cfg, model=model_fields, **changes)
        self.run: Run | None = None
        self.resumed: bool | None = None
        self.result: RunResult | None = None

    def _model_name(self, model: Any) -> str:
        if self.model_object is None:
            return str(model)
        name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
        if self.tokenizer_object is None and not name:
            raise ValueError(f"tokenizer: the model object ({type(model).__name__}) names no saved model to load its "
                             "tokenizer from; pass tokenizer=")
        return name or f"<{type(model).__name__} object>"

    def build(self, resume: bool | None = None) -> Run:
        """Build the run (policy, reference, envs, agent, learner) once; :meth:`train` and :meth:`evaluate`
        use it. ``resume``: continue the run in ``args.output_dir`` from its last checkpoint (None: as built
        already, else False)."""
        if self.run is None:
            from textrl.train import make_run

            self.run = make_run(self.config, resume=bool(resume), quiet=self.quiet, model=self.model_object,
                                tokenizer=self.tokenizer_object)
            self.resumed = bool(resume)
        elif resume is not None and resume != self.resumed:
            raise RuntimeError(f"build: the run was built with resume={self.resumed} (by an earlier evaluate(), policy "
                               f"or build() call); call train(resume={self.resumed}), or make a new Trainer")
        return self.run

    def train(self, resume: bool = False) -> RunResult:
        """Train for ``args.total_steps``; returns the run's result (held-out before/after for text runs)."""
        if self.result is not None:
            raise RuntimeError("train: this Trainer has trained already; to train longer, make a new Trainer with a "
                               "larger total_steps and the same output_dir, and call train(resume=True)")
        self.result = loop(self.build(resume))
        return self.result

    @property
    def policy(self) -> torch.nn.Module:
        """The policy being trained (an ``LMActorCritic`` for text runs, an ``MLPActorCritic`` for classic ones)."""
        return self.build().agent.policy

    def evaluate(self, eval_dataset: Any = None) -> Any:
        """The held-out evaluation with the current weights: ``eval_dataset`` (default: the trainer's) answered
        ``args.eval.generations`` times per prompt; an :class:`~textrl.lm.evaluate.EvalResult` (mean ± SE, KL)."""
        from textrl.envs.prompts import load_prompt_records, prompt_rows
        from textrl.lm.evaluate import evaluate_heldout

        run = self.build()
        if not hasattr(run, "heldout"):
            raise TypeError(f"evaluate: {self.config.env} is a classic env; evaluate is for text runs")
        if eval_dataset is None:
            if not run.base.eval_prompts:
                raise ValueError("evaluate: no eval_dataset (give one here or to the Trainer)")
            return run.heldout()
        cfg = run.cfg
        with run.learner.full_weights():
            return evaluate_heldout(run.base, run.policy.lm, run.reference,
                                    prompt_rows(*load_prompt_records(eval_dataset)),
                                    sampling=cfg.sampling, kl=cfg.kl, generations=cfg.eval.generations,
                                    samples=cfg.eval.samples, seed=cfg.seed)

    def save_pretrained(self, path: str | Path, merged: bool = False) -> Path:
        """The policy and its tokenizer in Hugging Face layout: the peft adapter with LoRA (``merged=True``: a
        full model with the adapters merged in, loadable with ``AutoModelForCausalLM``), else the model."""
        from textrl.lm.models import quiet_saving
        from textrl.parallel.distributed import barrier, is_main

        run, path = self.build(), Path(path)
        with run.learner.full_weights():  # whole weights (ZeRO-3 gathers its partitions), written once
            if is_main():
                lm = run.policy.lm
                if merged and run.policy.is_lora:
                    lm = copy.deepcopy(lm).merge_and_unload()  # a copy: the run's reference is the adapters-off model
                with quiet_saving():
                    lm.save_pretrained(path, safe_serialization=True)
                run.tokenizer.save_pretrained(path)
            barrier()
        return path


class PPO:
    """PPO on a classic Gymnasium env, as Stable-Baselines3 users know it.

        model = PPO("CartPole-v1", seed=1).learn(30_000)
        action, _ = model.predict(obs, deterministic=True)
        model.save("cartpole"); model = PPO.load("cartpole")

    ``env``: a registered id (``"module:Id"`` imports the module first); ``agent_config``: fields of
    :class:`textrl.agents.ppo.PPOConfig` (``learning_rate``, ``num_steps`` …); the env's preset fills the
    rest, as with ``textrl train --env ID``. ``learn`` may be called again: it continues from the last
    checkpoint. (``textrl.agents.ppo.PPO`` is the agent itself — the maths of an update — that this drives.)
    """

    agent = "ppo"

    def __init__(self, env: str, *, seed: int = 1, num_envs: int | None = None, device: str = "auto",
                 output_dir: str | None = None, verbose: int = 0, **agent_config: Any):
        if not isinstance(env, str):
            raise TypeError(f"env: expected a registered Gymnasium id (register your env with gymnasium.register), "
                            f"got {type(env).__name__}")
        fields: dict[str, Any] = dict(env=env, agent=self.agent, seed=seed, device=device)
        if num_envs is not None:
            fields["num_envs"] = num_envs
        if output_dir is not None:
            fields["output_dir"] = output_dir
        if agent_config:
            fields["agent_config"] = agent_config
        self.fields, self.verbose = fields, verbose
        self.policy: torch.nn.Module | None = None
        self.num_timesteps, self.result, self._run_steps = 0, None, -1  # _run_steps: the run directory's step count

    def learn(self, total_timesteps: int) -> PPO:
        """Train ``total_timesteps`` more env steps (summed over sub-envs); returns ``self``."""
        from textrl.classic_run import check_env_id
        from textrl.train import is_text_env, make_run

        if not isinstance(total_timesteps, int) or isinstance(total_timesteps, bool) or total_timesteps <= 0:
            raise ValueError(f"total_timesteps must be a positive integer, got {total_timesteps!r}; e.g. learn(30_000)")
        cfg = TrainConfig(**self.fields, total_steps=self.num_timesteps + total_timesteps)
        check_env_id(cfg.env)
        if is_text_env(cfg):
            raise TypeError(f"env: {cfg.env} is a text env; train language models with textrl.Trainer")
        resume = self._checkpoint_matches()
        if self.policy is not None and not resume:  # loaded weights whose run went on or is gone: a new run
            cfg = TrainConfig(**{**self.fields, "output_dir": None}, total_steps=total_timesteps)
        run = make_run(cfg, resume=resume, quiet=self.verbose == 0)
        if self.policy is not None and not resume:
            run.agent.policy.load_state_dict(self.policy.state_dict())  # (the new run's own count starts at 0)
        self.fields["output_dir"] = str(Path(run.output_dir).resolve())  # a later learn() resumes from its checkpoint
        self.result = loop(run)
        steps = run.global_step if resume or self.policy is None else self.num_timesteps + run.global_step
        self.policy, self.num_timesteps = run.agent.policy.eval(), steps
        self._run_steps = run.global_step
        return self

    def _checkpoint_matches(self) -> bool:
        """Whether ``learn`` continues the run in ``output_dir``: its checkpoint is where this model is."""
        out = self.fields.get("output_dir")
        state = Path(out) / "checkpoint" / "trainer_state.json" if out else None
        if state is None or not state.is_file() or self.policy is None:
            return False
        return json.loads(state.read_text()).get("global_step") == self._run_steps

    @torch.no_grad()
    def predict(self, observation: Any, deterministic: bool = False) -> tuple[np.ndarray, None]:
        """Actions for one observation or a batch (numpy), and ``None`` (no recurrent state), as in SB3."""
        if self.policy is None:
            raise RuntimeError("predict: the model has not learned yet; call learn(n) or PPO.load(path) first")
        device = next(self.policy.parameters()).device
        obs = torch.as_tensor(np.asarray(observation), dtype=torch.float32, device=device)
        single = obs.dim() == 1
        logits, _ = self.policy(obs.reshape(1, -1) if single else obs.reshape(obs.shape[0], -1))
        actions = logits.argmax(-1) if deterministic else torch.distributions.Categorical(logits=logits).sample()
        out = actions.cpu().numpy()
        return (out[0] if single else out), None

    def save(self, path: str | Path) -> Path:
        """The policy's weights (``model.safetensors``) and what rebuilds it (``textrl_ppo.json``) in ``path``."""
        from safetensors.torch import save_file

        if self.policy is None:
            raise RuntimeError("save: nothing to save; call learn(n) first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.policy.state_dict().items()},
                  str(path / "model.safetensors"))
        meta = {"fields": to_dict(self.fields), "num_timesteps": self.num_timesteps, "run_steps": self._run_steps,
                **self.policy.shape_info()}
        (path / "textrl_ppo.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PPO:
        """A model saved by :meth:`save`, ready to ``predict`` (``learn`` continues in its run directory)."""
        from safetensors.torch import load_file

        from textrl.agents.mlp import MLPActorCritic

        path = Path(path)
        if not (path / "textrl_ppo.json").is_file():
            raise FileNotFoundError(f"load: {str(path)!r} holds no textrl_ppo.json; is it a folder PPO.save wrote?")
        meta = json.loads((path / "textrl_ppo.json").read_text())
        fields = meta["fields"]
        model = cls(**{k: v for k, v in fields.items() if k not in ("agent", "agent_config")},
                    **fields.get("agent_config", {}))
        model.policy = MLPActorCritic(meta["obs_dim"], meta["n_actions"], tuple(meta["hidden_sizes"]))
        model.policy.load_state_dict(load_file(str(path / "model.safetensors")))
        model.policy.eval()
        model.num_timesteps = meta["num_timesteps"]
        model._run_steps = meta.get("run_steps", -1)  # learn() continues that run if its checkpoint is still here
        return model

