"""Behaviour is preserved: fixed-seed runs recorded before the redesign (tests/golden/, see runs.py there) are
reproduced metric for metric (1e-6), with the same held-out line and samples.

The numbers depend on the machine's float kernels and library versions as well as on the code (a sampled
token that flips changes the rest of a run), so the comparison runs where the recording's environment is
this one (each run keeps a recording per environment, tests/golden/<name>/<label>/); elsewhere the test says
which environments have one."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import runs  # noqa: E402


@pytest.mark.parametrize("name", list(runs.RUNS))
def test_golden_run_is_reproduced(tmp_path, name):
    golden = runs.load(name)
    if golden is None:
        pytest.skip(f"golden {name} has no recording for this environment ({runs.environment()}); recorded in: "
                    f"{runs.recordings(name)} (record one on the commit before a refactor to check it here)")
    diffs = runs.differences(golden, runs.run(name, tmp_path / "run"))
    assert not diffs, "\n".join(diffs[:20])


def test_recordings_are_found_by_their_environment():
    recorded = runs.recordings("ppo_toy")
    assert recorded and all(runs.label(env) == folder for folder, env in recorded.items())  # folders named by env
    env = next(iter(recorded.values()))
    assert runs.load("ppo_toy", env)["environment"] == env
    assert runs.load("ppo_toy", {**env, "torch": "0.0"}) is None  # another library version: no recording
