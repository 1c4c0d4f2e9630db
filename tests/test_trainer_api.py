"""The Python API (textrl.api): Trainer with model objects, several weighted reward functions and datasets;
the SB3-style PPO (learn / predict / save / load); run directories that are never mixed; kept checkpoints."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from textrl.envs.scorers import WeightedRewards, call_scorer
from textrl.envs.toy import char_tokenizer, tiny_model

from textrl.api import PPO, Trainer, reward_scorer
from textrl.config import TrainConfig

PROMPTS = ["say e", "say a", "write", "go on"]


def share_of_e(prompts, completions):
    return torch.tensor([c.count("e") / max(len(c), 1) for c in completions])


def length(prompts, completions):
    return [len(c) / 10 for c in completions]


def test_weighted_rewards_sum_and_pass_the_columns_each_function_names():
    seen = {}

    def exact(prompts, completions, answer):  # names one column
        seen["exact"] = answer
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    def anything(prompts, completions, **kwargs):  # TRL style: every column
        seen["kwargs"] = sorted(kwargs)
        return [1.0] * len(completions)

    scorer = WeightedRewards([exact, anything, length], [2.0, 0.5, 1.0])
    scores = call_scorer(scorer, ["p", "q"], ["x", "yy"], {"answer": ["x", "z"], "level": [1, 2]})
    assert scores.tolist() == pytest.approx([2 * 1 + 0.5 + 0.1, 0 + 0.5 + 0.2])
    assert seen == {"exact": ["x", "z"], "kwargs": ["answer", "level"]}
    assert scorer.last == pytest.approx({"exact": 0.5, "anything": 1.0, "length": 0.15})
    assert call_scorer(share_of_e, ["p"], ["ee"], {"answer": ["e"]}).tolist() == [1.0]  # a plain scorer: no columns


def test_reward_scorer_rejects_bad_input_with_the_fix():
    with pytest.raises(ValueError, match="reward_weights: 1 weights for 2 reward functions"):
        reward_scorer([share_of_e, length], [1.0])
    with pytest.raises(TypeError, match=r"needs its tokenizer: pass \(Linear, tokenizer\)"):
        reward_scorer(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="reward_funcs: expected a function"):
        reward_scorer(3)
    with pytest.raises(ValueError, match="non-finite"):
        WeightedRewards([lambda p, c: [float("nan")] * len(c)])(["p"], ["c"])


def test_trainer_trains_a_model_object_in_place_with_weighted_rewards(tmp_path):
    model, tokenizer = tiny_model(seed=3), char_tokenizer()
    start = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, reward_funcs=[share_of_e, length], reward_weights=[1.0, 0.1], train_dataset=PROMPTS,
                      eval_dataset=PROMPTS[:2], tokenizer=tokenizer, quiet=True,
                      args=TrainConfig(total_steps=256, num_envs=8, output_dir=str(tmp_path / "run"),
                                       env_kwargs={"max_new_tokens": 8}))
    assert trainer.config.env == "textrl/TextGen-v0"
    result = trainer.train()
    assert result.updates == 4 and result.before is not None and result.after is not None
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))  # trained in place
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["name"] == "<GPT2LMHeadModel object>"
    assert saved["env_kwargs"]["scorer"] == "WeightedRewards(1·share_of_e, 0.1·length)"
    again = trainer.evaluate()  # the same weights and sampling seed: the after-training evaluation again
    assert again.scores == pytest.approx(result.after.scores)
    with pytest.raises(RuntimeError, match="trained already"):
        trainer.train()


def test_trainer_save_pretrained_merges_lora_into_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = Trainer("textrl/tiny-char-gpt2", reward_funcs=share_of_e, train_dataset=PROMPTS, quiet=True,
                      args={"total_steps": 128, "num_envs": 8, "output_dir": str(tmp_path / "run"), "lora_r": 4,
                            "lora_targets": "c_attn", "env_kwargs": {"max_new_tokens": 8}})
    trainer.train()
    path = trainer.save_pretrained(tmp_path / "merged", merged=True)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    lm = trainer.build().policy.lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert trainer.build().policy.is_lora  # merging worked on a copy: the run still has its adapters


def test_sb3_style_ppo_learns_on_predicts_saves_and_loads(tmp_path):
    model = PPO("CartPole-v1", output_dir=str(tmp_path / "run"), num_envs=4, num_steps=64, num_minibatches=2)
    model.learn(512).learn(512)  # the second call continues the same run from its checkpoint
    assert model.num_timesteps == 1024
    steps = [json.loads(x)["global_step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [256, 512, 768, 1024]
    obs, _ = gym.make("CartPole-v1").reset(seed=0)
    action, state = model.predict(obs, deterministic=True)
    logits, _ = model.policy(torch.as_tensor(obs, dtype=torch.float32)[None])
    assert state is None and int(action) == int(logits.argmax())
    model.save(tmp_path / "saved")
    loaded = PPO.load(tmp_path / "saved")
    batch = np.stack([obs, -obs, obs * 2])
    assert loaded.predict(batch, deterministic=True)[0].tolist() == model.predict(batch, deterministic=True)[0].tolist()
    assert loaded.learn(256).num_timesteps == 1280  # and it goes on learning in its run directory


def test_sb3_style_ppo_refuses_text_envs_and_bad_budgets(tmp_path):
    with pytest.raises(TypeError, match="textrl.Trainer"):
        PPO("textrl/TargetToken-v0", output_dir=str(tmp_path / "r")).learn(100)
    with pytest.raises(ValueError, match="total_timesteps must be a positive integer"):
        PPO("CartPole-v1").learn(0)
    with pytest.raises(RuntimeError, match="learn"):
        PPO("CartPole-v1").predict(np.zeros(4))


def _toy(tmp_path, **fields):
    return TrainConfig(env="textrl/TargetToken-v0", num_envs=8, output_dir=str(tmp_path / "run"), **fields)


def test_an_existing_run_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    from textrl.train import train

    train(_toy(tmp_path, total_steps=256), quiet=True)
    with pytest.raises(ValueError, match=r"holds a run already .*--resume .*--overwrite"):
        train(_toy(tmp_path, total_steps=128), quiet=True)
    train(_toy(tmp_path, total_steps=128, overwrite=True), quiet=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["global_step"] for x in lines] == [128]  # only the new run's update


def test_resume_drops_metrics_written_after_the_checkpoint_and_keeps_n_checkpoints(tmp_path):
    from textrl.train import train

    train(_toy(tmp_path, total_steps=256, checkpoint_every=1, keep_checkpoints=2), quiet=True)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint", "checkpoint-1"]
    with open(run / "metrics.jsonl", "a") as f:  # a crashed session's updates after the last checkpoint
        f.write(json.dumps({"global_step": 384}) + "\n")
    train(_toy(tmp_path, total_steps=512, checkpoint_every=1, keep_checkpoints=2), resume=True, quiet=True)
    steps = [json.loads(x)["global_step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [128, 256, 384, 512]
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint", "checkpoint-3"]
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["update"] == 3


def test_bare_bool_flags_and_help_shows_what_a_bare_train_runs(capsys):
    from textrl.cli import main, resolve_train_config

    cfg, _ = resolve_train_config(["--env", "CartPole-v1", "--overwrite", "--seed", "3"])
    assert cfg.overwrite is True and cfg.seed == 3
    cfg, _ = resolve_train_config(["--env", "CartPole-v1", "--overwrite", "false"])
    assert cfg.overwrite is False
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "bare `textrl train`: textrl/Cheerful-v0" in out and "bare `textrl train`: 32" in out
