"""The `textrl` command: config layering, bad input caught before training, and a real run in a subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from textrl.cli import main, resolve_train_config
from textrl.train import make_run


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
        (["--env", "CartPole-v1", "--device", "banana"], ["device", "'banana'", "--device auto"]),
        (["--env", "CartPole-v1", "--device", "cuda:x"], ["device", "'cuda:x'", "'cuda:N'"]),
        (["--env", "no_such_module_x:Maze-v0"], ["env 'no_such_module_x:Maze-v0'", "cannot import module", "PYTHONPATH"]),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(capsys, tmp_path, argv, expected):
    code, err = run_cli(capsys, *argv, "--output-dir", str(tmp_path / "run"))
    assert code == 2
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines where torch sees no GPU")
def test_cuda_without_a_gpu_is_refused_and_auto_takes_the_cpu(capsys, tmp_path):
    code, err = run_cli(capsys, "--env", "textrl/TargetToken-v0", "--device", "cuda", "--output-dir", str(tmp_path))
    assert code == 2 and "device='cuda'" in err and "no CUDA GPU" in err and "--device auto" in err, err
    cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--output-dir", str(tmp_path)])
    assert cfg.device == "auto"  # the default: the GPU where torch sees one
    assert make_run(cfg, quiet=True).device == torch.device("cpu")


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
    assert default.env == "textrl/Cheerful-v0" and default.model.lora_r == 16 and default.agent == "ppo"
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


def test_config_sections_and_the_flat_keys_of_older_configs(tmp_path):
    """Text-only fields live in sections (model, sampling, kl, eval); the flat keys of configs written before
    (and their flags) still resolve to the same config; a field given both ways, or GRPO's moved `beta`, fails
    with a message naming the new key."""
    from textrl.config import KLConfig, TrainConfig

    flat = {"env": "textrl/TargetToken-v0", "model": "textrl/tiny-char-gpt2", "lora_r": 4, "temperature": 0.7,
            "kl_coef": 0.2, "reference_pass": "per_token", "eval_generations": 3}
    nested = {"env": "textrl/TargetToken-v0", "model": {"name": "textrl/tiny-char-gpt2", "lora_r": 4},
              "sampling": {"temperature": 0.7}, "kl": {"coef": 0.2, "reference_pass": "per_token"},
              "eval": {"generations": 3}}
    configs = []
    for name, data in (("flat", flat), ("nested", nested)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        configs.append(resolve_train_config([str(path)])[0])
    assert configs[0] == configs[1]
    cfg = configs[0]
    assert (cfg.model.name, cfg.model.lora_r, cfg.sampling.temperature, cfg.kl.coef, cfg.eval.generations) == \
        ("textrl/tiny-char-gpt2", 4, 0.7, 0.2, 3)
    # flags (flat names) over the file's sections, field by field
    cfg, _ = resolve_train_config([str(tmp_path / "nested.yaml"), "--kl-coef", "0.3", "--top-k", "5"])
    assert cfg.kl.coef == 0.3 and cfg.kl.reference_pass == "per_token" and cfg.sampling.top_k == 5
    # the Python API takes sections as dataclasses or mappings
    assert TrainConfig(kl={"coef": 0.1}).kl == KLConfig(coef=0.1)
    with pytest.raises(TypeError, match="kl: expected a KLConfig"):
        TrainConfig(kl=5)
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"env": "textrl/TargetToken-v0", "kl_coef": 0.1, "kl": {"coef": 0.2}}))
    with pytest.raises(ValueError, match=r"kl_coef and kl.coef are the same field, given twice"):
        resolve_train_config([str(both)])
    old_grpo = tmp_path / "grpo.yaml"
    old_grpo.write_text(yaml.safe_dump({"env": "textrl/TargetToken-v0", "agent": "grpo", "grpo": {"beta": 0.1}}))
    for argv in ([str(old_grpo)], ["--env", "textrl/TargetToken-v0", "--agent", "grpo", "--beta", "0.1"]):
        with pytest.raises(ValueError, match=r"now the run's kl.coef.*--kl-coef"):
            resolve_train_config(argv)
    # a run directory written before the sections resumes: its flat config.yaml is read
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**flat, "agent": "ppo", "agent_config": {"num_epochs": 2}}))
    cfg, resume = resolve_train_config(["--resume", str(run)])
    assert resume and cfg.kl.coef == 0.2 and cfg.output_dir == str(run) and cfg.agent_config["num_epochs"] == 2


def test_section_objects_null_sections_and_loss_kl_settings(tmp_path):
    from textrl.config import KLConfig, TrainConfig, from_dict
    from textrl.train import make_run

    cfg = from_dict(TrainConfig, {"kl": KLConfig(coef=0.3), "kl_target": 1.0})  # an object and a flat key merge
    assert (cfg.kl.coef, cfg.kl.target) == (0.3, 1.0)
    nulls = tmp_path / "nulls.yaml"
    nulls.write_text(yaml.safe_dump({"env": "textrl/TargetToken-v0", "eval": None, "kl": None}))
    cfg, _ = resolve_train_config([str(nulls)])
    assert cfg.eval.generations == 1 and cfg.kl.coef == 0.001  # null: the defaults (and the preset's β)
    # GRPO's KL is a loss term: an adaptive target for a reward penalty makes no sense there
    cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--agent", "grpo", "--kl-target", "1.0",
                                   "--output-dir", str(tmp_path / "grpo")])
    with pytest.raises(ValueError, match="kl.target=1.0: .*grpo puts the KL in its loss"):
        make_run(cfg, quiet=True)
    # PPO with grouped prompts from env_kwargs (PPO itself asks for no k)
    cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--env-kwargs", "{num_generations: 4}",
                                   "--output-dir", str(tmp_path / "ppo")])
    assert make_run(cfg, quiet=True).base.num_generations == 4


MY_ENVS = '''import gymnasium as gym
gym.register(id="MyShortCart-v0", entry_point="gymnasium.envs.classic_control:CartPoleEnv", max_episode_steps=20)
'''


def test_env_from_the_users_module_with_the_console_script(tmp_path):
    """`--env module:Id` imports the module from the working directory, as gymnasium.make does — also under
    the `textrl` console script, whose sys.path does not start at the working directory."""
    (tmp_path / "my_envs_x.py").write_text(MY_ENVS)
    script = os.path.join(os.path.dirname(sys.executable), "textrl")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "textrl"]
    proc = subprocess.run([*cmd, "train", "--env", "my_envs_x:MyShortCart-v0", "--total-steps", "512",
                           "--output-dir", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    episodes = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert episodes and all(m["env/episode_length"] <= 20 for m in episodes)  # the user's registration ran
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["env"] == "my_envs_x:MyShortCart-v0"
