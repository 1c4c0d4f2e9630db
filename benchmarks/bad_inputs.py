"""Bad inputs, systematically: every numeric field of ``textrl train`` (run, sections, each agent's config),
``textrl train-rm`` and ``textrl eval``, given values no field accepts, through the CLI, a YAML config and the
Python API. Counts how each is answered.

    python benchmarks/bad_inputs.py [--quick]

Values tried per field: nan, inf, -inf, a word ("abc"), and for integer fields 1.5 and -1; -1 also for the
float fields that are rates, weights or coefficients (every numeric field here but ``seed``). A case is

- **clear**: refused (exit code 2, or ValueError/TypeError from the API) with a message that names the field;
- **unclear**: refused, but the message does not name the field;
- **silent**: accepted (the run trained, exit code 0);
- **raw**: another exception escaped (a traceback).

Every case runs in this process against the toy env (``textrl/TargetToken-v0``; CartPole for the MLP
fields), 64 steps, so an accepted value shows as a finished run. Prints a table and the cases that are not
clear. ``--quick``: the CLI only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import sys
import tempfile
import typing
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BAD_ALWAYS = ("nan", "inf", "-inf", "abc")
SKIP = {"seed"}  # any integer is a seed


def _fields(cls: type, section: str | None = None) -> list[tuple[str, str, type]]:
    """(flag dest, flat name, base type) of the numeric fields of dataclass ``cls``."""
    from textrl.config import field_type, section_flat

    out = []
    for f in dataclasses.fields(cls):
        tp, _ = field_type(cls, f.name)
        if tp in (int, float) and f.name not in SKIP:
            out.append((f.name, section_flat(section, f.name) if section else f.name, tp))
    return out


def _values(tp: type) -> list[str]:
    return [*BAD_ALWAYS, "-1", *(["1.5"] if tp is int else [])]


def cases() -> list[tuple[str, str, list[str], str]]:
    """(surface, field, argv, value) for the CLI."""
    from textrl.agents.base import AGENTS, agent_class

    from textrl.config import SECTIONS, TrainConfig
    from textrl.lm.eval_run import EvalConfig
    from textrl.reward_model import RewardModelConfig

    toy = ["train", "--env", "textrl/TargetToken-v0", "--num-envs", "4", "--total-steps", "64"]
    out = []
    for _, flat, tp in _fields(TrainConfig):
        out += [("train", flat, toy, v) for v in _values(tp)]
    for section, cls in SECTIONS.items():
        for _, flat, tp in _fields(cls, section):
            out += [("train", flat, toy, v) for v in _values(tp)]
    seen = {flat for _, flat, _, _ in out}
    for agent in AGENTS:
        for _, flat, tp in _fields(agent_class(agent).config_class):
            if flat in seen:
                continue
            seen.add(flat)
            env = ["--env", "CartPole-v1", "--total-steps", "256"] if agent == "ppo" else \
                ["--env", "textrl/TargetToken-v0", "--num-envs", "8", "--total-steps", "64"]
            out += [("train", flat, ["train", "--agent", agent, *env], v) for v in _values(tp)]
    for _, flat, tp in _fields(RewardModelConfig):
        out += [("train-rm", flat, ["train-rm", "--data", "{prefs}"], v) for v in _values(tp)]
    for _, flat, tp in _fields(EvalConfig):
        out += [("eval", flat, ["eval", "--env", "textrl/TargetToken-v0", "--max-prompts", "2"], v) for v in _values(tp)]
    return out


def classify(rc, err: str, field: str) -> str:
    if isinstance(rc, BaseException):
        return "raw"
    if rc == 0:
        return "silent"
    names = {field, field.replace("_", "-"), field.split(".")[-1]}
    return "clear" if any(n in err for n in names) else "unclear"


def run_cli(argv: list[str], folder: Path) -> tuple[object, str]:
    from textrl.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as stop:
            rc = stop.code
        except Exception as exc:  # noqa: BLE001 (counted as raw)
            rc = exc
            err.write(f"{type(exc).__name__}: {exc}")
    return rc, err.getvalue()


def main() -> None:
    quick = "--quick" in sys.argv
    results: dict[str, dict[str, int]] = {}
    bad: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prefs = folder / "prefs.jsonl"
        prefs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 8)
        for i, (surface, field, argv, value) in enumerate(cases()):
            argv = [a.replace("{prefs}", str(prefs)) for a in argv]
            out = ["--output-dir", str(folder / f"r{i}")] if surface != "eval" else ["--output-dir", str(folder / f"e{i}")]
            for how in ("cli",) if quick else ("cli", "yaml"):
                if how == "cli":
                    rc, err = run_cli([*argv, f"--{field.replace('_', '-')}", value, *out], folder)
                else:  # (a flag of the same field would override the file's value: drop it)
                    flag = f"--{field.replace('_', '-')}"
                    rest = [a for j, a in enumerate(argv[1:], 1) if a != flag and argv[j - 1] != flag]
                    cfg = folder / f"c{i}.yaml"
                    cfg.write_text(f"{field}: {value}\n")
                    rc, err = run_cli([argv[0], str(cfg), *rest, *out], folder)
                verdict = classify(rc, err, field)
                results.setdefault(f"{surface} ({how})", {}).setdefault(verdict, 0)
                results[f"{surface} ({how})"][verdict] += 1
                if verdict != "clear":
                    bad.append(f"{verdict:8} {surface} {how} --{field} {value}: {err.strip().splitlines()[-1][:160] if err.strip() else rc}")
        if not quick:
            api = api_cases()
            results["Python API"] = {}
            for verdict, line in api:
                results["Python API"][verdict] = results["Python API"].get(verdict, 0) + 1
                if verdict != "clear":
                    bad.append(line)
    print("| surface | tried | clear errors | unclear errors | silent acceptances | raw tracebacks |")
    print("|---|---|---|---|---|---|")
    total = {"clear": 0, "unclear": 0, "silent": 0, "raw": 0}
    for surface, counts in results.items():
        n = sum(counts.values())
        for k in total:
            total[k] += counts.get(k, 0)
        print(f"| {surface} | {n} | {counts.get('clear', 0)} | {counts.get('unclear', 0)} | {counts.get('silent', 0)} "
              f"| {counts.get('raw', 0)} |")
    print(f"| **all** | {sum(total.values())} | {total['clear']} | {total['unclear']} | {total['silent']} | {total['raw']} |")
    for line in bad:
        print(line)


def api_cases() -> list[tuple[str, str]]:
    """TrainConfig, its sections and every agent config built from Python with each bad value (not strings:
    floats and None, the API's own types)."""
    from textrl.agents.base import AGENTS, agent_class

    from textrl.config import SECTIONS, TrainConfig

    out = []
    classes = [(TrainConfig, {"env": "CartPole-v1"}), *[(cls, {}) for cls in SECTIONS.values()],
               *[(agent_class(a).config_class, {}) for a in AGENTS]]
    for cls, base in classes:
        for name, _, tp in _fields(cls):
            for value in (math.nan, math.inf, -1, "0.5", None, *([1.5] if tp is int else [])):
                try:
                    cls(**base, **{name: value})
                    verdict, msg = "silent", "accepted"
                except (ValueError, TypeError) as exc:
                    verdict, msg = ("clear" if name in str(exc) else "unclear"), str(exc)
                except Exception as exc:  # noqa: BLE001
                    verdict, msg = "raw", f"{type(exc).__name__}: {exc}"
                optional = typing.get_type_hints(cls)[name]
                if value is None and type(None) in typing.get_args(optional):
                    continue  # None is that field's "off"
                out.append((verdict, f"{verdict:8} API {cls.__name__}({name}={value!r}): {msg[:160]}"))
    return out


if __name__ == "__main__":
    main()
