"""The GPU check's dry run: the steps of benchmarks/gpu_check.sh on this machine's CPU with tiny sizes (all but
ppo_vs_trl, which needs trl, and train_lora_1.7b, the same command as train_lora at the dry run's one tiny shape), so
the script is known to work before a GPU is lent (its real run cannot be tested here)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"tests", "decoders", "multi_turn", "rollout", "train_lora", "train_full",
         "train_multi_turn", "train_slots"}


def test_the_gpu_check_dry_run_runs_its_steps_and_writes_its_summary(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    rows = [line.split("|")[1:4] for line in (tmp_path / "steps.md").read_text().splitlines()[2:]]
    codes = {name.strip(): code.strip() for name, code, _ in rows}
    assert set(codes) == STEPS and set(codes.values()) == {"0"}, (codes, proc.stdout[-3000:])
    summary = (tmp_path / "summary.md").read_text()
    for run in ("| generate |", "| textrl dynamic |", "| textrl static |"):  # the decoders' table
        assert run in summary, summary
    assert "| 4 | textrl dynamic, every row kept |" in summary  # the variable-length table
    assert "prefill of 8 rows" in summary and "passed" in summary  # the shared-prefix ratio; the tests ran
    figures = (tmp_path / "figures.md").read_text().splitlines()
    assert len(figures) == 4 and all(line.startswith("| ") for line in figures), figures  # the 4 train runs
