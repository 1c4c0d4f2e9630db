"""The state of a classic vector env as plain data, so that a resumed run continues its episodes exactly.

Gymnasium envs keep their state in attributes: numpy arrays (CartPole's ``state``), numbers (a time limit's
elapsed steps), random generators (``np_random``), and small sequences (episode-statistics queues).
:func:`env_state` walks a vector env, its wrappers and its sub-envs' wrapper chains, and keeps those
attributes as JSON-able data (no pickle: a checkpoint never runs code when it is read); :func:`load_env_state`
puts them back. An env whose state lives elsewhere (a physics engine's memory, a subprocess) cannot be
captured this way: :func:`env_state` says so, and the run resumes with fresh episodes instead.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

import numpy as np

__all__ = ["env_state", "load_env_state"]

_SKIP = {"spec", "metadata", "render_mode", "observation_space", "action_space", "single_observation_space",
         "single_action_space", "env", "envs", "unwrapped", "closed", "episode_start_times", "time_queue"}
_SCALARS = (bool, int, float, str, type(None))


def _walk(obj: Any, seen: set[int] | None = None) -> list[Any]:
    """The vector env, its wrappers, and each sub-env's wrapper chain down to the base env, in a fixed order."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found = [obj]
    inner = getattr(obj, "__dict__", {})
    if "env" in inner and inner["env"] is not None:
        found += _walk(inner["env"], seen)
    for sub in inner.get("envs", None) or []:
        found += _walk(sub, seen)
    return found


def _encode(value: Any) -> Any:
    """JSON-able form of a plain value; ``None`` for values that are not plain (those are not captured)."""
    if isinstance(value, _SCALARS):
        return {"v": value}
    if isinstance(value, np.generic):
        return {"np": value.item(), "dtype": str(value.dtype)}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {"nd": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.random.Generator):
        return {"rng": value.bit_generator.state}
    if isinstance(value, (tuple, list, deque)) and all(isinstance(x, (*_SCALARS, np.generic)) for x in value):
        kind = "deque" if isinstance(value, deque) else type(value).__name__
        items = [x.item() if isinstance(x, np.generic) else x for x in value]
        return {"seq": items, "kind": kind, "maxlen": getattr(value, "maxlen", None)}
    return None


def _decode(data: dict[str, Any], current: Any) -> Any:
    if "v" in data:
        return data["v"]
    if "np" in data:
        return np.dtype(data["dtype"]).type(data["np"])
    if "nd" in data:
        return np.asarray(data["nd"], dtype=data["dtype"]).reshape(data["shape"])
    if "rng" in data:
        if not isinstance(current, np.random.Generator):  # (not yet seeded in the env just built)
            current = np.random.Generator(getattr(np.random, data["rng"]["bit_generator"])())
        current.bit_generator.state = data["rng"]  # (a generator object others may hold stays the same)
        return current
    items = data["seq"]
    return deque(items, maxlen=data["maxlen"]) if data["kind"] == "deque" else tuple(items) \
        if data["kind"] == "tuple" else list(items)


def env_state(envs: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``(state, None)``, or ``(None, why)`` when ``envs`` holds state that is not plain data (then a resume
    cannot continue its episodes exactly)."""
    if type(envs).__name__ == "AsyncVectorEnv" or any(type(o).__name__ == "AsyncVectorEnv" for o in _walk(envs)):
        return None, "its sub-envs run in subprocesses (AsyncVectorEnv)"
    layers = []
    for obj in _walk(envs):
        attrs = {}
        for name, value in vars(obj).items():
            if name in _SKIP or name.startswith("__") or callable(value) or value is None:
                continue  # (None: nothing to restore; a lazily filled attribute stays as the new env has it)
            encoded = _encode(value)
            if encoded is not None:
                attrs[name] = encoded
            elif _holds_state(value):
                return None, f"{type(obj).__name__}.{name} is a {type(value).__name__}, not plain data"
        layers.append({"class": type(obj).__name__, "attrs": attrs})
    return {"layers": layers}, None


def _holds_state(value: Any) -> bool:
    """Whether an attribute we cannot encode may hold episode state (spaces, specs and the like do not)."""
    from gymnasium import Env, Space
    from gymnasium.vector import VectorEnv

    if isinstance(value, (Space, Env, VectorEnv, type, enum.Enum)) or value is None:
        return False  # (settings and structure, not episode state)
    if isinstance(value, dict):
        return any(_holds_state(v) for v in value.values())
    return not isinstance(value, (np.dtype,)) and type(value).__module__ not in ("builtins", "gymnasium.envs.registration")


def load_env_state(envs: Any, state: dict[str, Any]) -> None:
    """Put :func:`env_state`'s data back into ``envs`` (built by the same code with the same settings)."""
    objects = _walk(envs)
    layers = state["layers"]
    names = [type(o).__name__ for o in objects]
    if names != [layer["class"] for layer in layers]:
        raise ValueError(f"resume: the saved env state is of another env stack ({[la['class'] for la in layers][:4]}"
                         f"…) than this run's ({names[:4]}…); resume with the run's env settings")
    for obj, layer in zip(objects, layers, strict=True):
        for name, data in layer["attrs"].items():
            setattr(obj, name, _decode(data, getattr(obj, name, None)))
