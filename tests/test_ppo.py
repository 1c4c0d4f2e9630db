"""The generic PPO agent on a classic Gymnasium task: learning, determinism, health checks, NaN guard, resume."""

import json

import pytest
import torch
from helpers import reproducible
from safetensors.torch import load_file

from textrl.cli import resolve_train_config
from textrl.parallel.learner import Learner
from textrl.train import make_run, train


def cfg_for(tmp_path, *flags):
    cfg, _ = resolve_train_config(["--env", "CartPole-v1", "--output-dir", str(tmp_path), *flags])
    return cfg


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.learning
def test_ppo_learns_cartpole(tmp_path):
    """A shorter version of the 100k-step bar: mean return of the last 20 episodes >= 200 within 30k steps."""
    result = train(cfg_for(tmp_path, "--total-steps", "30000", "--seed", "1"), quiet=True)
    assert result.global_step <= 30_000 + 256
    first = result.episode_returns[:20]
    assert sum(first) / len(first) < 60  # it starts near random (about 20)
    assert result.mean_return(20) >= 200, result.mean_return(20)


def test_same_seed_same_run(tmp_path):
    runs = []
    for name in ("a", "b"):
        train(cfg_for(tmp_path / name, "--total-steps", "768", "--seed", "7"), quiet=True)
        runs.append(reproducible(read_metrics(tmp_path / name)))
    assert runs[0] == runs[1]
    assert len(runs[0]) == 3 and runs[0][-1]["global_step"] == 768


def test_metrics_and_first_minibatch_ratio(tmp_path):
    train(cfg_for(tmp_path, "--total-steps", "2048"), quiet=True)
    metrics = read_metrics(tmp_path)
    required = {"global_step", "env/episode_return", "env/episode_length", "losses/policy", "losses/value",
                "losses/entropy", "policy/approx_kl", "policy/clipfrac", "value/explained_variance",
                "charts/learning_rate", "time/steps_per_s", "time/collect_s", "time/update_s"}
    assert required <= set(metrics[-1])
    # health check: before the first optimiser step the new policy equals the rollout policy, ratio = 1
    assert all(m["policy/first_ratio_dev"] < 1e-6 for m in metrics)
    lrs = [m["charts/learning_rate"] for m in metrics]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(1e-3)  # linear annealing
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_nan_rollout_skips_the_update_and_keeps_weights(tmp_path):
    run = make_run(cfg_for(tmp_path), quiet=True)
    agent = run.agent
    rollout = run.collect()
    rollout.rewards[0, 0] = float("nan")
    before = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    stats = run.learner.update(agent, rollout, 1.0)
    assert stats["train/nan_skipped"] == agent.config.num_epochs * agent.config.num_minibatches
    for k, v in agent.policy.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_crash_then_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "--total-steps", "1024", "--checkpoint-every", "2")
    real_update, calls = Learner.update, {"n": 0}

    def crashing_update(self, agent, rollout, progress_remaining):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_update(self, agent, rollout, progress_remaining)

    monkeypatch.setattr(Learner, "update", crashing_update)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, quiet=True)
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["update"] == 2 and state["global_step"] == 512
    monkeypatch.setattr(Learner, "update", real_update)

    loaded = {}
    real_load = Learner.load_state_dict

    def spy_load(self, st):
        real_load(self, st)
        loaded.update({k: v.clone() for k, v in self.policy.state_dict().items()})

    monkeypatch.setattr(Learner, "load_state_dict", spy_load)
    resume_cfg, resume = resolve_train_config(["--resume", str(tmp_path)])
    assert resume and resume_cfg.agent_config["num_epochs"] == 20  # the run's own resolved config
    result = train(resume_cfg, resume=True, quiet=True)
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    steps = [m["global_step"] for m in read_metrics(tmp_path)]
    assert steps == [256, 512, 768, 1024]  # nothing lost, nothing repeated
    assert result.global_step == 1024
