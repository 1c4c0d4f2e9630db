"""Configs are dataclasses: one for the run (:class:`TrainConfig`, with its text-only fields in sections by
concern — :class:`ModelConfig`, :class:`SamplingConfig`, :class:`KLConfig`, :class:`EvalConfig`) and one per
agent.

Resolution order, later wins: dataclass defaults < the env's preset (``experiments/presets/<env>.yaml``)
< the YAML file given on the command line < ``--flags``. The resolved config is written to the run dir
as ``config.yaml`` and is what ``--resume`` reads back. Field docstrings (the string literal under a
field) become the ``--help`` text.

In YAML a section is a mapping (``kl: {coef: 0.1}``); each section field also has a flat name, which is its
command-line flag and is accepted in YAML and by :func:`from_dict` too (``kl_coef: 0.1``, the layout of
configs written before the sections existed): :data:`FLAT_KEYS` maps one to the other. In Python, build
``TrainConfig(kl=KLConfig(coef=0.1))`` or ``TrainConfig(kl={"coef": 0.1})``; the flat names are not
``TrainConfig`` arguments.
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
from typing import Any, ClassVar

import yaml

from textrl.validate import (
    device_name,
    finite_number,
    non_negative_int,
    one_of,
    optional_positive,
    positive_int,
)

__all__ = [
    "TrainConfig", "ModelConfig", "SamplingConfig", "KLConfig", "EvalConfig", "SECTIONS", "FLAT_KEYS",
    "nest_run_fields", "section_flat", "given_fields", "field_type", "coerce_field", "field_docs", "from_dict", "to_dict", "load_yaml", "preset_for",
    "default_config_path",
]


def records_given(cls: type) -> type:
    """Record, on each instance, which fields its caller gave (``given_fields``): an env's preset fills the
    others when a config built in Python is trained (:func:`textrl.presets.with_preset`), as the CLI does.
    Recorded in ``__new__``, which subclasses inherit; ``dataclasses.replace`` gives every field."""

    def __new__(klass: type, *args: Any, **kwargs: Any) -> Any:
        obj = object.__new__(klass)
        names = [f.name for f in dataclasses.fields(klass) if f.init]
        object.__setattr__(obj, "_given", frozenset(names[:len(args)]) | frozenset(kwargs))
        return obj

    cls.__new__ = __new__
    return cls


def given_fields(config: Any) -> frozenset[str]:
    """The fields the caller of ``config``'s constructor gave (all of them for an object built otherwise)."""
    return getattr(config, "_given", frozenset(f.name for f in dataclasses.fields(config)))


@records_given
@dataclass
class ModelConfig:
    """Text runs: the policy model and the other models of RLHF."""

    name: str | None = None
    """Policy model (HF name or path, or the offline "smollm2-135m-instruct"); null = the env's default."""
    lora_r: int = 0
    """LoRA rank (0 = train the full model). With LoRA the reference is the policy with adapters off."""
    lora_alpha: float = 32.0
    """LoRA alpha (scale = alpha / r)."""
    lora_targets: tuple[str, ...] = ()
    """Module names to adapt; empty = peft's default for the architecture."""
    quantization: str | None = None
    """Load the frozen base weights in "8bit" or "4bit" (nf4) with bitsandbytes (QLoRA: needs lora_r > 0)."""
    value_model: str = "head"
    """Where V(s) comes from (agents with a critic). "head" = a scalar head on the policy's trunk (one model
    copy); "policy" = a separate critic initialised from the policy's base weights (fully trained, one more
    copy); any other value = a model name or path (e.g. a trained reward model) to initialise the critic
    from — it must use the policy's tokenizer."""
    reward_model: str | None = None
    """Score completions with a reward model, replacing the env's own scorer: a `textrl train-rm` directory
    (its stored gain and bias apply) or any Hugging Face sequence classifier, name or path (its first logit)."""
    bf16: bool = False
    """bf16 autocast for the update (about 2x faster on CPUs with avx512_bf16/AMX; rollouts stay fp32). Off by
    default: in bf16 a small LoRA update is rounded away inside an update, so the PPO ratio stays 1, clipping
    never acts and the policy drifts across updates (seen on SmolLM2 + LoRA r16)."""

    flat: ClassVar[dict[str, str]] = {"name": "model"}

    def __post_init__(self) -> None:
        non_negative_int("lora_r", self.lora_r)
        finite_number("lora_alpha", self.lora_alpha, minimum=0)
        self.lora_targets = tuple(self.lora_targets)
        one_of("quantization", self.quantization, (None, "8bit", "4bit"))
        if self.quantization and self.lora_r <= 0:
            raise ValueError(f"quantization={self.quantization!r} freezes the base weights, so the policy needs LoRA "
                             f"adapters to train: set lora_r > 0 (e.g. --lora-r 16), got lora_r={self.lora_r}")


