"""The GPU check's dry run: the steps of benchmarks/gpu_check.sh on this machine's CPU with tiny sizes (all but
ppo_vs_trl, which needs trl, and train_lora_1.7b, the same command as train_lora at the dry run's one tiny shape), so
the script is known to work before a GPU is lent (its real run cannot be tested here)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"tests", "decoders", "continuous", "multi_turn", "rollout", "kl_bias", "train_lora", "train_full",
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
    assert "| 4 | 8 | textrl dynamic, every row kept |" in summary  # the variable-length table (2 batches of 4)
    assert "| 4 | 8 | textrl continuous (4 slots) |" in summary and "step bound" in summary  # 8 through 4 slots
    assert "continuous batching's floor for its episodes" in summary
    assert "| 4 | 8 | textrl continuous, static (4 slots) |" in summary  # the static cache through slots, twice
    assert "EOS at a rate of 0.2 per step" in summary  # the continuous step (random weights stop at that rate)
    assert "prefill of 8 rows" in summary and "passed" in summary  # the shared-prefix ratio; the tests ran
    assert "| fp32 | " in summary and "| bf16 | " in summary  # sampling in bf16 and the KL
    figures = (tmp_path / "figures.md").read_text().splitlines()
    assert len(figures) == 4 and all(line.startswith("| ") for line in figures), figures  # the 4 train runs


def test_the_floor_of_continuous_batching_refills_each_freed_row_at_once(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from fast_rollouts import greedy_steps

    # in start order: row a takes 3; row b takes 1, then 2 (free at 3); the last 2 starts at 3 and ends at 5 —
    # a packing that knew the lengths (3 + 1 | 2 + 2) would take 4
    assert greedy_steps([3, 1, 2, 2], 2) == 5
    assert greedy_steps([5, 3, 2, 4], 2) == 9 and greedy_steps([1] * 8, 4) == 2 and greedy_steps([10], 3) == 10


def test_the_tests_named_first_are_collected_first():
    """TEXTRL_TEST_FIRST (tests/conftest.py): the GPU check runs the decoder tests before the rest, so a suite cut
    short by its time limit has run them; the others keep their order."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "TEXTRL_TEST_FIRST": "tests/test_generate.py tests/test_fast_decoding.py::test_a_compiler"}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_advantages.py", "tests/test_fast_decoding.py", "tests/test_generate.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300).stdout.splitlines()
    ids = [line for line in out if "::" in line]
    files = [i.split("::")[0] for i in ids]
    n = files.count("tests/test_generate.py")
    assert n > 3 and set(files[:n]) == {"tests/test_generate.py"}, ids[:n + 2]
    assert ids[n].startswith("tests/test_fast_decoding.py::test_a_compiler")
    rest = [f for f in files[n:] if f != "tests/test_generate.py"]
    assert rest[1:] == sorted(rest[1:], key=["tests/test_advantages.py", "tests/test_fast_decoding.py"].index)
