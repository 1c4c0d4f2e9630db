"""The Python API (textrl.api): Trainer with model objects, several weighted reward functions and datasets;
the SB3-style PPO (learn / predict / save / load); run directories that are never mixed; kept checkpoints."""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from textrl.envs.scorers import WeightedRewards, call_scorer
from textrl.envs.toy import char_tokenizer, tiny_gpt2, tiny_model

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
    assert scorer.take_means() == pytest.approx({"exact": 0.5, "anything": 1.0, "length": 0.15})
    assert scorer.take_means() == {}  # since the last call: nothing scored
    assert call_scorer(share_of_e, ["p"], ["ee"], {"answer": ["e"]}).tolist() == [1.0]  # a plain scorer: no columns


def test_reward_scorer_rejects_bad_input_with_the_fix():
    with pytest.raises(ValueError, match="reward_weights: 1 weights for 2 reward functions"):
        reward_scorer([share_of_e, length], [1.0])
    with pytest.raises(TypeError, match=r"needs its tokenizer: pass \(Linear, tokenizer\)"):
        reward_scorer(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="reward_funcs: expected functions, reward model names"):
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
    # trained in place (on a GPU, `device: auto` moved the user's model there, as TRL's trainers do)
    assert any(not torch.equal(a, b.detach().cpu()) for a, b in zip(start, model.parameters(), strict=True))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["name"] == "<GPT2LMHeadModel object>"
    assert saved["env_kwargs"]["scorer"] == "WeightedRewards(1·share_of_e, 0.1·length)"
    again = trainer.evaluate()  # the same weights and sampling seed: the after-training evaluation again
    assert again.scores == pytest.approx(result.after.scores)
    with pytest.raises(RuntimeError, match="trained already"):
        trainer.train()


def test_a_model_with_more_logits_than_its_tokenizer_has_tokens_trains_and_evaluates(tmp_path):
    """Qwen2's case (151,936 logits for 151,665 tokens), small: 16 logits past the 34 tokens, sampled about a third
    of the time by a random model. The run's env takes them as actions (the policy's config.vocab_size)."""
    tokenizer = char_tokenizer()
    model = tiny_gpt2(len(tokenizer) + 16, seed=3)
    trainer = Trainer(model, reward_funcs=[share_of_e], train_dataset=PROMPTS, eval_dataset=PROMPTS[:2],
                      tokenizer=tokenizer, quiet=True,
                      args=TrainConfig(total_steps=128, num_envs=8, output_dir=str(tmp_path / "run"),
                                       env_kwargs={"max_new_tokens": 8}))
    result = trainer.train()
    assert result.updates == 2 and result.after is not None and len(result.after.scores) == 2
    assert trainer.run.base.vocab_size == len(tokenizer) + 16


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
    with torch.no_grad():  # (the run's model is on the run's device: the GPU where there is one)
        run_logits = lm(input_ids=ids.to(next(lm.parameters()).device)).logits.cpu()
        torch.testing.assert_close(loaded(ids).logits, run_logits, atol=1e-5, rtol=1e-5)
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
        f.write(json.dumps({"global_step": 384}) + "\n" + '{"global_step": 5')  # (the last line cut mid-write)
    train(_toy(tmp_path, total_steps=512, checkpoint_every=1, keep_checkpoints=2), resume=True, quiet=True)
    steps = [json.loads(x)["global_step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [128, 256, 384, 512]
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint", "checkpoint-3"]
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["update"] == 3


def test_resume_after_a_crash_drops_the_lost_updates_from_tensorboard(tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from textrl.train import train

    train(_toy(tmp_path, total_steps=384, checkpoint_every=2, keep_checkpoints=2), quiet=True)
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoint")  # as if killed after update 3 was logged, before its checkpoint was written
    (run / "checkpoint-2").rename(run / "checkpoint")
    train(_toy(tmp_path, total_steps=512, checkpoint_every=2, keep_checkpoints=2), resume=True, quiet=True)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("losses/policy")}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in lines] == [128, 256, 384, 512]
    assert sorted(logged) == [128, 256, 384, 512] and len(events.Scalars("losses/policy")) == 4
    assert logged[384] == pytest.approx(lines[2]["losses/policy"], rel=1e-6)  # the resumed session's update 3


def test_bare_bool_flags_and_help_shows_what_a_bare_train_runs(capsys):
    from textrl.cli import main, resolve_train_config

    cfg, _ = resolve_train_config(["--env", "CartPole-v1", "--overwrite", "--seed", "3"])
    assert cfg.overwrite is True and cfg.seed == 3
    cfg, _ = resolve_train_config(["--env", "CartPole-v1", "--overwrite", "false"])
    assert cfg.overwrite is False
    config = Path(__file__).parents[1] / "experiments" / "presets" / "CartPole-v1.yaml"
    cfg, _ = resolve_train_config(["--overwrite", str(config), "--seed", "4"])  # a bare bool before CONFIG
    assert cfg.overwrite is True and cfg.env == "CartPole-v1" and cfg.seed == 4
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "bare `textrl train`: textrl/Cheerful-v0" in out and "bare `textrl train`: 32" in out


def test_trl_style_reward_signatures_and_missing_columns():
    def reward_len(completions, **kwargs):  # TRL's documented forms
        return [-abs(8 - len(c)) for c in completions]

    def accuracy(completions, solution, **kwargs):
        return [float(c == s) for c, s in zip(completions, solution, strict=True)]

    columns = {"solution": ["ab", "x"]}
    assert call_scorer(reward_len, ["p", "q"], ["ab", "abcdefgh"], columns) == [-6, 0]
    assert call_scorer(accuracy, ["p", "q"], ["ab", "y"], columns) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"accuracy needs the column\(s\) \['solution'\].*columns are \[\]"):
        call_scorer(accuracy, ["p"], ["ab"], {})


