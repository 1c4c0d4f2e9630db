"""The Python API with objects a config file cannot hold: reward functions in ``env_kwargs`` are recorded in
config.yaml by their import path (a resumed run finds them again) or, when they have none, by their repr —
never a crash after the model has loaded."""

import dataclasses
import math

import pytest
import torch
import yaml

from textrl.config import TrainConfig, import_path, to_dict
from textrl.train import train


def share_of_e(prompts, completions):
    return torch.tensor([c.count("e") / max(len(c), 1) for c in completions])


def test_import_path_round_trips_only_for_importable_objects():
    assert import_path(share_of_e) == f"{__name__}:{share_of_e.__name__}"
    assert import_path(TrainConfig) == "textrl.config:TrainConfig"
    assert import_path(lambda p, c: p) is None
    assert import_path(object()) is None
    big = torch.nn.Linear(2, 2)
    out = to_dict(TrainConfig(env="textrl/TargetToken-v0", env_kwargs={"scorer": big, "target": ("a", 1)}))
    assert out["env_kwargs"]["target"] == ["a", 1]
    assert out["env_kwargs"]["scorer"] == repr(big)  # recorded, not deep-copied


@pytest.mark.parametrize("scorer", [share_of_e, lambda prompts, completions: share_of_e(prompts, completions)],
                         ids=["function", "lambda"])
def test_reward_function_in_env_kwargs_trains_and_is_recorded(tmp_path, scorer):
    cfg = TrainConfig(env="textrl/TargetToken-v0", num_envs=8, total_steps=256, output_dir=str(tmp_path / "run"),
                      env_kwargs={"scorer": scorer})
    result = train(cfg, quiet=True)
    assert result.updates == 2 and result.after is not None
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["env_kwargs"]["scorer"]
    if scorer is share_of_e:
        assert saved == f"{__name__}:share_of_e"
        # the recorded path is what a resumed run uses: resume and train 2 more updates with it
        more = TrainConfig(env="textrl/TargetToken-v0", num_envs=8, total_steps=512, output_dir=str(tmp_path / "run"),
                           env_kwargs={"scorer": saved})  # (the env's preset fills the rest, as it did for the run)
        assert train(more, resume=True, quiet=True).updates == 4
        # dataclasses.replace gives every field (so no preset): the settings that differ are named, not used
        with pytest.raises(ValueError, match=r"kl\.coef: 0\.001 \(the run\) -> 0\.05 \(given\)"):
            train(dataclasses.replace(more, total_steps=768), resume=True, quiet=True)
    else:
        assert saved.startswith("<function")


def test_readme_python_quick_start_runs_and_learns(tmp_path, monkeypatch):
    from helpers import run_readme_snippet

    result = run_readme_snippet("python-quickstart", tmp_path, monkeypatch)["result"]
    assert (tmp_path / result.output_dir / "config.yaml").is_file() and result.output_dir.parts[0] == "runs"
    assert result.after.mean > result.before.mean + 3 * max(result.after.se, result.before.se)  # it learned


def test_readme_custom_reward_example_learns_from_the_dataset_column_and_saves(tmp_path, monkeypatch):
    from helpers import run_readme_snippet
    from transformers import AutoModelForCausalLM

    from textrl.lm.evaluate import paired_gain

    namespace = run_readme_snippet("python-custom-reward", tmp_path, monkeypatch)
    result = namespace["result"]
    gain, se = paired_gain(result.before, result.after)
    # the same 8 prompts before and after: the letter each one asks for got more frequent (seeds 1-4 of this
    # setting: gains 0.21-0.52, 2.4-3.9 standard errors; a random policy's share is ~0.03)
    assert gain > 0.15 and gain > 2 * se
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "letters-model") is not None


def test_readme_sb3_style_example_learns_cartpole(tmp_path, monkeypatch):
    import gymnasium as gym
    from helpers import run_readme_snippet

    from textrl.api import PPO

    model = run_readme_snippet("python-sb3", tmp_path, monkeypatch)["model"]
    loaded = PPO.load(tmp_path / "cartpole-ppo")
    env, total = gym.make("CartPole-v1"), 0.0
    obs, _ = env.reset(seed=7)
    for _ in range(500):  # one greedy episode with the saved, reloaded policy
        action, _ = loaded.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, _ = env.step(int(action))
        total += reward
        if terminated or truncated:
            break
    assert model.num_timesteps >= 30_000 and total >= 300  # a random policy lasts ~20 steps


@pytest.mark.parametrize("env", ["CartPole-v1", "textrl/TargetToken-v0"])
def test_presets_apply_from_python_as_from_the_cli(env):
    from textrl.cli import resolve_train_config
    from textrl.presets import with_preset

    from_cli, _ = resolve_train_config(["--env", env, "--total-steps", "30000"])
    from_python = with_preset(TrainConfig(env=env, total_steps=30000))
    assert to_dict(from_python) == to_dict(from_cli)  # the same run, field by field
    assert with_preset(from_cli) is from_cli  # a CLI config already holds its preset
    assert from_python.agent_config  # the preset's tuned agent fields are there


