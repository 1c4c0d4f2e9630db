"""Kill a training run at random moments, resume it each time, and compare the result with an uninterrupted run.

    python benchmarks/kill_resume.py [--kills 10] [--runs cartpole text-ppo text-grpo] [--seed 0]

For each run: train it once straight; then start it again into another directory and SIGKILL it at
``--kills`` random moments — half a random delay after the process started (start-up, model loading, the
first rollout), half a random delay after it logged an update (inside the next update or checkpoint write) —
resuming with ``--resume`` after each kill, until it ends. The killed-and-resumed run must equal the straight
one: every metric but timings, and every weight, bit for bit. Prints one line per run and a table; exits 1
if any differs. (``tests/test_crash_safety.py`` runs the same check with 4 kills per run.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

RUNS = {
    "cartpole": ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "32", "--total-steps", "3072"],
    "text-ppo": ["--env", "textrl/TargetToken-v0", "--num-envs", "8", "--total-steps", "2048"],
    "text-grpo": ["--env", "textrl/TargetToken-v0", "--num-envs", "8", "--total-steps", "2048", "--agent", "grpo"],
}


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def killed_run(cmd: list[str], run: Path, kills: int, rng: random.Random, env: dict) -> int:
    """Run ``cmd`` into ``run``, SIGKILLed ``kills`` times and resumed; returns the kills that landed."""
    args, landed, log = [*cmd[4:], "--output-dir", str(run)], 0, run.parent / f"{run.name}.stderr"
    while True:
        with log.open("w") as err:
            proc = subprocess.Popen([*cmd[:4], *args], env=env, stdout=subprocess.DEVNULL, stderr=err)
        if landed < kills:
            if landed % 2 == 0:  # somewhere in start-up or the first rollout of this session
                time.sleep(rng.uniform(0.5, 6.0))
            else:  # somewhere in the update or checkpoint write after one this session logged
                seen = lines(run)
                while proc.poll() is None and lines(run) <= seen:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.kill()
                landed += 1
        if proc.wait() == 0:
            return landed
        if proc.returncode == 2 and "stopped during start-up" in log.read_text():
            args = [*cmd[4:], "--output-dir", str(run)]  # killed before its config was written: as the error says
            continue
        if proc.returncode != -9:
            raise RuntimeError(f"the run failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        args = ["--resume", str(run)]


def check(name: str, kills: int, seed: int, root: Path) -> tuple[int, bool, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "textrl", "train", *RUNS[name], "--checkpoint-every", "1", "--seed", "3"]
    straight, run = root / f"{name}-straight", root / f"{name}-killed"
    subprocess.run([*cmd, "--output-dir", str(straight)], check=True, env=env, capture_output=True)
    landed = killed_run(cmd, run, kills, random.Random(seed), env)
    same_metrics = metrics(run) == metrics(straight)
    a = load_file(str(run / "checkpoint" / "model.safetensors"))
    b = load_file(str(straight / "checkpoint" / "model.safetensors"))
    same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    detail = "equal" if same_metrics and same_weights else \
        f"differs ({'metrics' if not same_metrics else ''}{' weights' if not same_weights else ''})"
    return landed, same_metrics and same_weights, detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            landed, ok, detail = check(name, args.kills, args.seed, Path(tmp))
            rows.append((name, landed, ok))
            print(f"{name}: {landed} kills, resumed: {detail}", flush=True)
    print("\n| run | kills | equals the uninterrupted run |\n|---|---|---|")
    for name, landed, ok in rows:
        print(f"| {name} | {landed} | {'yes' if ok else 'NO'} |")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
