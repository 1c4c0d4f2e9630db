"""Config layers: an env's tuned preset (``experiments/presets/<env id>.yaml``) under what the user gave.

The CLI resolves dataclass defaults < preset < YAML file < flags; :func:`with_preset` gives a config built in
Python the same preset layer: every field its caller did not give (the config records which it was given)
comes from the preset where the preset sets it. A config made with ``dataclasses.replace`` gives every field
(replace passes them all), so it gets no preset at all: build sweeps with ``TrainConfig(**shared, seed=s)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from textrl.config import SECTIONS, TrainConfig, given_fields, nest_run_fields, preset_for

__all__ = ["split_layer", "merge_layer", "with_preset"]


def split_layer(data: dict[str, Any], agent: str) -> tuple[dict, dict]:
    """Split one YAML layer into (run fields with sections nested, agent fields): the agent's section is read
    under any of its names (``reinforce++`` or ``reinforce_pp``); sections named after other agents are dropped."""
    from textrl.agents.base import AGENTS, ALIASES, canonical_agent

    data = dict(data)
    for name in ["agent_config", *AGENTS, *ALIASES, *SECTIONS]:
        legacy = name == "model" and isinstance(data.get(name), str)  # (older configs: model: NAME)
        if data.get(name) is not None and not isinstance(data[name], dict) and not legacy:
            raise ValueError(f"{name}: a section of fields (a mapping such as '{name}: {{learning_rate: 1e-5}}'), "
                             f"got {data[name]!r}")
    agent_fields = dict(data.pop("agent_config", None) or {})
    for name in [*AGENTS, *ALIASES]:
        section = data.pop(name, None)
        if canonical_agent(name) == agent:
            agent_fields.update(section or {})
    return nest_run_fields(data), agent_fields


def merge_layer(run: dict[str, Any], layer: dict[str, Any]) -> None:
    """Later layers win, field by field inside the sections too."""
    for key, value in layer.items():
        run[key] = {**run.get(key, {}), **(value or {})} if key in SECTIONS else value


def with_preset(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its env's preset under the fields its caller gave (a new config; ``cfg`` is unchanged).
    A config the CLI resolved already holds its preset, and comes back equal."""
    from textrl.agents.base import canonical_agent

    preset = preset_for(cfg.env)
    given = given_fields(cfg)
    if not preset or given >= {f.name for f in dataclasses.fields(cfg) if f.init}:
        return cfg  # no preset; or every field given (dataclasses.replace): no preset rather than part of one
    run, agent_fields = split_layer(preset, canonical_agent(cfg.agent))
    changes = {}
    for key, value in run.items():
        if key in SECTIONS:
            section = getattr(cfg, key)
            fill = {k: v for k, v in (value or {}).items() if k not in given_fields(section)}
            if fill:
                changes[key] = dataclasses.replace(section, **fill)
        elif key not in given:
            changes[key] = value
    agent_config = {**agent_fields, **cfg.agent_config}
    if not changes and agent_config == cfg.agent_config:
        return cfg
    return dataclasses.replace(cfg, **changes, agent_config=agent_config)
