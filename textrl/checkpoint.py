"""Full-state checkpoints: model weights (safetensors), optimizer, RNG states and loop position.

Layout of ``<run>/checkpoint/``:
    model.safetensors   the agent's network weights
    optimizer.pt        optimizer state (tensors only; loaded with ``weights_only=True``)
    trainer_state.json  update index, global step, Python/numpy RNG states, extra agent state
    rng_torch.safetensors  torch CPU RNG state (and the current GPU's, on a GPU)
    manifest.json       every file's size and sha256, written last: a folder with a manifest is complete
``<run>/checkpoint-<update>/``: earlier checkpoints, kept with ``keep_checkpoints`` > 1 (same layout).

A checkpoint is written to ``checkpoint.tmp/``, completed by its manifest, and swapped in by renames (the
previous one aside to ``checkpoint.old/`` or ``checkpoint-<update>/``, the new one in place, the old one
deleted last), so a crash at any moment leaves a complete checkpoint: :func:`recover_checkpoint` puts it back
in place before a resume, and verifies it against its manifest (a corrupt one falls back to the newest kept
checkpoint that verifies). Weights that are not finite are never written.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "recover_checkpoint", "verify_checkpoint", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "manifest.json"


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
    model = {k: v.detach().cpu().contiguous() for k, v in agent_state["model"].items()}
    bad = [k for k, v in model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"checkpoint: {len(bad)} weight tensor(s) are not finite ({', '.join(bad[:3])}); "
                                 f"not written: the last checkpoint in {str(final)!r} is kept")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
    _write_manifest(tmp)  # last: from here on checkpoint.tmp is complete
    aside = run_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    if keep > 1 and (final / "trainer_state.json").is_file():  # the previous latest becomes checkpoint-<update>
        previous = json.loads((final / "trainer_state.json").read_text()).get("update", 0)
        aside = run_dir / f"{CHECKPOINT_DIR}-{previous}"
        shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    shutil.rmtree(run_dir / (CHECKPOINT_DIR + ".old"), ignore_errors=True)
    numbered = sorted((p for p in run_dir.glob(f"{CHECKPOINT_DIR}-*") if p.name.rpartition("-")[2].isdigit()),
                      key=lambda p: int(p.name.rpartition("-")[2]))
    for old in numbered[:max(len(numbered) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _indexed(device: str | torch.device) -> str:
    """``device`` with its index: safetensors reads a bare "cuda" as GPU 0, torch as the current GPU (a run on
    ``--device cuda:1`` would load its weights onto GPU 0 first)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def load_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Returns ``(agent_state, trainer_state)`` and restores the global RNG states."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    if not (ckpt / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {str(run_dir)!r} (expected {ckpt}/trainer_state.json)")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        agent_state = {
            "model": load_file(str(ckpt / "model.safetensors"), device=_indexed(device)),
            "optimizer": torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True),
            **state.pop("agent_extra", {}),
        }
        rng = load_file(str(ckpt / "rng_torch.safetensors"))
    except (OSError, ValueError, RuntimeError, EOFError) as err:  # (a checkpoint without a manifest, damaged)
        raise ValueError(f"resume: the checkpoint in {str(ckpt)!r} cannot be read ({type(err).__name__}: "
                         f"{str(err)[:200]}); restore it, or start the run again with --overwrite") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_tuples(state.pop("rng_python")))
    np_state = state.pop("rng_numpy")
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return agent_state, state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    tmp.rename(folder / MANIFEST)


def verify_checkpoint(folder: str | Path) -> str | None:
    """What is wrong with checkpoint ``folder`` (a missing, resized or changed file against its manifest), or
    None when it verifies. A folder written before manifests existed verifies when it holds its state file."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        if (folder / "trainer_state.json").is_file() and folder.name != CHECKPOINT_DIR + ".tmp":
            return None  # (an older textrl's checkpoint: nothing to verify against)
        return "incomplete (no manifest.json: its writing was interrupted)"
    try:
        entries = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest.json is unreadable"
    for name, want in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or replaced)"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (the file is corrupted)"
    return None


def recover_checkpoint(run_dir: str | Path) -> list[str]:
    """Before a resume (main process): make ``checkpoint/`` a complete, verified checkpoint if the run has
    one anywhere. A crash during a save can leave the new one complete in ``checkpoint.tmp/`` and the old one
    in ``checkpoint.old/``; a damaged ``checkpoint/`` is moved aside (``checkpoint.corrupt/``) for the newest
    kept ``checkpoint-<update>/`` that verifies. Returns messages for the user (empty when nothing changed).
    Raises ValueError when checkpoints exist but none verifies."""
    run_dir = Path(run_dir)
    final, notes = run_dir / CHECKPOINT_DIR, []
    problem = verify_checkpoint(final) if final.exists() else "missing"
    if problem is None:
        return notes
    numbered = sorted((p for p in run_dir.glob(f"{CHECKPOINT_DIR}-*") if p.name.rpartition("-")[2].isdigit()),
                      key=lambda p: -int(p.name.rpartition("-")[2]))
    # newest first: an interrupted swap's new checkpoint, then the one it was replacing, then older ones
    candidates = [run_dir / (CHECKPOINT_DIR + ".tmp"), run_dir / (CHECKPOINT_DIR + ".old"), *numbered]
    usable = next((c for c in candidates if c.is_dir() and verify_checkpoint(c) is None), None)
    if final.exists():
        if usable is None:
            raise ValueError(f"resume: the checkpoint in {str(final)!r} is damaged: {problem}; no earlier "
                             "checkpoint verifies (keep_checkpoints > 1 keeps some). Start again with --overwrite")
        aside = run_dir / (CHECKPOINT_DIR + ".corrupt")
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
        notes.append(f"warning: the checkpoint in {str(final)!r} is damaged ({problem}); moved to {aside.name}/")
    if usable is None:
        return notes  # no checkpoint at all: the caller says so
    usable.rename(final)
    state = json.loads((final / "trainer_state.json").read_text())
    notes.append(f"resume: using the complete checkpoint of update {state.get('update')} found in {usable.name}/")
    return notes


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    return obj


def _tuples(obj: Any) -> Any:
    return tuple(_tuples(x) for x in obj) if isinstance(obj, list) else obj