def test_what_the_caller_gives_wins_over_the_preset():
    from textrl.presets import with_preset

    given = TrainConfig(env="textrl/TargetToken-v0", num_envs=4, kl={"coef": 0.5},
                        agent_config={"learning_rate": 0.01})
    cfg = with_preset(given)
    assert (cfg.num_envs, cfg.kl.coef, cfg.agent_config["learning_rate"]) == (4, 0.5, 0.01)
    assert cfg.total_steps == 4096 and cfg.agent_config["num_minibatches"] == 2 and cfg.model.bf16 is False
    assert given.total_steps == 100_000 and given.agent_config == {"learning_rate": 0.01}  # not mutated


def test_any_hugging_face_sequence_classifier_is_a_reward_model(tmp_path):
    from textrl.envs.scorers import HFRewardModelScorer
    from textrl.envs.toy import char_tokenizer
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from textrl.lm.build import load_reward_model

    tok = char_tokenizer()
    torch.manual_seed(0)
    rm = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, num_labels=1,
                                                  pad_token_id=tok.pad_token_id)).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scorer = load_reward_model(str(tmp_path / "rm"), "cpu")
    assert isinstance(scorer, HFRewardModelScorer)
    enc = tok(["ab cd"], return_tensors="pt")
    with torch.no_grad():
        expected = rm(**enc).logits[0, 0]
    torch.testing.assert_close(scorer(["ab"], [" cd"])[0], expected)
    cfg = TrainConfig(env="textrl/TargetToken-v0", num_envs=8, total_steps=128, output_dir=str(tmp_path / "run"),
                      model={"reward_model": str(tmp_path / "rm")})
    result = train(cfg, quiet=True)
    assert result.updates == 1 and result.history[0]["reward/score_std"] > 0  # the classifier's scores
    with pytest.raises(ValueError, match="neither a `textrl train-rm` directory"):
        load_reward_model(str(tmp_path / "run"), "cpu")


def test_quiet_prints_nothing_and_the_held_out_results_reach_tensorboard(tmp_path, capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(env="textrl/TargetToken-v0", num_envs=8, total_steps=256, output_dir=str(tmp_path))
    result = train(cfg, quiet=True)
    err = capfd.readouterr().err
    assert "| agent |" not in err and "step 256/256" not in err and "held-out" not in err, err[-2000:]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    before, after = events.Scalars("eval/reward_mean")
    assert (before.step, after.step) == (0, result.global_step)
    assert math.isclose(before.value, result.before.mean, rel_tol=1e-6)
    assert math.isclose(after.value, result.after.mean, rel_tol=1e-6)
    assert "eval/samples/text_summary" in events.Tags()["tensors"]


def test_given_fields_survive_copies_and_subclasses_and_replace_means_all_given():
    import copy
    import pickle

    from textrl.config import given_fields
    from textrl.presets import with_preset

    cfg = TrainConfig(env="textrl/TargetToken-v0", seed=2)
    assert given_fields(cfg) == {"env", "seed"}
    assert given_fields(pickle.loads(pickle.dumps(cfg))) == given_fields(copy.deepcopy(cfg)) == {"env", "seed"}

    @dataclasses.dataclass
    class MyConfig(TrainConfig):
        note: str = ""

    assert given_fields(MyConfig(env="textrl/TargetToken-v0", note="x")) == {"env", "note"}
    swept = dataclasses.replace(cfg, seed=3)  # every field given: no preset rather than half of one
    assert with_preset(swept) is swept
    assert with_preset(cfg).num_envs == 16 and with_preset(cfg).seed == 2


def test_int_keys_stay_int_in_the_recorded_config():
    out = to_dict(TrainConfig(env="textrl/TargetToken-v0", env_kwargs={"bonus": {7: 1.0}}))
    assert yaml.safe_load(yaml.safe_dump(out))["env_kwargs"]["bonus"] == {7: 1.0}


def test_an_import_error_inside_the_users_module_is_reported_as_such(tmp_path, monkeypatch):
    from textrl.imports import load_attr

    (tmp_path / "my_broken_mod_x.py").write_text("import gym_extra_not_installed_x\nscore = None\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="importing module 'my_broken_mod_x' failed.*gym_extra_not_installed_x"):
        load_attr("my_broken_mod_x:score", "scorer")


def test_resume_without_samples_and_with_a_foreign_sampling_stream(tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    from textrl.checkpoint import _write_manifest

    cfg = TrainConfig(env="textrl/TargetToken-v0", num_envs=8, total_steps=256, output_dir=str(tmp_path))
    train(cfg, quiet=True)
    (tmp_path / "samples.md").unlink()  # as if the first session had stopped before its end
    path = tmp_path / "checkpoint" / "sampler.safetensors"
    # a stream of the other device type: a CUDA state is 16 bytes, a CPU one 5056 (the run may be on either)
    cuda_saved = load_file(str(path))["state"].numel() == 16
    foreign = torch.Generator().get_state() if cuda_saved else torch.zeros(16, dtype=torch.uint8)
    save_file({"state": foreign}, str(path))
    _write_manifest(path.parent)  # as a checkpoint written on the other device type would be (complete, verified)
    capfd.readouterr()
    more = TrainConfig(env="textrl/TargetToken-v0", num_envs=8, total_steps=512, output_dir=str(tmp_path))
    result = train(more, resume=True, quiet=True)
    assert result.updates == 4 and result.before is None and result.after is not None
    err = capfd.readouterr().err
    assert "warning: the saved sampling stream is from another device type" in err, err[-2000:]
