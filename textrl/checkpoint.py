"""Full-state checkpoints: model weights (safetensors), optimizer, RNG states and loop position.

Layout of ``<run>/checkpoint/``:
    model.safetensors   the agent's network weights
    optimizer.pt        optimizer state (tensors only; loaded with ``weights_only=True``)
    trainer_state.json  update index, global step, Python/numpy RNG states, extra agent state
    rng_torch.safetensors  torch CPU RNG state (and the current GPU's, on a GPU)
``<run>/checkpoint-<update>/``: earlier checkpoints, kept with ``keep_checkpoints`` > 1 (same layout).
A checkpoint is written to a temporary folder and renamed into place, so a crash mid-write leaves the
previous one intact.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(
    run_dir: str | Path,
    agent_state: dict[str, Any],
    trainer_state: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    keep: int = 1,
) -> Path:
    """Write the checkpoint; ``write_extra(folder)`` may add files before the folder is swapped into place.
    ``keep``: checkpoints kept — this one in ``checkpoint/``, the ``keep − 1`` before it as
    ``checkpoint-<update>/`` (older ones are deleted)."""
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = {k: v.detach().cpu().contiguous() for k, v in agent_state["model"].items()}
    save_file(model, str(tmp / "model.safetensors"))
    torch.save(agent_state["optimizer"], tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # minibatch permutations on a GPU draw from it
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng_torch.safetensors"))
    extra = {k: v for k, v in agent_state.items() if k not in ("model", "optimizer")}
    state = {
        **trainer_state,
        "agent_extra": extra,
        "rng_python": _jsonable(random.getstate()),
        "rng_numpy": _jsonable(np.random.get_state()),
    }
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if write_extra is not None:
        write_extra(tmp)
    if keep > 1 and (final / "trainer_state.json").is_file():  # the previous latest becomes checkpoint-<update>
        previous = json.loads((final / "trainer_state.json").read_text()).get("update", 0)
        older = run_dir / f"{CHECKPOINT_DIR}-{previous}"
        shutil.rmtree(older, ignore_errors=True)
        final.rename(older)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    numbered = sorted((p for p in run_dir.glob(f"{CHECKPOINT_DIR}-*") if p.name.rpartition("-")[2].isdigit()),
                      key=lambda p: int(p.name.rpartition("-")[2]))
    for old in numbered[:max(len(numbered) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Returns ``(agent_state, trainer_state)`` and restores the global RNG states."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    if not (ckpt / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {str(run_dir)!r} (expected {ckpt}/trainer_state.json)")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    agent_state = {
        "model": load_file(str(ckpt / "model.safetensors"), device=str(device)),
        "optimizer": torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True),
        **state.pop("agent_extra", {}),
    }
    rng = load_file(str(ckpt / "rng_torch.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_tuples(state.pop("rng_python")))
    np_state = state.pop("rng_numpy")
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return agent_state, state


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    return obj


def _tuples(obj: Any) -> Any:
    return tuple(_tuples(x) for x in obj) if isinstance(obj, list) else obj
