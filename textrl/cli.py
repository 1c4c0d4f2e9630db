"""The ``textrl`` command.

    textrl train [CONFIG.yaml] [--agent NAME] [--env ID] [--seed N] [--total-steps N] [--output-dir DIR]
                 [--resume RUN_DIR] [--<any run or agent config field> VALUE ...]
    textrl train-rm [CONFIG.yaml] --data PREFS.jsonl [--model NAME_OR_PATH] [--output-dir DIR] [--<field> VALUE ...]

Both take ``--num-processes N``: run data-parallel on N local processes (torchrun underneath); under
``accelerate launch`` or ``torchrun`` they join the launcher's processes instead.

With no CONFIG and no --env, ``train`` runs the embedded default experiment (experiments/default.yaml).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from textrl.config import (
    FLAT_KEYS,
    SECTIONS,
    TrainConfig,
    coerce_field,
    default_config_path,
    field_docs,
    from_dict,
    load_yaml,
    preset_for,
    section_flat,
)
from textrl.parallel.distributed import end
from textrl.presets import merge_layer, split_layer

__all__ = ["main", "resolve_train_config"]

#: TrainConfig's own fields that are flags (the sections' fields are flags under their flat names)
_RUN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("agent_config", *SECTIONS)]
#: agent fields that moved to the run config, with where they went
_MOVED = {"beta": "beta (GRPO's KL weight) is now the run's kl.coef, one β for every agent: use --kl-coef "
                  "(YAML: kl: {coef: ...})"}


def _prescan(argv: list[str]) -> argparse.Namespace:
    """Find CONFIG, --agent, --env and --resume before the full parser exists (it depends on the agent).
    Every textrl flag takes one value (a bool flag may be bare), so the positional is the first token no flag
    consumes."""
    pre = argparse.Namespace(config=None, config_index=None, agent=None, env=None, resume=None)
    bools = _bool_flags()
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--help":
            pass
        elif token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            takes = nxt is not None and not nxt.startswith("--") and (
                name.replace("-", "_") not in bools or nxt.lower() in _BOOL_WORDS)  # a bare bool flag takes none
            if not eq and takes:
                value = nxt
                i += 1
            elif not eq:
                value = None
            if name in ("agent", "env", "resume"):
                setattr(pre, name, value)
        elif token not in ("-h",) and pre.config is None:
            pre.config, pre.config_index = token, i
        i += 1
    return pre


_BOOL_WORDS = ("true", "false", "1", "0", "yes", "no")


def _bool_flags() -> set[str]:
    """The flat names of every bool field (run, sections, every registered agent's config)."""
    from textrl.agents.base import AGENTS, agent_class

    classes = [TrainConfig, *SECTIONS.values(), *(agent_class(a).config_class for a in AGENTS)]
    return {section_flat(key, f.name) if key else f.name
            for cls in classes for key in [next((k for k, c in SECTIONS.items() if c is cls), None)]
            for f in dataclasses.fields(cls) if f.type in (bool, "bool")}


def resolve_train_config(argv: list[str]) -> tuple[TrainConfig, bool]:
    """Parse ``textrl train`` arguments into a validated :class:`TrainConfig` (and the resume flag).

    Layers, later wins: dataclass defaults < env preset < CONFIG file (or the run's config.yaml with
    --resume) < command-line flags.
    """
    from textrl.agents.base import agent_class, canonical_agent
    from textrl.train import config_from_run_dir

    pre = _prescan(argv)

    if pre.resume:
        if pre.config:
            raise ValueError("resume: give either CONFIG or --resume RUN_DIR, not both")
        file_data = config_from_run_dir(pre.resume)
        file_data["output_dir"] = pre.resume
    elif pre.config:
        file_data = load_yaml(pre.config)
    elif pre.env is None:
        file_data = load_yaml(default_config_path())
    else:
        file_data = {}
    agent = canonical_agent(pre.agent or file_data.get("agent") or TrainConfig.agent)
    env = pre.env or file_data.get("env") or TrainConfig.env
    agent_cls = agent_class(agent)  # unknown agent -> clear ValueError before anything else

    for token in argv:  # flags of fields that moved say where they went
        moved = token[2:].partition("=")[0] if token.startswith("--") else ""
        if moved in _MOVED:
            raise ValueError(f"--{moved}: {_MOVED[moved]}")
    parser = _train_parser(agent_cls.config_class, agent if "--help" in argv or "-h" in argv else None)
    # CONFIG as the prescan found it: a bare bool flag before it (--overwrite cfg.yaml) must not take it as a value
    rest = [t for i, t in enumerate(argv) if i != pre.config_index]
    args = parser.parse_args(rest)
    args.config = pre.config
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "resume", "num_processes")}

    run: dict[str, Any] = {}
    agent_fields: dict[str, Any] = {}
    for layer in (preset_for(env), file_data):
        r, a = split_layer(layer, agent)
        merge_layer(run, r)
        agent_fields.update(a)
    agent_names = {f.name for f in dataclasses.fields(agent_cls.config_class)}
    for key, value in flags.items():
        section, _, name = key.partition(".")
        if name:
            run.setdefault(section, {})[name] = value
        else:
            (run if key in _RUN_FIELDS else agent_fields)[key] = value
    unknown = sorted(set(agent_fields) - agent_names)
    for key in unknown:
        if key in _MOVED:
            raise ValueError(f"agent_config: {_MOVED[key]}")
    if unknown:
        raise ValueError(f"agent_config: {agent} has no field(s) {unknown}; its fields are {sorted(agent_names)}")
    run["agent"], run["env"] = agent, env
    run["agent_config"] = agent_fields
    return from_dict(TrainConfig, run), bool(pre.resume)


