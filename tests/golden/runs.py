"""The golden runs: fixed-seed training runs whose outputs were recorded before the redesign (issue 12) and
must be reproduced by the code after it (numbers to 1e-6; `time/` metrics excluded).

    python tests/golden/runs.py record [NAME ...]   # write this environment's recording of each run
    python tests/golden/runs.py check [NAME ...]    # run again and compare (what tests/test_golden.py does)

The numbers depend on the float kernels (the CPU's vector unit) and library versions as well as on the code,
so each run keeps one recording per environment: ``tests/golden/<name>/<label>/`` (metrics.jsonl, samples.md,
summary.json with the environment), the label being the CPU capability and a hash of the environment. A
check compares with the recording of the environment it runs in; to check a refactor on a new kind of
machine, record on the commit before it.

Every run goes through the command line (`python -m textrl train ...`), the interface that stays the same
across refactors. ``default`` (the embedded default experiment, ~7 min) is recorded and checked only when
named.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOY = ["--env", "textrl/TargetToken-v0", "--seed", "1", "--total-steps", "2048"]  # 16 rows x 16 tokens: 8 updates
RUNS: dict[str, list[str]] = {
    "ppo_toy": [*TOY, "--agent", "ppo"],
    "rloo_toy": [*TOY, "--agent", "rloo"],
    "grpo_toy": [*TOY, "--agent", "grpo"],
    "cartpole_20k": ["--env", "CartPole-v1", "--seed", "1", "--total-steps", "20000"],
    "ppo_toy_2proc": [*TOY, "--agent", "ppo", "--num-processes", "2"],
}
SLOW = {"default": []}  # `textrl train` with no arguments
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def environment() -> dict:
    """What the numbers depend on beyond the code: float kernels differ between CPU families and library
    versions, and a sampled token that flips changes a run's whole trajectory."""
    import platform

    import torch
    import transformers

    cpu = "unknown"
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run(name: str, out: Path) -> dict:
    """Train run ``name`` into ``out``; returns its outputs: metrics (no time/), held-out line, samples."""
    args = {**RUNS, **SLOW}[name]
    env = ENV if "--num-processes" in args else {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-m", "textrl", "train", *args, "--output-dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"golden run {name} failed:\n{proc.stderr[-4000:]}")
    metrics = [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}
               for x in (out / "metrics.jsonl").read_text().splitlines()]
    line = [x for x in proc.stderr.splitlines() if x.startswith(("held-out reward:", "final:"))]
    samples = out / "samples.md"
    final = re.sub(r" -> \S+$", "", line[-1]) if line else None  # the run directory differs
    return {"metrics": metrics, "line": final, "samples": samples.read_text() if samples.is_file() else None}


def label(env: dict) -> str:
    """The folder of ``env``'s recordings: e.g. ``avx512-1a2b3c4d``."""
    digest = hashlib.sha1(json.dumps(env, sort_keys=True).encode()).hexdigest()[:8]
    return f"{env.get('cpu_capability', 'cpu').lower()}-{digest}"


def recordings(name: str) -> dict[str, dict]:
    """Run ``name``'s recordings: label -> the environment each was recorded in."""
    return {f.parent.name: json.loads(f.read_text())["environment"]
            for f in sorted((HERE / name).glob("*/summary.json"))}


def save(name: str, result: dict) -> None:
    env = environment()
    folder = HERE / name / label(env)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in result["metrics"]))
    summary = {"args": {**RUNS, **SLOW}[name], "line": result["line"], "environment": env}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if result["samples"] is not None:
        (folder / "samples.md").write_text(result["samples"])


def load(name: str, env: dict | None = None) -> dict | None:
    """Run ``name``'s recording in ``env`` (default: this environment), or None where it has none."""
    env = environment() if env is None else env
    folder = next((HERE / name / k for k, v in recordings(name).items() if v == env), None)
    if folder is None:
        return None
    samples = folder / "samples.md"
    summary = json.loads((folder / "summary.json").read_text())
    return {"metrics": [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()],
            "line": summary["line"], "environment": summary["environment"],
            "samples": samples.read_text() if samples.is_file() else None}


def differences(golden: dict, got: dict, tol: float = 1e-6) -> list[str]:
    """Every metric of every update to ``tol`` (relative, or absolute near 0), the held-out line and samples."""
    out = []
    if len(golden["metrics"]) != len(got["metrics"]):
        return [f"{len(got['metrics'])} updates logged, golden {len(golden['metrics'])}"]
    for i, (g, n) in enumerate(zip(golden["metrics"], got["metrics"], strict=True)):
        missing = sorted(set(g) - set(n))
        if missing:
            out.append(f"update {i}: metrics missing {missing}")
        for k in sorted(set(g) & set(n)):
            a, b = g[k], n[k]
            if a is None or b is None:
                if a is not b:
                    out.append(f"update {i}: {k} golden {a} got {b}")
            elif not math.isclose(a, b, rel_tol=tol, abs_tol=tol):
                out.append(f"update {i}: {k} golden {a!r} got {b!r}")
    if golden["line"] != got["line"]:
        out.append(f"final line: golden {golden['line']!r} got {got['line']!r}")
    if golden["samples"] != got["samples"]:
        out.append("samples.md differs")
    return out


def main(argv: list[str]) -> int:
    mode, names = argv[0], argv[1:] or list(RUNS)
    status = 0
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(name, Path(tmp) / "run")
        if mode == "record":
            save(name, result)
            print(f"{name}: recorded {len(result['metrics'])} updates; {result['line']}")
        elif (golden := load(name)) is None:
            status = 1
            print(f"{name}: no recording for this environment ({environment()}); recorded: {recordings(name)}")
        else:
            diffs = differences(golden, result)
            status |= bool(diffs)
            print(f"{name}: {'OK' if not diffs else f'{len(diffs)} difference(s)'}")
            for d in diffs[:20]:
                print("   ", d)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