@records_given
@dataclass
class SamplingConfig:
    """Text runs: how completions are sampled. Every log-prob (policy, reference, update) is of logits / temperature."""

    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Sample from the k most likely tokens only (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    min_new_tokens: int = 0
    """Forbid the stop token for the first this many tokens of a completion (as generate's min_new_tokens)."""
    decoder: str = "auto"
    """How rollouts advance the policy: "dynamic" (a growing KV cache, one eager forward per token), "static"
    (a preallocated cache), "compiled" (the static cache with a torch.compile'd decode step; CUDA graphs on
    CUDA), "auto" = compiled on CUDA, dynamic elsewhere. All give the same tokens and log-probs."""
    slots: int = 0
    """Continuous batching: the rollout's num_envs completions run through this many env rows, a row whose
    completion ended starting the next prompt (so short completions stop waiting for the longest). 0 = off
    (num_envs rows, all reset together). A multiple of num_generations, at most num_envs; one process."""

    flat: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        finite_number("temperature", self.temperature, minimum=0)
        non_negative_int("top_k", self.top_k)
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        non_negative_int("min_new_tokens", self.min_new_tokens)
        if self.decoder not in ("auto", "dynamic", "static", "compiled"):
            raise ValueError(f"decoder must be one of auto, dynamic, static, compiled, got {self.decoder!r}")
        non_negative_int("slots", self.slots)


@records_given
@dataclass
class KLConfig:
    """Text runs: the KL to the reference policy. β (``coef``) is one number for every agent: the per-token
    penalty −β·(log π − log π_ref) in the reward (PPO, RLOO, REINFORCE++) or the weight of a KL loss term (GRPO)."""

    coef: float = 0.05
    """β (the initial β if target is set)."""
    target: float | None = None
    """Target KL per completion for the adaptive controller (Ziegler et al. 2019); null = fixed β."""
    horizon: int = 10_000
    """Adaptive controller horizon, in completions."""
    estimator: str = "k1"
    """Per-token KL estimator in the reward: k1, k2 or k3 (GRPO's KL loss term is always k3)."""
    reference_pass: str = "sequence"
    """How the reference's log-probs are computed: "sequence" = one parallel forward after each rollout
    (cheaper); "per_token" = stepping with the env in its own KV cache. The batches are equal."""

    flat: ClassVar[dict[str, str]] = {"coef": "kl_coef", "target": "kl_target", "horizon": "kl_horizon",
                                      "estimator": "kl_estimator"}

    def __post_init__(self) -> None:
        finite_number("kl_coef", self.coef, minimum=0, strict=False)
        optional_positive("kl_target", self.target)
        positive_int("kl_horizon", self.horizon)
        one_of("kl_estimator", self.estimator, ("k1", "k2", "k3"))
        one_of("reference_pass", self.reference_pass, ("sequence", "per_token"))


@records_given
@dataclass
class EvalConfig:
    """Text runs: the held-out evaluation before and after training."""

    generations: int = 1
    """Answers sampled per held-out prompt; a prompt's score is their mean (more answers shrink the sampling
    noise of the before/after comparison)."""
    samples: int = 4
    """Held-out prompts quoted in samples.md (before and after training)."""

    flat: ClassVar[dict[str, str]] = {"generations": "eval_generations", "samples": "eval_samples"}

    def __post_init__(self) -> None:
        if not isinstance(self.generations, int) or isinstance(self.generations, bool) or self.generations < 1:
            raise ValueError(f"eval_generations must be an integer >= 1, got {self.generations!r}")
        non_negative_int("eval_samples", self.samples)


#: the run config's sections, by their key in TrainConfig and in YAML
SECTIONS: dict[str, type] = {"model": ModelConfig, "sampling": SamplingConfig, "kl": KLConfig, "eval": EvalConfig}
#: flat name (flag, legacy YAML key) -> (section, field)
FLAT_KEYS: dict[str, tuple[str, str]] = {
    cls.flat.get(f.name, f.name): (key, f.name) for key, cls in SECTIONS.items() for f in dataclasses.fields(cls)
}


@records_given
@dataclass
class TrainConfig:
    """One training run: which env and agent, how long, where the outputs go."""

    env: str = "CartPole-v1"
    """Gymnasium env id (built-in, textrl/…, or any id registered with gymnasium.register)."""
    agent: str = "ppo"
    """Agent name: one of textrl.agents.AGENTS (ppo, rloo, grpo, reinforce++ …)."""
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
    keep_checkpoints: int = 1
    """Checkpoints kept: the latest in checkpoint/ (what --resume reads) and the N − 1 before it as
    checkpoint-<update>/ (to resume from one, copy it to checkpoint/; under DeepSpeed only the latest has the
    engine's optimiser state)."""
    overwrite: bool = False
    """Replace the run already in output_dir (its files are deleted first). Without it, a directory holding a
    run is refused unless the run is resumed (--resume)."""
    device: str = "auto"
    """torch device ("auto", "cpu", "cuda", "cuda:1"). "auto": text runs take the GPU when torch sees one (under
    ``accelerate launch`` each process its own), classic MLP runs the CPU (a tiny MLP is launch-bound on a GPU)."""
    report_to: tuple[str, ...] = ()
    """More trackers, through accelerate: wandb, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab
    (comma-separated; TensorBoard and metrics.jsonl are always written). From Python, accelerate
    GeneralTracker objects too."""
    torch_threads: int | None = None
    """torch.set_num_threads for this run; null keeps torch's default."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Text runs: the policy model, LoRA, quantisation, critic and reward model (see ModelConfig)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Text runs: temperature, top-k, top-p, min_new_tokens, decoder, slots (see SamplingConfig)."""
    kl: KLConfig = field(default_factory=KLConfig)
    """Text runs: β and the KL estimator (see KLConfig)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Text runs: the held-out evaluation (see EvalConfig)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to gymnasium.make_vec for the env."""
    agent_config: dict[str, Any] = field(default_factory=dict)
    """Fields of the agent's config dataclass (in YAML also accepted under a key named after the agent)."""

    def __post_init__(self) -> None:
        for name in ("total_steps", "num_envs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; e.g. --{_flag(name)} 100000")
        non_negative_int("checkpoint_every", self.checkpoint_every)
        positive_int("keep_checkpoints", self.keep_checkpoints)
        device_name("device", self.device)
        if self.torch_threads is not None:
            positive_int("torch_threads", self.torch_threads)
        for key, cls in SECTIONS.items():  # a section given as a mapping (Python API) becomes its dataclass
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, from_dict(cls, value))
            elif not isinstance(value, cls):
                raise TypeError(f"{key}: expected a {cls.__name__} or a mapping of its fields, got {value!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def nest_run_fields(data: dict[str, Any]) -> dict[str, Any]:
    """One layer of run fields (a YAML file, flags) with flat section keys (``kl_coef``, ``model: NAME``)
    moved into their sections (``kl: {coef}``, ``model: {name}``). A field given both ways is an error."""
    out: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    given: set[tuple[str, str]] = set()  # fields named explicitly (a section object's fields are its defaults too)

    def put(section: str, name: str, value: Any, given_as: str) -> None:
        if (section, name) in given:
            raise ValueError(f"{given_as} and {section}.{name} are the same field, given twice; keep one "
                             f"({section}: {{{name}: ...}} in YAML, --{_flag(section_flat(section, name))} as a flag)")
        given.add((section, name))
        sections.setdefault(section, {})[name] = value

    for key, value in data.items():  # a section object first: its fields are the base the other keys refine
        if key in SECTIONS and isinstance(value, SECTIONS[key]):
            sections[key] = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, SECTIONS[key]):
            continue
        if key in SECTIONS and (value is None or isinstance(value, dict)):  # (null: the section's defaults)
            for name, v in (value or {}).items():
                put(key, name, v, f"{key}.{name}")
        elif key in FLAT_KEYS:
            put(*FLAT_KEYS[key], value, key)
        else:
            out[key] = value
    return {**out, **sections}


