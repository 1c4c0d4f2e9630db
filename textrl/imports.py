"""``"module:attribute"`` strings — how configs name envs, scorers, agents and models — resolved with errors
that say which string, which module and what to do.

Modules are imported as Python would from the working directory, also under the ``textrl`` console script
(whose ``sys.path`` starts at its own folder, not the working directory): the directory is tried second.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import gymnasium as gym

__all__ = ["import_module", "load_attr", "env_spec"]


def import_module(module: str, what: str) -> Any:
    """Import ``module`` for the config value ``what`` (e.g. ``"env 'my_envs:Maze-v0'"``)."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != top:  # the module was found, and failed importing something of its own
            raise ValueError(f"{what}: importing module {module!r} failed: {err}") from err
        here = os.getcwd()
        if here in sys.path:
            raise _not_found(module, what, err) from None
        sys.path.append(here)  # the console script does not see the working directory
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as again:
            if again.name == top:
                raise _not_found(module, what, again) from None
            raise ValueError(f"{what}: importing module {module!r} failed: {again}") from again


def _not_found(module: str, what: str, err: ModuleNotFoundError) -> ValueError:
    return ValueError(f"{what}: cannot import module {module!r} ({err}); run from the folder that holds it, "
                      "or add that folder to PYTHONPATH")


def load_attr(target: str, what: str) -> Any:
    """The object a ``"module:attribute"`` string names (dots in the attribute walk into it)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{what}: expected 'module:attribute', got {target!r}")
    obj = import_module(module, what)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The Gymnasium spec of ``env_id``; ``"module:Id"`` imports the module first (as ``gymnasium.make``
    does), so an env registered there is found."""
    module, sep, name = env_id.rpartition(":")
    if sep:
        import_module(module, f"env {env_id!r}")
    return gym.spec(name if sep else env_id)
