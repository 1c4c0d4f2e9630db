"""Building the pieces of an LM run: policy, reference, critic, text env and KL wrapper.

These are the public build functions that ``textrl train``, the experiments, the benchmarks and the tests
use; each takes the run config (or the part of it it needs) and returns plain objects.
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium as gym
import torch

from textrl.config import KLConfig, ModelConfig, TrainConfig
from textrl.envs.kl_penalty import KLPenalty
from textrl.envs.scorers import HFRewardModelScorer
from textrl.envs.text_gen import TextGenVectorEnv
from textrl.imports import env_spec, load_attr
from textrl.kl_control import make_kl_controller
from textrl.lm.models import disable_dropout, load_causal_lm, load_tokenizer
from textrl.lm.policy import LMActorCritic, add_lora
from textrl.parallel.deepspeed import unpartitioned_loading, zero3_loading
from textrl.shard import Shard

__all__ = ["policy_model_name", "check_finite_weights", "build_policy", "build_critic", "build_text_env", "build_kl_env", "load_reward_model",
           "builds", "context_length_of",
           "reward_model_scorer"]


def policy_model_name(cfg: TrainConfig) -> str:
    """The policy model of a text run: ``model.name``, or the default its env registered."""
    return cfg.model.name or env_spec(cfg.env).kwargs["model"]


def build_critic(model: ModelConfig, policy_name: str, lm: torch.nn.Module) -> torch.nn.Module | None:
    """The separate critic trunk of ``value_model`` (None for "head"), fully trainable, checked against the
    policy's vocabulary (the critic reads the policy's token ids)."""
    if model.value_model == "head":
        return None
    if model.quantization and model.value_model == "policy":
        raise ValueError("value_model: 'policy' copies the policy's weights, which are quantised here; "
                         "give the critic's model name/path instead, or use value_model: head")
    # (a copy is loaded afresh when ZeRO-3 partitioned the policy while loading it: a deep copy would copy shards)
    copy_policy = model.value_model == "policy" and not zero3_loading()
    critic = copy.deepcopy(lm) if copy_policy else load_causal_lm(policy_name if model.value_model == "policy"
                                                                   else model.value_model)
    vocab, need = critic.get_input_embeddings().num_embeddings, lm.get_input_embeddings().num_embeddings
    if vocab < need:
        raise ValueError(f"value_model: {model.value_model!r} has a vocabulary of {vocab} tokens, the policy "
                         f"{policy_name!r} {need}; the critic must share the policy's tokenizer")
    for p in critic.parameters():
        p.requires_grad_(True)
    return critic


def check_finite_weights(module: torch.nn.Module, field: str, source: Any) -> None:
    """Refuse a model with a NaN or inf weight before anything runs on it (it would train on NaN losses that
    every step skips, or fail a health check with a misleading message)."""
    for pname, p in module.named_parameters():
        if p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(f"{field}: {str(source)!r} holds non-finite weights ({pname}: {bad} of {p.numel()} "
                             "values are NaN or inf); the file is damaged or was saved from a diverged run. "
                             "Load a good copy (an earlier checkpoint-<N>/ of the run, or the base model)")


def build_policy(cfg: TrainConfig, device: torch.device | str, value_head: bool = True, lm: Any = None,
                 tokenizer: Any = None):
    """``(tokenizer, policy, reference)`` of a text run: the policy model (LoRA adapters if ``model.lora_r``,
    bitsandbytes base weights if ``model.quantization``) in an :class:`LMActorCritic` at the sampling
    temperature, with a value head (and the critic of ``model.value_model``) when ``value_head``; the
    reference is the policy with its adapters off (LoRA) or a frozen copy. ``lm`` / ``tokenizer``: objects
    given from Python (:class:`textrl.Trainer`), used instead of loading ``model.name`` (the model is trained
    in place, with its dropout turned off)."""
    name, model = policy_model_name(cfg), cfg.model
    if lm is not None and model.quantization:
        raise ValueError(f"quantization={model.quantization!r} quantises a model as it loads; a model object is "
                         "already loaded: pass its name or path instead, or quantise it yourself and drop quantization")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name)
    where = torch.device(device)
    # bitsandbytes quantises as it loads: load straight onto a GPU (a later .to() leaves 8-bit state behind)
    placed = {"device_map": {"": str(where)}} if model.quantization and where.type != "cpu" else {}
    if lm is not None and any(p.is_floating_point() and p.dtype != torch.float32 for p in lm.parameters()):
        lm = lm.float()  # trained in fp32 like a model loaded by name (bf16 weights round small updates away)
    lm = disable_dropout(lm) if lm is not None else load_causal_lm(name, quantization=model.quantization, **placed)
    check_finite_weights(lm, "model", name)
    critic = build_critic(model, name, lm) if value_head else None
    if critic is not None and critic is not lm:
        check_finite_weights(critic, "value_model", model.value_model or name)
    reference = None
    if model.lora_r > 0:
        for p in lm.parameters():
            p.requires_grad_(False)
        lm = add_lora(lm, model.lora_r, model.lora_alpha, list(model.lora_targets) or None)
    elif zero3_loading():  # the frozen copy, whole on every process (ZeRO-3 partitioned the policy's load)
        with unpartitioned_loading():
            reference = load_causal_lm(name)
    else:
        reference = copy.deepcopy(lm)  # a frozen copy (the KL wrapper freezes it)
    policy = LMActorCritic(lm, critic, cfg.sampling.temperature, value_head=value_head).to(device)
    reference = policy.reference() if reference is None else reference.to(device)
    return tokenizer, policy, reference


def load_reward_model(path: str, device: torch.device | str):
    """A reward model as a scorer (whole on every process, even under ZeRO-3): a directory saved by
    ``textrl train-rm`` (its gain and bias applied), or any Hugging Face sequence classifier (name or path;
    the score is its first logit, ``prompt + completion`` scored with its own tokenizer)."""
    from pathlib import Path

    from textrl.reward_model import NORMALISATION_FILE, TrainedRewardScorer

    with unpartitioned_loading():
        if (Path(path) / NORMALISATION_FILE).is_file():
            return TrainedRewardScorer(path, device=device)
        return hf_reward_model(path, device)


def hf_reward_model(name_or_path: str, device: torch.device | str) -> HFRewardModelScorer:
    """Any Hugging Face ``AutoModelForSequenceClassification`` as a scorer; a tokenizer without a PAD token
    pads with its EOS (the classifier reads the last real token, found from the attention mask)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from textrl.lm.models import resolve_model_path

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"reward_model: {name_or_path!r} is neither a `textrl train-rm` directory nor a Hugging "
                         f"Face sequence-classification model ({err})") from None
    return classifier_scorer(model, tokenizer, device)


