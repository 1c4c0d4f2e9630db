"""Configs are dataclasses: one for the run (:class:`TrainConfig`), one per agent.

Resolution order, later wins: dataclass defaults < the env's preset (``experiments/presets/<env>.yaml``)
< the YAML file given on the command line < ``--flags``. The resolved config is written to the run dir
as ``config.yaml`` and is what ``--resume`` reads back. Field docstrings (the string literal under a
field) become the ``--help`` text.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "TrainConfig", "coerce_field", "field_docs", "from_dict", "to_dict", "load_yaml", "preset_for", "default_config_path",
]


@dataclass
class TrainConfig:
    """One training run: which env and agent, how long, where the outputs go."""

    env: str = "CartPole-v1"
    """Gymnasium env id (built-in, textrl/…, or any id registered with gymnasium.register)."""
    agent: str = "ppo"
    """Agent name: one of textrl.agents.AGENTS (ppo …)."""
    seed: int = 1
    """Seed for torch, numpy, Python and the envs; the same seed gives the same run on CPU."""
    total_steps: int = 100_000
    """Environment steps to train for, summed over sub-envs (for text envs: generated tokens per row)."""
    num_envs: int = 8
    """Sub-environments stepped in parallel (rows of the batch)."""
    output_dir: str | None = None
    """Run directory; default runs/<env>__<agent>__s<seed>__<time>."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many updates (and at the end); 0 saves only at the end."""
    device: str = "cpu"
    """torch device for the agent ("cpu", "cuda", "cuda:1", "auto" = cuda if available)."""
    torch_threads: int | None = None
    """torch.set_num_threads for this run; null keeps torch's default."""
    # --- text envs (ignored by classic envs) ---
    model: str | None = None
    """Text envs: policy model (HF name or path, or the offline "smollm2-135m-instruct"); default: the env's."""
    lora_r: int = 0
    """Text envs: LoRA rank (0 = train the full model). With LoRA the reference is the policy with adapters off."""
    lora_alpha: float = 32.0
    """Text envs: LoRA alpha (scale = alpha / r)."""
    lora_targets: tuple[str, ...] = ()
    """Text envs: module names to adapt; empty = peft's default for the architecture."""
    reference_pass: str = "sequence"
    """Text envs: how the reference's log-probs are computed: "sequence" = one parallel forward after each
    rollout (cheaper); "per_token" = stepping with the env in its own KV cache. The batches are equal."""
    reward_model: str | None = None
    """Text envs: score completions with a reward model saved by `textrl train-rm` (its directory), replacing
    the env's own scorer; its stored gain and bias apply."""
    value_model: str = "head"
    """Text envs: where V(s) comes from. "head" = a scalar head on the policy's trunk (one model copy);
    "policy" = a separate critic initialised from the policy's base weights (fully trained, one more copy);
    any other value = a model name or path (e.g. a trained reward model) to initialise the critic from —
    it must use the policy's tokenizer."""
    quantization: str | None = None
    """Text envs: load the frozen base weights in "8bit" or "4bit" (nf4) with bitsandbytes (QLoRA: needs lora_r > 0)."""
    temperature: float = 1.0
    """Text envs: sampling temperature; every log-prob (policy and reference) is of logits / temperature."""
    top_k: int = 0
    """Text envs: sample from the k most likely tokens only (0 = off)."""
    top_p: float = 1.0
    """Text envs: nucleus sampling threshold (1 = off)."""
    kl_coef: float = 0.05
    """Text envs: β of the per-token penalty −β·(log π − log π_ref) (the initial β if kl_target is set)."""
    kl_target: float | None = None
    """Text envs: target KL per completion for the adaptive controller (Ziegler et al. 2019); null = fixed β."""
    kl_horizon: int = 10_000
    """Text envs: adaptive controller horizon, in completions."""
    kl_estimator: str = "k1"
    """Text envs: per-token KL estimator in the reward: k1, k2 or k3."""
    bf16: bool = False
    """Text envs: bf16 autocast for the PPO update (about 2x faster on CPUs with avx512_bf16/AMX; rollouts stay
    fp32). Off by default: in bf16 a small LoRA update is rounded away inside an update, so the PPO ratio stays
    1, clipping never acts and the policy drifts across updates (seen on SmolLM2 + LoRA r16)."""
    eval_generations: int = 1
    """Text envs: answers sampled per held-out prompt at evaluation; a prompt's score is their mean (more
    answers shrink the sampling noise of the before/after comparison)."""
    eval_samples: int = 4
    """Text envs: held-out prompts quoted in samples.md (before and after training)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to gymnasium.make_vec for the env."""
    agent_config: dict[str, Any] = field(default_factory=dict)
    """Fields of the agent's config dataclass (in YAML also accepted under a key named after the agent)."""

    def __post_init__(self) -> None:
        for name in ("total_steps", "num_envs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; e.g. --{_flag(name)} 100000")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if not isinstance(self.eval_generations, int) or self.eval_generations < 1:
            raise ValueError(f"eval_generations must be an integer >= 1, got {self.eval_generations!r}")
        if self.reference_pass not in ("sequence", "per_token"):
            raise ValueError(f"reference_pass must be 'sequence' or 'per_token', got {self.reference_pass!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"quantization must be null, '8bit' or '4bit', got {self.quantization!r}")
        if self.quantization and self.lora_r <= 0:
            raise ValueError(f"quantization={self.quantization!r} freezes the base weights, so the policy needs LoRA "
                             f"adapters to train: set lora_r > 0 (e.g. --lora-r 16), got lora_r={self.lora_r}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 = no LoRA), got {self.lora_r!r}")
        if self.torch_threads is not None and self.torch_threads <= 0:
            raise ValueError(f"torch_threads must be > 0 or null, got {self.torch_threads!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of a field annotation such as ``float | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def coerce_field(cls: type, name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the field."""
    hints = typing.get_type_hints(cls)
    tp, optional = _base_type(hints[name])
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ValueError(f"{name}: null is not allowed; expected {tp}")
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if typing.get_origin(tp) is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            inner = typing.get_args(tp)[0]
            return tuple(inner(v) for v in value)
        if typing.get_origin(tp) is dict or tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the list of known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**{k: coerce_field(cls, k, v) for k, v in data.items()})


def to_dict(obj: Any) -> dict[str, Any]:
    out = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {str(path)!r}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def _experiments() -> Any:
    return resources.files("textrl.experiments")


def default_config_path() -> Path:
    """The embedded default experiment that ``textrl train`` runs with no arguments."""
    return Path(str(_experiments().joinpath("default.yaml")))


def preset_for(env_id: str) -> dict[str, Any]:
    """The tuned preset for an env id, if ``experiments/presets/<id>.yaml`` exists; else ``{}``."""
    name = env_id.replace("/", "__") + ".yaml"
    preset = _experiments().joinpath("presets").joinpath(name)
    return yaml.safe_load(preset.read_text()) if preset.is_file() else {}