def _field_type(cls: type, name: str):
    def convert(value: str) -> Any:
        try:
            return coerce_field(cls, name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


def _add_fields(group: argparse._ArgumentGroup, cls: type, section: str | None = None,
                skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """One ``--flag`` per field of dataclass ``cls`` (a section's fields under their flat names), with its doc
    and default (and, where it differs, ``defaults[field]``: what a bare ``textrl train`` runs). A bool flag
    given bare means true (``--bf16``; ``--bf16 false`` too)."""
    docs, defaults = field_docs(cls), defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flat = section_flat(section, f.name) if section else f.name
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        names = [f"--{flat.replace('_', '-')}"] + ([f"--{flat}"] if "_" in flat else [])
        shown = f"default: {default}" if f.name not in defaults or defaults[f.name] == default else (
            f"default: {default}; bare `textrl train`: {defaults[f.name]}")
        is_bool = f.type in (bool, "bool")  # a bare --flag means true
        group.add_argument(*names, dest=f"{section}.{f.name}" if section else f.name, metavar="V", default=None,
                           type=_field_type(cls, f.name), help=f"{docs.get(f.name, '')} ({shown})",
                           **({"nargs": "?", "const": True} if is_bool else {}))


def _train_parser(agent_config_cls: type, bare_agent: str | None = None) -> argparse.ArgumentParser:
    """The ``textrl train`` parser; with ``bare_agent`` (for --help) each field also shows what a bare
    ``textrl train --agent bare_agent`` would run where that differs from the default."""
    parser = argparse.ArgumentParser(
        prog="textrl train", allow_abbrev=False,
        description="Train an agent on a Gymnasium env. Any config field can be given as --field-name VALUE "
                    "(the fields of the model, sampling, kl and eval sections by the names shown below).",
    )
    parser.add_argument("config", nargs="?", help="YAML config; default: the embedded default experiment")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    _add_num_processes(parser)
    bare = _bare_default(bare_agent) if bare_agent else None
    _add_fields(parser.add_argument_group("run (TrainConfig)"), TrainConfig, skip=("agent_config", *SECTIONS),
                defaults=_fields_of(bare))
    for section, cls in SECTIONS.items():
        _add_fields(parser.add_argument_group(f"{section} ({cls.__name__}; YAML: {section}: {{...}})"), cls, section,
                    defaults=_fields_of(bare and getattr(bare, section)))
    agent_fields = [f.name for f in dataclasses.fields(agent_config_cls)]
    clash = [n for n in agent_fields if n in _RUN_FIELDS or n in FLAT_KEYS]
    _add_fields(parser.add_argument_group(f"agent ({agent_config_cls.__name__})"), agent_config_cls, skip=tuple(clash),
                defaults=bare.agent_config if bare else None)
    return parser


def _fields_of(config: Any) -> dict[str, Any] | None:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)} if config is not None else None


def _bare_default(agent: str) -> TrainConfig | None:
    """What ``textrl train --agent AGENT`` with no other arguments runs (the embedded default experiment)."""
    try:
        return resolve_train_config(["--agent", agent])[0]
    except (ValueError, TypeError, FileNotFoundError):
        return None