def section_flat(section: str, name: str) -> str:
    """The flat name (flag, legacy YAML key) of a section field."""
    return SECTIONS[section].flat.get(name, name)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (or of its dataclass bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
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


def _coerce(tp: Any, value: Any) -> Any:
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        return bool(value)
    if tp is int:
        number = float(value) if isinstance(value, str) else value  # ("1e5" is 100000; "2.5" is refused)
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(value)
        return int(number)
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
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ValueError(f"not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(value, dict):
            raise ValueError(value)
    return value


def field_type(cls: type, name: str) -> tuple[Any, bool]:
    """The declared type of field ``name`` of dataclass ``cls`` (``X | None`` unwrapped to ``X``), and whether
    it may be None."""
    return _base_type(typing.get_type_hints(cls)[name])


def coerce_field(cls: type, name: str, value: Any, label: str | None = None) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the field (as ``label``: a
    section field by its flat name, e.g. ``kl_coef``)."""
    tp, optional = _base_type(typing.get_type_hints(cls)[name])
    label = label or name
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ValueError(f"{label}: null is not allowed; expected {tp}")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, (tp, dict)) else _raise_type(label, tp, value)
    try:
        return _coerce(tp, value)
    except (TypeError, ValueError, OverflowError) as err:
        if str(err).startswith("not valid YAML"):
            raise ValueError(f"{label}: {err}; write a mapping, e.g. --{label.replace('_', '-')} "
                             "'{max_new_tokens: 32}'") from None
        _raise_type(label, tp, value)


def _raise_type(name: str, tp: Any, value: Any):
    raise ValueError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the list of known ones. For
    :class:`TrainConfig` the flat section keys are accepted too (:func:`nest_run_fields`)."""
    if cls is TrainConfig:
        data = nest_run_fields(data)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    section = next((name for name, klass in SECTIONS.items() if klass is cls), None)
    return cls(**{k: coerce_field(cls, k, v, section_flat(section, k) if section else k) for k, v in data.items()})


def to_dict(obj: Any) -> dict[str, Any]:
    """A config as plain YAML-able data (sections nested, tuples as lists). A value YAML cannot hold (a
    reward function, a scorer object in ``env_kwargs``) is recorded by its import path ``"module:name"``
    where that path leads back to it — so a resumed run finds it again — else by its ``repr``. Nothing is
    copied (``dataclasses.asdict`` would deep-copy a scorer holding a model)."""
    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {k if isinstance(k, (str, int, float, bool)) else str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return import_path(value) or repr(value)

    return plain(obj)


def import_path(value: Any) -> str | None:
    """``"module:qualname"`` of a module-level function or class, if importing that path gives ``value``
    back; else None (lambdas, nested functions, instances)."""
    from textrl.imports import load_attr

    module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or not name or "<" in name:  # lambdas and functions defined inside functions
        return None
    try:
        found = load_attr(f"{module}:{name}", "config value")
    except ValueError:
        return None
    return f"{module}:{name}" if found is value else None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"config: {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); give a YAML "
                         "config file") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(f"config: {str(path)!r} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
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
    name = env_id.rpartition(":")[2].replace("/", "__") + ".yaml"  # "module:Id": the id's preset
    preset = _experiments().joinpath("presets").joinpath(name)
    return yaml.safe_load(preset.read_text()) if preset.is_file() else {}
