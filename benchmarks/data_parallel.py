"""One process vs N data-parallel processes at the same global batch, same config, same machine.

    python benchmarks/data_parallel.py [--tasks toy smollm2] [--processes 2] [--updates 4]

Each task runs ``textrl train`` twice in subprocesses: once on one process (torch using every core), once as
``textrl train --num-processes N`` (torchrun; gloo on CPU; each process gets cores/N threads). Both step the
same global batch (``num_envs`` rows), so the printed ratio is throughput (generated tokens per second over the
training updates, evaluation excluded) of N processes over one. The runs also print their final ``held-out
reward`` line: with ``num_minibatches: 1`` the two runs are the same computation split differently.

What this can show on a CPU box: whether splitting the batch across processes costs or gains when both share
the same cores (the synchronisation overhead, and per-process efficiency at smaller batches). It cannot
show GPU scaling: on N GPUs each process has its own device, and the rollout (the dominant cost) divides by N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = {
    # the toy task: tiny char-level GPT-2, 32 rows x 16 tokens
    "toy": ["--env", "textrl/TargetToken-v0", "--num-envs", "32", "--num-minibatches", "1", "--num-epochs", "2"],
    # the default task's model: SmolLM2-135M + LoRA, 16 rows x 24 tokens
    "smollm2": ["--num-envs", "16", "--num-minibatches", "1", "--num-epochs", "2", "--eval-generations", "1",
                "--eval-samples", "0"],
}
TOKENS_PER_UPDATE = {"toy": 32 * 16, "smollm2": 16 * 24}


def run(task: str, processes: int, updates: int, out: Path) -> tuple[float, float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cores = os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(max(cores // processes, 1))
    args = [*TASKS[task], "--total-steps", str(updates * TOKENS_PER_UPDATE[task]), "--output-dir", str(out),
            "--torch-threads", env["OMP_NUM_THREADS"]]
    if processes > 1:
        args += ["--num-processes", str(processes)]
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "textrl"), "train", *args], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{task} on {processes} process(es) failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next((x for x in proc.stderr.splitlines() if x.startswith("held-out reward:")), "")
    return rows[-1]["time/tokens_per_s"], wall, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--updates", type=int, default=4)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.updates} updates per run; tokens/s over the training loop "
          "(held-out evaluation excluded)")
    for task in args.tasks:
        with tempfile.TemporaryDirectory() as tmp:
            one = run(task, 1, args.updates, Path(tmp) / "one")
            many = run(task, args.processes, args.updates, Path(tmp) / "many")
        print(f"{task}: 1 process {one[0]:.0f} tok/s ({one[1]:.0f} s wall) | {args.processes} processes "
              f"{many[0]:.0f} tok/s ({many[1]:.0f} s wall) | ratio {many[0] / one[0]:.2f}x")
        print(f"  1 process:   {one[2]}\n  {args.processes} processes: {many[2]}")


if __name__ == "__main__":
    main()
