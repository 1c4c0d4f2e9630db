"""The `textrl` command: config layering, bad input caught before training, and a real run in a subprocess."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from textrl.cli import main, resolve_train_config


def run_cli(capsys, *argv):
    try:
        code = main(["train", *argv])
    except SystemExit as exc:  # argparse's own errors (a flag value of the wrong type)
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--agent", "dqn"], ["agent", "'dqn'", "ppo", "register_agent"]),
        (["--env", "CartPol-v1"], ["env", "'CartPol-v1'", "CartPole-v1", "gymnasium.register"]),
        (["--env", "Pendulum-v1"], ["Discrete action space", "Box", "DiscretizeAction"]),
        (["--env", "CartPole-v1", "--num-minibatches", "3"], ["num_minibatches=3", "8 × 32 = 256", "[1, 2, 4, 8"]),
        (["--env", "CartPole-v1", "--total-steps", "-5"], ["total_steps", "-5", "positive integer"]),
        (["--env", "CartPole-v1", "--total-steps", "0"], ["total_steps", "got 0"]),
        (["--env", "CartPole-v1", "--num-epochs", "0"], ["num_epochs", "got 0"]),
        (["--env", "CartPole-v1", "--gamma", "1.5"], ["gamma", "[0, 1]", "1.5"]),
        (["--env", "CartPole-v1", "--seed", "abc"], ["seed", "int", "'abc'"]),
        (["no_such_config.yaml"], ["no such file", "no_such_config.yaml"]),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(capsys, tmp_path, argv, expected):
    code, err = run_cli(capsys, *argv, "--output-dir", str(tmp_path / "run"))
    assert code == 2
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing started


def test_unknown_flag_and_command(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--env", "CartPole-v1", "--no-such-field", "1"])
    assert "unrecognized arguments: --no-such-field" in capsys.readouterr().err
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_config_layers_defaults_preset_file_flags(tmp_path, monkeypatch):
    from textrl.agents import AGENTS

    monkeypatch.setitem(AGENTS, "rloo", "textrl.agents.ppo:PPO")  # another registered agent's section is ignored
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"env": "CartPole-v1", "seed": 5, "ppo": {"num_epochs": 3, "gamma": 0.9},
                                        "rloo": {"whatever": 1}}))
    cfg, _ = resolve_train_config([str(cfg_file), "--gamma", "0.95", "--num_envs", "4"])
    assert cfg.seed == 5  # file over default
    assert cfg.num_envs == 4  # flag over preset (8)
    assert cfg.agent_config["num_steps"] == 32  # from the CartPole preset
    assert cfg.agent_config["num_epochs"] == 3  # file over preset (20)
    assert cfg.agent_config["gamma"] == 0.95  # flag over file
    # no arguments: the embedded default experiment
    default, _ = resolve_train_config([])
    assert default.env == "textrl/Cheerful-v0" and default.lora_r == 16 and default.agent == "ppo"
    assert default.agent_config["gamma"] == 1.0  # the RLHF seed's defaults in the embedded experiment


def test_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for text in ("--total-steps", "--clip-range-vf", "Value clip", "--num-minibatches", "must divide"):
        assert text in out


def test_train_subprocess_writes_config_metrics_and_events(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "textrl", "train", "--env", "CartPole-v1", "--total-steps", "1024",
         "--seed", "3", "--output-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "final: mean return of the last 20 episodes" in proc.stderr
    assert "| ppo.num_epochs | 20 |" in proc.stderr or "| agent_config.num_epochs | 20 |" in proc.stderr
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["seed"] == 3 and resolved["agent_config"]["num_steps"] == 32
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["global_step"] for m in lines] == [256, 512, 768, 1024]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoint" / "model.safetensors").is_file()