def classifier_scorer(model: torch.nn.Module, tokenizer: Any, device: torch.device | str) -> HFRewardModelScorer:
    """A loaded sequence classifier and its tokenizer as a scorer on ``device``: dropout off, and a tokenizer
    without a PAD token pads with its EOS (the classifier reads the last real token from the attention mask)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return HFRewardModelScorer(disable_dropout(model).to(device), tokenizer)


def reward_model_scorer(item: Any, device: torch.device | str) -> Any:
    """A reward model given by name or path (see :func:`load_reward_model`) or as a ``(model, tokenizer)``
    pair, as a scorer on ``device``."""
    if isinstance(item, tuple):
        return classifier_scorer(*item, device)
    return load_reward_model(str(item), device)


def build_text_env(cfg: TrainConfig, tokenizer: Any, device: torch.device | str, num_envs: int | None = None,
                   shard: Shard | None = None, num_generations: int | None = None, scorer: Any = None,
                   generation_eos_ids: Any = (), context_length: int | None = None,
                   vocab_size: int | None = None) -> gym.vector.VectorEnv:
    """The run's text env: ``cfg.env`` with ``cfg.env_kwargs``, ``num_envs`` rows (default ``cfg.num_envs``),
    the rows ``shard`` of a data-parallel batch, k = ``num_generations`` rows per prompt (None: as
    ``env_kwargs`` says; an agent that needs k sets it), and ``scorer`` (e.g. a loaded reward model)
    replacing the env's own; ``generation_eos_ids`` (the policy's ``generation_config.eos_token_id``) join a
    multi-turn env's default stop ids; ``context_length`` (the policy's) is checked against the env's prompt
    and response budget when the env is a :class:`~textrl.envs.text_gen.TextGenVectorEnv` class; ``vocab_size`` (the
    policy's number of logits) widens the env's actions where it exceeds the tokenizer's (``fit_vocabulary``)."""
    kwargs = dict(cfg.env_kwargs)
    if num_generations is not None:
        given = kwargs.pop("num_generations", num_generations)
        if given != num_generations:
            raise ValueError(f"env_kwargs.num_generations={given} conflicts with {cfg.agent}.num_generations="
                             f"{num_generations}; set it once, in the agent's section")
        if num_generations > 1:
            kwargs["num_generations"] = num_generations
    if shard is not None and shard.sharded:
        kwargs["shard"] = shard
    if scorer is not None:
        kwargs["scorer"] = scorer
    from textrl.envs.turns import MultiTurnEnv

    if generation_eos_ids and builds(cfg.env, MultiTurnEnv):  # a list of EOS ids in generation_config ends turns
        kwargs.setdefault("generation_eos_ids", generation_eos_ids)
    if context_length and builds(cfg.env, TextGenVectorEnv):  # prompts + response must fit the model
        kwargs.setdefault("context_length", context_length)
    elif hasattr(kwargs.get("scorer"), "resolve"):  # reward models in a list of rewards load here, on the device
        kwargs["scorer"].resolve(lambda item: reward_model_scorer(item, device))
    with unpartitioned_loading():  # scorer models are frozen and whole on every process, even under ZeRO-3
        try:
            envs = gym.make_vec(cfg.env, num_envs=num_envs or cfg.num_envs, tokenizer=tokenizer, device=device, **kwargs)
        except TypeError as err:
            if "unexpected keyword argument" not in str(err) and "positional argument" not in str(err):
                raise
            passed = ", ".join(["num_envs", "tokenizer", "device", *kwargs])
            raise TypeError(f"env: {cfg.env}'s vector_entry_point could not be called with what a text run passes it "
                            f"({passed}): {err}. Give its __init__ a **kwargs and pass them on to TextGenVectorEnv "
                            "(or subclass textrl.envs.MultiTurnEnv, which takes them all)") from None
    if not isinstance(envs.unwrapped, TextGenVectorEnv):
        raise TypeError(f"env: {cfg.env} is not a textrl text env (got {type(envs.unwrapped).__name__}); text runs "
                        "need a TextGenVectorEnv or a subclass of it (see textrl.envs)")
    if vocab_size:
        envs.unwrapped.fit_vocabulary(vocab_size)
    return envs


def builds(env_id: str, cls: type) -> bool:
    """Whether the registered ``env_id``'s vector entry point is ``cls`` or a subclass (a class, not a function)."""
    try:
        entry = getattr(env_spec(env_id), "vector_entry_point", None)
        target = load_attr(entry, "env") if isinstance(entry, str) else entry
    except (ImportError, AttributeError, ValueError, gym.error.Error):
        return False
    return isinstance(target, type) and issubclass(target, cls)


def context_length_of(config: Any) -> int | None:
    """A model config's context length (``max_position_embeddings`` or GPT-2's ``n_positions``), or None."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size_of(model: Any) -> int | None:
    """A causal LM's number of logits: its output embedding's rows, else its config's ``vocab_size`` (a config
    that nests it, a partitioned ZeRO-3 weight); None when neither says."""
    get = getattr(model, "get_output_embeddings", None)
    weight = getattr(get() if callable(get) else None, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def build_kl_env(envs: gym.vector.VectorEnv, reference: Any, kl: KLConfig, temperature: float,
                 in_reward: bool = True) -> KLPenalty:
    """The :class:`~textrl.envs.kl_penalty.KLPenalty` wrapper: β = ``kl.coef`` (adaptive with ``kl.target``)
    in the reward, or β = 0 when the agent puts the KL in its loss (the wrapper then only reports it)."""
    controller = make_kl_controller(kl.coef if in_reward else 0.0, kl.target if in_reward else None, kl.horizon)
    return KLPenalty(envs, reference, controller, kl.estimator, temperature, kl.reference_pass)