def test_prompt_sources_datasets_columns_and_refused_shapes(tmp_path):
    import datasets
    from textrl.envs.prompts import load_prompt_records
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "answer": ["1", "2"]})
    assert load_prompt_records(ds) == (["a", "b"], {"answer": ["1", "2"]})
    assert load_prompt_records({"prompt": ["a", "b"], "answer": ["1", "2"]}) == (["a", "b"], {"answer": ["1", "2"]})
    with pytest.raises(ValueError, match=r"a DatasetDict\?\); pass one split \(ds\['train'\]\)"):
        load_prompt_records(datasets.DatasetDict({"train": ds, "test": ds}))
    (tmp_path / "p.csv").write_text("prompt,answer\na,1\n")
    with pytest.raises(ValueError, match="is not a .txt"):
        load_prompt_records(tmp_path / "p.csv")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": 2}\n')
    assert load_prompt_records(tmp_path / "p.jsonl") == (["a", "b"], {"answer": [1, 2]})


def test_trainer_config_from_arguments():
    t = Trainer("textrl/tiny-char-gpt2", args={"model": {"name": "other", "lora_r": 4}, "lora_targets": "c_attn"})
    assert t.config.model.name == "textrl/tiny-char-gpt2" and t.config.model.lora_r == 4  # the argument wins
    assert Trainer(reward_funcs=share_of_e).config.env == "textrl/TextGen-v0"  # any text argument: a text env
    assert Trainer(reward_funcs="some/reward-model").config.model.reward_model == "some/reward-model"  # resumable
    with pytest.raises(ValueError, match="reward_funcs: given with args.model.reward_model"):
        Trainer(reward_funcs=share_of_e, args={"reward_model": "rm"})
    with pytest.raises(ValueError, match="reward_weights: given without reward_funcs"):
        Trainer(reward_weights=[1.0])


def test_loaded_ppo_whose_run_went_on_learns_from_its_saved_weights(tmp_path, monkeypatch):
    import textrl.api

    model = PPO("CartPole-v1", output_dir=str(tmp_path / "run"), num_envs=4, num_steps=64, num_minibatches=2)
    model.learn(256).save(tmp_path / "early")
    early = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(256)  # the run directory moves on to 512 steps
    seen = {}

    def no_training(run):  # what learn() starts from, instead of training
        seen["weights"] = {k: v.clone() for k, v in run.agent.policy.state_dict().items()}
        seen["dir"] = run.output_dir
        run.close()  # (as loop does: its TensorBoard writer would flush into runs/ after the test left tmp_path)
        return textrl.api.RunResult(run.output_dir, 0, 0)

    monkeypatch.setattr(textrl.api, "loop", no_training)
    monkeypatch.chdir(tmp_path)
    loaded = PPO.load(tmp_path / "early").learn(128)
    assert all(torch.equal(early[k], seen["weights"][k]) for k in early)  # the saved weights, not the run's later ones
    assert Path(seen["dir"]) != tmp_path / "run" and loaded.num_timesteps == 256  # a new run; 256 + its 0 steps


def test_overwrite_deletes_only_runs_and_all_of_their_checkpoints(tmp_path):
    from textrl.train import train

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("my: project\n")
    with pytest.raises(ValueError, match="is not a textrl run directory"):
        train(_toy(tmp_path, total_steps=128, overwrite=True), quiet=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == "my: project\n"
    (tmp_path / "run" / "config.yaml").unlink()
    train(_toy(tmp_path, total_steps=384, checkpoint_every=1, keep_checkpoints=3), quiet=True)
    assert "overwrite" not in yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())  # not part of the run
    train(_toy(tmp_path, total_steps=128, overwrite=True, keep_checkpoints=3), quiet=True)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint*")) == ["checkpoint"]  # old checkpoint-N gone


def test_reward_models_read_chat_prompts_as_text():
    from textrl.envs.scorers import HFRewardModelScorer, prompt_as_text
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}!{% endif %}"
    config = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, num_labels=1, pad_token_id=tok.pad_token_id)
    scorer = HFRewardModelScorer(GPT2ForSequenceClassification(config), tok)
    chat = [{"role": "user", "content": "ab"}]
    plain = char_tokenizer()
    plain.chat_template = None  # a tokenizer without a chat template: the messages' contents, one per line
    assert prompt_as_text(chat, tok) == "ab!" and prompt_as_text(chat, plain) == "ab\n"
    torch.testing.assert_close(scorer([chat], ["cd"]), scorer(["ab!"], ["cd"]))  # the conversation, rendered


def test_a_reward_model_path_in_a_list_loads_on_the_run_device_and_logs_each_reward(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = char_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, num_labels=1, pad_token_id=tok.pad_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    trainer = Trainer(reward_funcs=[share_of_e, str(tmp_path / "rm")], reward_weights=[1.0, 0.5], quiet=True,
                      env="textrl/TargetToken-v0", args={"total_steps": 256, "output_dir": str(tmp_path / "run")})
    result = trainer.train()
    scorer = trainer.build().base.scorer
    assert callable(scorer.funcs[1]) and scorer.names == ["share_of_e", "rm"]  # loaded by the run
    assert {"reward/share_of_e", "reward/rm"} <= set(result.history[-1])
