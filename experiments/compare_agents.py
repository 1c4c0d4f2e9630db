"""PPO vs RLOO vs GRPO vs REINFORCE++ on the same env and the same budget of generated tokens.

    python -m textrl.experiments.compare_agents [--tasks toy default arithmetic] [--seeds 1 2 3] [--out DIR]

Every (task, agent, seed) run is a plain ``textrl train`` in its own subprocess (so its peak memory is its
own), with only ``--agent`` changed; the agents' settings come from the task's config (the toy and
Arithmetic-v0 presets, or ``experiments/default.yaml``), so all three see the same env, model, rows per batch, tokens per completion
and total generated tokens. Writes ``DIR/compare_agents.md`` (final held-out reward ± SE, KL to the
reference per completion, wall time, peak RSS; mean over seeds) and ``DIR/compare_agents.png`` (training
reward vs generated tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

AGENTS = ("ppo", "rloo", "grpo", "reinforce++")
TASKS = {
    "toy": ["--env", "textrl/TargetToken-v0"],  # its preset holds the ppo/rloo/grpo sections
    "default": [],  # experiments/default.yaml: SmolLM2-135M + LoRA, MiniLM cheerfulness
    "arithmetic": ["--env", "textrl/Arithmetic-v0"],  # verifiable sums; its preset holds every agent's section
}


def _child(task: str, agent: str, seed: int, out: Path) -> None:
    """Run one training and print its summary as JSON (the last stdout line)."""
    import resource

    from textrl.cli import resolve_train_config
    from textrl.lm.evaluate import paired_gain
    from textrl.train import train

    cfg, _ = resolve_train_config([*TASKS[task], "--agent", agent, "--seed", str(seed), "--output-dir", str(out)])
    start = time.perf_counter()
    result = train(cfg, quiet=True)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gain, gain_se = paired_gain(result.before, result.after)
    print(json.dumps({"task": task, "agent": agent, "seed": seed, "before": result.before.mean,
                      "before_se": result.before.se, "after": result.after.mean, "after_se": result.after.se,
                      "gain": gain, "gain_se": gain_se, "kl": result.after.kl, "wall_s": wall, "peak_mb": peak_mb,
                      "curve": [(h["global_step"], h["reward/score_mean"]) for h in result.history]}))


def run_one(task: str, agent: str, seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "textrl.experiments.compare_agents", "--child", task, agent, str(seed), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{task}/{agent}/seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict]) -> str:
    lines = ["| task | agent | seeds | held-out reward before | held-out reward after ± SE | paired gain (z) "
             "| KL (nats/completion) | wall time (s) | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        for agent in AGENTS:
            runs = [r for r in rows if r["task"] == task and r["agent"] == agent]
            if not runs:
                continue
            def mean(key: str, runs: list[dict] = runs) -> float:
                return statistics.fmean(r[key] for r in runs)
            if len(runs) > 1:  # across seeds: SE of the mean of the per-seed results
                se = statistics.stdev(r["after"] for r in runs) / len(runs) ** 0.5
                after = f"{mean('after'):.3f} ± {se:.3f} (over seeds)"
            else:
                after = f"{runs[0]['after']:.3f} ± {runs[0]['after_se']:.3f}"
            gains = [r for r in runs if r.get("gain_se")]
            z = "; ".join(f"{r['gain']:+.3f} ({r['gain'] / r['gain_se']:.1f})" for r in gains) or "–"
            lines.append(f"| {task} | {agent} | {len(runs)} | {mean('before'):.3f} | {after} | {z} | {mean('kl'):.2f} "
                         f"| {mean('wall_s'):.0f} | {mean('peak_mb'):.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for agent in AGENTS:
            runs = [r for r in rows if r["task"] == task and r["agent"] == agent]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            mean = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", ms=3, label=f"{agent} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        ax.set_title(f"{task}: training reward (mean score of each batch)")
        ax.set_xlabel("generated tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(argv[1], argv[2], int(argv[3]), Path(argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds of the toy task")
    ap.add_argument("--default-seeds", nargs="+", type=int, default=[1],
                    help="seeds of the SmolLM2 tasks (default, arithmetic)")
    ap.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
    ap.add_argument("--out", type=Path, default=Path("runs/compare_agents"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = [json.loads(x) for x in results.read_text().splitlines()] if results.is_file() else []
    for task in args.tasks:
        for seed in (args.seeds if task == "toy" else args.default_seeds):
            for agent in args.agents:
                if any(r["task"] == task and r["agent"] == agent and r["seed"] == seed for r in done):
                    continue  # resumable: finished runs are kept
                row = run_one(task, agent, seed, args.out / f"{task}__{agent}__s{seed}")
                done.append(row)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{task} {agent} seed {seed}: {row['before']:.3f} -> {row['after']:.3f} ± {row['after_se']:.3f} "
                      f"(kl={row['kl']:.2f}) in {row['wall_s']:.0f} s, peak {row['peak_mb']:.0f} MB", flush=True)
    table = summarise(done)
    (args.out / "compare_agents.md").write_text(table)
    plot(done, args.out / "compare_agents.png")
    print(table)


if __name__ == "__main__":
    main()