def _train(argv: list[str]) -> int:
    from textrl.api import Trainer

    cfg, resume = resolve_train_config(argv)
    Trainer(args=cfg).train(resume=resume)  # the Python API's path, exactly
    return 0


def _train_rm(argv: list[str]) -> int:
    from textrl.reward_model import RewardModelConfig, train_reward_model

    parser = argparse.ArgumentParser(
        prog="textrl train-rm", allow_abbrev=False,
        description="Train a Bradley–Terry reward model from preference pairs (JSONL rows with prompt, chosen, "
                    "rejected). Any field can be given as --field-name VALUE.")
    parser.add_argument("config", nargs="?", help="YAML file with any of the fields below")
    _add_num_processes(parser)
    _add_fields(parser.add_argument_group("reward model (RewardModelConfig)"), RewardModelConfig)
    args = parser.parse_args(argv)
    values = dict(load_yaml(args.config)) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "num_processes") and v is not None})
    train_reward_model(from_dict(RewardModelConfig, values))
    return 0


def _eval(argv: list[str]) -> int:
    from textrl.lm.eval_run import EvalConfig, run_eval

    parser = argparse.ArgumentParser(
        prog="textrl eval", allow_abbrev=False,
        description="Evaluate a base model (--model, default: the env's) or a trained run (--run RUN_DIR) on a text "
                    "env's held-out prompts: reward ± SE, accuracy and pass@k (verifiable envs), turns and tool "
                    "calls (multi-turn envs), KL to the base model. Writes eval.json and samples.md.")
    parser.add_argument("config", nargs="?", help="YAML file with any of the fields below")
    _add_fields(parser.add_argument_group("evaluation (EvalConfig)"), EvalConfig)
    args = parser.parse_args(argv)
    values = dict(load_yaml(args.config)) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    run_eval(from_dict(EvalConfig, values))
    return 0


COMMANDS = {
    "train": (_train, "train an agent (PPO, RLOO, GRPO …) on a Gymnasium or textrl env"),
    "eval": (_eval, "evaluate a model or a trained run on a text env's held-out prompts"),
    "train-rm": (_train_rm, "train a reward model from preference pairs (Bradley–Terry)"),
}


def _add_num_processes(parser: argparse.ArgumentParser) -> None:
    """Shown in --help; ``main`` takes the flag out before parsing (it is a launcher flag, not a config field)."""
    parser.add_argument("--num-processes", metavar="N", help="run data-parallel on N local processes (torchrun "
                        "underneath; the configured batch stays the global batch). Under accelerate launch or torchrun leave it out")


def _pop_num_processes(argv: list[str]) -> tuple[list[str], int]:
    """Remove ``--num-processes N`` (a launcher flag, not a config field) from ``argv``."""
    rest, n, i = [], 1, 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in ("--num-processes", "--num_processes"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            try:
                n = int(value)
            except ValueError:
                n = 0
            if n < 1:
                raise ValueError(f"--num-processes must be a positive integer, got {value!r}")
        else:
            rest.append(argv[i])
        i += 1
    return rest, n


def _launch(argv: list[str], processes: int) -> int:
    """Run ``textrl ARGV`` data-parallel on this machine: ``torchrun --standalone --nproc-per-node N -m textrl``
    (the same as ``accelerate launch --multi_gpu --num_processes N -m textrl ...``; gloo on CPU, NCCL on GPUs)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", "textrl", *argv]
    print("textrl: launching " + " ".join(cmd[1:]), file=sys.stderr)
    return subprocess.call(cmd)


def _exit_worker(code: int) -> None:
    """End a data-parallel worker whose command has finished (its files closed, the process group left) without
    the interpreter's teardown: torch's C++ threads (gloo's, the rendezvous store client's) can abort a process
    there with "terminate called without an active exception" (SIGABRT), which turned a finished two-process
    run into a failed one under load."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        usage = "usage: textrl COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"textrl: unknown command {argv[0]!r}; expected one of {sorted(COMMANDS)}\n\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if argv else 2
    try:
        argv, processes = _pop_num_processes(argv)
        if processes > 1 and "WORLD_SIZE" not in os.environ:
            return _launch(argv, processes)
        code = COMMANDS[argv[0]][0](argv[1:])
        worker = int(os.environ.get("WORLD_SIZE", "1")) > 1
        end()  # data-parallel runs: every process finishes together
        if worker:
            _exit_worker(code)
        return code
    except (ValueError, TypeError, FileNotFoundError) as err:
        if os.environ.get("TEXTRL_DEBUG"):
            raise
        print(f"textrl {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
