"""``textrl eval``: a base or trained policy on a text env's held-out prompts, with the code of ``textrl train``'s
held-out line (:func:`~textrl.lm.evaluate.evaluate_heldout`).

Reports the mean reward ± SE over prompts, accuracy and pass@k for a verifiable env (its ``success`` count),
the env's per-episode counts (turns, tool calls, …) and the KL to the base model; prints a table and writes
``eval.json`` and ``samples.md`` to the output folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
import yaml

from textrl.config import KLConfig, SamplingConfig, TrainConfig, from_dict
from textrl.envs.prompts import load_prompt_records, prompt_rows
from textrl.envs.text_gen import TextGenVectorEnv
from textrl.imports import env_spec
from textrl.lm.build import builds, context_length_of, vocab_size_of
from textrl.lm.evaluate import EvalResult, evaluate_heldout
from textrl.lm.models import check_model_source, disable_dropout, load_causal_lm, load_tokenizer
from textrl.lm.policy import AdaptersOff
from textrl.validate import finite_number, non_negative_int

__all__ = ["EvalConfig", "run_eval", "result_table"]

logger = logging.getLogger("textrl")


@dataclass
class EvalConfig:
    """What ``textrl eval`` evaluates and how."""

    env: str | None = None
    """Env id (default: the run's env with --run). Its held-out prompts (or training prompts) are answered."""
    model: str | None = None
    """Model name or path (default: the env's model). Leave out with --run."""
    run: str | None = None
    """A textrl train run folder: evaluates its latest checkpoint's policy with the run's env and sampling."""
    num_samples: int = 4
    """Answers per prompt (pass@k up to this k)."""
    split: str = "eval"
    """"eval" (the env's held-out prompts) or "train" (its training prompts)."""
    max_prompts: int | None = None
    """Evaluate the first N prompts of the split only."""
    output_dir: str | None = None
    """Where eval.json and samples.md go (default: RUN/eval with --run, else runs/eval)."""
    temperature: float | None = None
    """Sampling temperature (default: the run's, else 0.7)."""
    seed: int = 0
    """Seed of the sampling stream."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", "cuda:N"."""
    samples: int = 8
    """Prompts quoted in samples.md (their first answer)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the env (e.g. max_new_tokens)."""

    def __post_init__(self) -> None:
        if self.run is None and self.env is None:
            raise ValueError("env: give --env ID (a registered text env), or --run RUN_DIR to evaluate a trained run")
        if self.run is not None and self.model is not None:
            raise ValueError(f"model: --run {self.run} evaluates the run's own policy; drop --model {self.model} "
                             "(or drop --run to evaluate a model by name)")
        if self.split not in ("eval", "train"):
            raise ValueError(f"split must be 'eval' or 'train', got {self.split!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        if self.max_prompts is not None and (not isinstance(self.max_prompts, int) or self.max_prompts < 1):
            raise ValueError(f"max_prompts must be a positive integer or null, got {self.max_prompts!r}")
        if self.temperature is not None:
            finite_number("temperature", self.temperature, minimum=0)
        non_negative_int("samples", self.samples)


def _run_config(run: str) -> TrainConfig:
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"run: {run} has no config.yaml; give the folder a `textrl train` run wrote")
    if not (Path(run) / "checkpoint" / "policy").is_dir():
        raise FileNotFoundError(f"run: {run} has no checkpoint/policy yet (it saves one every checkpoint_every "
                                "updates and at the end); evaluate a run that has saved one")
    return from_dict(TrainConfig, yaml.safe_load(path.read_text()))


def _load_policy(cfg: EvalConfig, train: TrainConfig | None, name: str, device: torch.device) -> tuple[Any, Any]:
    """``(policy LM, reference)``: the base model for both (KL 0), or a run's checkpoint with the base model (LoRA:
    the adapters off; a full model: the base loaded beside it) as the reference."""
    base = disable_dropout(load_causal_lm(name)).to(device).eval()
    if train is None:
        return base, base
    saved = Path(cfg.run) / "checkpoint" / "policy"
    if (saved / "adapter_config.json").is_file():
        from peft import PeftModel

        lm = PeftModel.from_pretrained(base, str(saved)).to(device).eval()
        return lm, AdaptersOff(lm)
    return disable_dropout(load_causal_lm(str(saved))).to(device).eval(), base


def run_eval(cfg: EvalConfig, quiet: bool = False) -> tuple[EvalResult, Path]:
    """Evaluate (see the module docstring); returns the result and the output folder."""
    from textrl.lm.run import torch_device

    train = _run_config(cfg.run) if cfg.run is not None else None
    env_id = cfg.env or train.env
    spec = env_spec(env_id)  # an unknown id fails here, before any model loads
    name = cfg.model or (train.model.name if train is not None and train.model.name else None) \
        or (spec.kwargs or {}).get("model")
    if name is None:
        raise ValueError(f"model: env {env_id} names no default model; give --model NAME_OR_PATH")
    check_model_source("model", name)
    device = torch.device(torch_device(cfg.device))
    env_kwargs = {**(dict(train.env_kwargs) if train is not None and env_id == train.env else {}), **cfg.env_kwargs}
    tokenizer = load_tokenizer(name)
    policy, reference = _load_policy(cfg, train, name, device)
    if builds(env_id, TextGenVectorEnv):  # prompts + response must fit the model's context
        env_kwargs.setdefault("context_length", context_length_of(getattr(policy, "config", None)))
    env = gym.make_vec(env_id, num_envs=1, tokenizer=tokenizer, device=device, **env_kwargs).unwrapped
    if not isinstance(env, TextGenVectorEnv):
        raise TypeError(f"env: {env_id} is not a textrl text env (got {type(env).__name__})")
    vocab = vocab_size_of(policy)
    if vocab:  # (a model with more logits than tokens, Qwen2's: the ids between are actions too)
        env.fit_vocabulary(vocab)
    prompts = env.eval_prompts if cfg.split == "eval" else prompt_rows(env.prompts, env.columns)
    if not prompts:
        raise ValueError(f"split: env {env_id} has no {cfg.split} prompts; use --split train or give eval_prompts")
    prompts = list(prompts)[:cfg.max_prompts] if cfg.max_prompts else list(prompts)
    load_prompt_records(prompts)  # (a malformed row fails here)
    temperature = cfg.temperature or (train.sampling.temperature if train is not None else 0.7)
    sampling = SamplingConfig(temperature=temperature)
    kl = KLConfig(reference_pass="sequence")
    result = evaluate_heldout(env, policy, reference, prompts, sampling=sampling, kl=kl, generations=cfg.num_samples,
                              samples=cfg.samples, seed=cfg.seed, progress=not quiet)
    out = Path(cfg.output_dir or (Path(cfg.run) / "eval" if cfg.run else Path("runs") / "eval"))
    out.mkdir(parents=True, exist_ok=True)
    report = {"env": env_id, "model": name, "run": cfg.run, "split": cfg.split, "prompts": len(prompts),
              "num_samples": cfg.num_samples, "temperature": temperature, "seed": cfg.seed,
              "reward_mean": result.mean, "reward_se": result.se, "accuracy": result.accuracy,
              "accuracy_se": result.accuracy_se if result.accuracy is not None else None,
              "pass_at_k": {str(k): v for k, v in result.pass_at.items()}, "kl_to_base": result.kl,
              "episode": result.stats, "per_prompt_reward": result.scores, "per_prompt_success": result.successes,
              "config": asdict(cfg)}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    lines = [f"# {env_id}: {name}{' (run ' + cfg.run + ')' if cfg.run else ''}\n", "```\n" + result_table(result) + "\n```\n"]
    for prompt, answer in result.samples:
        lines += [f"## Prompt\n\n{prompt.strip()}\n", f"**Answer:** {answer.strip()}\n"]
    (out / "samples.md").write_text("\n".join(lines), encoding="utf-8")
    if not quiet:
        logger.info(result_table(result))
        logger.info(f"wrote {out / 'eval.json'} and {out / 'samples.md'}")
    return result, out


def result_table(result: EvalResult) -> str:
    """The evaluation as an aligned two-column table."""
    rows = [("reward", f"{result.mean:.4f} ± {result.se:.4f}")]
    if result.accuracy is not None:
        rows.append(("accuracy", f"{result.accuracy:.3f} ± {result.accuracy_se:.3f}"))
        rows += [(f"pass@{k}", f"{v:.3f}") for k, v in result.pass_at.items()]
    rows += [(f"mean {k}", f"{v:.3f}") for k, v in result.stats.items()]
    rows.append(("KL to base", f"{result.kl:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
