"""Data-parallel training on CPU: two gloo processes under ``torchrun``, ``accelerate launch --multi_gpu`` and
``textrl ... --num-processes 2`` train exactly like one process over the union of their env shards."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from textrl.envs.toy import char_tokenizer, target_token_env

from textrl.cli import main as cli_main
from textrl.cli import resolve_train_config
from textrl.lm.evaluate import summary_line
from textrl.lm.sampling import sample_from_logits
from textrl.shard import Shard
from textrl.train import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
BIN = Path(sys.executable).parent


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "textrl"]


def accelerate_launch() -> list[str]:
    # accelerate 1.15: --cpu would ignore --num_processes without MPI; --multi_gpu on a GPU-less machine still
    # starts two processes, and textrl's Accelerator(cpu=True) joins them with gloo.
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(), "-m", "textrl"]


def launch(prefix: list[str], args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([*prefix, *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_here(args: list[str]):
    """The one-process reference run, in this process (no interpreter start-up: the launches below pay it)."""
    cfg, resume = resolve_train_config(args)
    return train(cfg, resume=resume, quiet=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    assert [m["global_step"] for m in a] == [m["global_step"] for m in b]
    for x, y in zip(a, b, strict=True):
        keys = [k for k in x if not k.startswith(("time/", "dist/")) and x[k] is not None]
        assert keys, x
        for k in keys:
            assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-6), (x["global_step"], k, x[k], y[k])


def assert_in_step(run: Path, lines: slice) -> None:
    """Every update of the processes' part of ``run`` logged a weight divergence of exactly 0."""
    part = metrics(run)[lines]
    assert part and all(m["dist/weight_divergence"] == 0.0 for m in part), [m.get("dist/weight_divergence")
                                                                           for m in part]


TOY = ["--env", "textrl/TargetToken-v0", "--num-envs", "8", "--num-minibatches", "1", "--seed", "3"]


def test_ppo_on_two_processes_equals_one_process_over_the_union_and_resumes_across_process_counts(tmp_path):
    ppo = [*TOY, "--agent", "ppo", "--num-epochs", "2", "--checkpoint-every", "1"]
    one, two, mixed = tmp_path / "one", tmp_path / "two", tmp_path / "mixed"
    run_here([*ppo, "--total-steps", "512", "--output-dir", str(one)])  # 4 updates on one process
    # 2 updates on two processes (torchrun), then the last 2 resumed on one process
    out = launch(torchrun(), ["train", *ppo, "--total-steps", "256", "--output-dir", str(two)])
    assert "data-parallel: 2 processes × 4 rows = num_envs 8 (MULTI_CPU" in out.stderr
    assert len(metrics(two)) == 2  # the main process alone writes metrics and TensorBoard events
    assert len(list((two / "tb").glob("events.out.tfevents.*"))) == 1
    run_here(["--resume", str(two), "--total-steps", "512"])
    # 2 updates on one process, then the last 2 resumed on two processes (accelerate launch)
    run_here([*ppo, "--total-steps", "256", "--output-dir", str(mixed)])
    launch(accelerate_launch(), ["train", "--resume", str(mixed), "--total-steps", "512"])

    assert_in_step(two, slice(0, 2))
    assert_in_step(mixed, slice(2, 4))
    assert_same_metrics(metrics(one), metrics(two))
    assert_same_metrics(metrics(one), metrics(mixed))
    ref = load_file(str(one / "checkpoint" / "model.safetensors"))
    for run in (two, mixed):
        got = load_file(str(run / "checkpoint" / "model.safetensors"))
        assert got.keys() == ref.keys()
        assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-4  # float summation order only


@pytest.mark.parametrize("agent, extra", [("rloo", ["--gradient-accumulation-steps", "2"]),
                                          ("grpo", ["--scale-rewards", "batch"])])
def test_group_agents_on_two_processes_equal_one_process(tmp_path, agent, extra):
    """--num-processes 2 (torchrun underneath); RLOO with gradient accumulation (DDP's no_sync on the first
    micro-batch), GRPO with batch-level reward scaling (a statistic over both shards)."""
    args = [*TOY, "--agent", agent, "--num-generations", "4", "--total-steps", "384", *extra]
    run_here([*args, "--output-dir", str(tmp_path / "one")])
    out = launch([str(BIN / "textrl")], ["train", *args, "--output-dir", str(tmp_path / "two"),
                                          "--num-processes", "2"])
    assert "torch.distributed.run --standalone --nproc-per-node=2" in out.stderr
    assert_in_step(tmp_path / "two", slice(None))
    assert_same_metrics(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    # the held-out evaluation, shared between the processes, answers exactly as one process does
    assert (tmp_path / "two" / "samples.md").read_text() == (tmp_path / "one" / "samples.md").read_text()


@pytest.mark.parametrize("eval_prompts", [["the dog ran to the", "a bird sang in the", "we ate bread and"],
                                          ["the dog ran to the"]])
def test_evaluation_split_unevenly_across_processes_equals_one_process(tmp_path, eval_prompts):
    """3 held-out rows on 2 processes (1 + 2), and 1 row (one process has none and only keeps its sampler in
    step): the before/after line and the samples equal the one-process run's."""
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"env": "textrl/TargetToken-v0", "num_envs": 8, "total_steps": 128,
                                      "eval_generations": 1, "env_kwargs": {"eval_prompts": eval_prompts},
                                      "ppo": {"num_minibatches": 1}}))
    one = run_here([str(config), "--output-dir", str(tmp_path / "1")])
    out = launch([str(BIN / "textrl")], ["train", str(config), "--output-dir", str(tmp_path / "2"),
                                          "--num-processes", "2"])
    two = [x for x in out.stderr.splitlines() if x.startswith("held-out reward:")]
    assert two == [summary_line(one.before, one.after).splitlines()[0]]
    assert (tmp_path / "2" / "samples.md").read_text() == (tmp_path / "1" / "samples.md").read_text()


@pytest.mark.learning
def test_ppo_learns_on_two_processes_with_minibatches(tmp_path):
    """The toy preset (16 rows, 2 minibatches: each global minibatch takes 4 rows from each process) learns
    on two processes, which stay in step at every update."""
    out = tmp_path / "run"
    launch(torchrun(), ["train", "--env", "textrl/TargetToken-v0", "--agent", "ppo", "--seed", "1",
                        "--output-dir", str(out)])
    m = metrics(out)
    assert len(m) == 16
    assert_in_step(out, slice(None))
    first, last = m[0]["reward/score_mean"], sum(x["reward/score_mean"] for x in m[-3:]) / 3
    assert first < 0.15 and last > 0.3, (first, last)


@pytest.mark.learning
def test_classic_run_on_two_processes_equals_one_process(tmp_path):
    """A sync vector env (Acrobot: sub-env i seeded seed + i) split over two processes, each drawing its
    sub-envs' actions from the one-process action stream, with one minibatch per epoch: metric for metric and
    weight for weight the one-process run."""
    args = ["train", "--env", "Acrobot-v1", "--num-envs", "8", "--num-steps", "64", "--total-steps", "1536",
            "--seed", "1", "--num-minibatches", "1", "--num-epochs", "2"]
    run_here([*args[1:], "--output-dir", str(tmp_path / "one")])
    launch(torchrun(), [*args, "--output-dir", str(tmp_path / "two")])
    assert_same_metrics(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    assert_in_step(tmp_path / "two", slice(None))
    a, b = (load_file(str(tmp_path / d / "checkpoint" / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_ppo_learns_cartpole_on_two_processes(tmp_path):
    """The classic path with minibatches, on CartPole's native vector env (one generator for all sub-envs, so
    the split cannot equal one process; the test above shows the split itself is exact). Runs are
    deterministic for a seed (two runs give identical metrics), but at 30k steps the final mean of 20 episodes
    ranged 156-500 over seeds 1-3 — the old bar of 200 sat at the edge of what a seed reaches. At 50k steps
    seeds 1-3 all end at 500: the bar is 300."""
    out = tmp_path / "run"
    launch([str(BIN / "textrl")], ["train", "--env", "CartPole-v1", "--total-steps", "50000", "--seed", "1",
                                    "--output-dir", str(out), "--num-processes", "2"])
    m = metrics(out)
    assert_in_step(out, slice(None))
    assert m[0]["env/episode_return_mean20"] < 60
    assert m[-1]["env/episode_return_mean20"] >= 300, m[-1]["env/episode_return_mean20"]


def test_reward_model_on_two_processes_equals_one_process(tmp_path):
    from test_reward_model import SUBJECTS, preference_rows, write_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(SUBJECTS[:16]))
    args = ["train-rm", "--data", str(data), "--num-epochs", "2", "--batch-size", "16"]
    assert cli_main([*args, "--output-dir", str(tmp_path / "one")]) == 0  # one process: here
    launch(torchrun(), [*args, "--output-dir", str(tmp_path / "two")])
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert a[-1]["eval/pairwise_accuracy"] > a[0]["train/accuracy"] or a[-1]["eval/pairwise_accuracy"] == 1.0
    assert_same_metrics(a, b, rel=1e-4)
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["eval_accuracy"] == s1["eval_accuracy"] and s2["gain"] == pytest.approx(s1["gain"], rel=1e-3)


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "accelerate"


def deepspeed_launch(stage: int) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml"),
            "--num_processes", "2", "--main_process_port", _free_port(), "-m", "textrl"]


@pytest.mark.parametrize("stage, agent, lora_r", [(2, "ppo", "0"), (3, "ppo", "0"), (3, "grpo", "4")])
def test_deepspeed_zero_equals_one_process_and_resumes(tmp_path, stage, agent, lora_r):
    """The shipped ZeRO-2/3 configs on two CPU processes (DeepSpeed's CPU accelerator, gloo), the policy loaded
    from disk (so ZeRO-3 partitions it while loading; the full-copy reference is loaded whole): gradient
    accumulation (textrl marks DeepSpeed's boundary), the engine's partitioned checkpoint and a resume, and
    under ZeRO-3 generation/evaluation/saving with the gathered weights — all equal to one process."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e .[deepspeed])")
    from textrl.envs.toy import tiny_gpt2

    tok = char_tokenizer()
    tiny_gpt2(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    args = [*TOY, "--agent", agent, "--model", str(tmp_path / "model"), "--lora-r", lora_r,
            "--gradient-accumulation-steps", "2", "--checkpoint-every", "1"]
    one, ds = tmp_path / "one", tmp_path / "ds"
    run_here([*args, "--total-steps", "512", "--output-dir", str(one)])
    out = launch(deepspeed_launch(stage), ["train", *args, "--total-steps", "256", "--output-dir", str(ds)])
    assert "(DEEPSPEED: gradients averaged across the processes)" in out.stderr
    launch(deepspeed_launch(stage), ["train", "--resume", str(ds), "--total-steps", "512"])
    assert_same_metrics(metrics(one), metrics(ds))
    assert sorted(p.name for p in (ds / "checkpoint_deepspeed").glob("update*")) == ["update4"]
    ref, got = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (one, ds))
    assert got.keys() == ref.keys() and all(got[k].shape == ref[k].shape for k in ref)  # gathered, not shards
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-4  # float summation order only


def test_reward_model_under_deepspeed_zero3_equals_one_process(tmp_path):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e .[deepspeed])")
    from test_reward_model import SUBJECTS, preference_rows, write_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(SUBJECTS[:16]))
    args = ["train-rm", "--data", str(data), "--num-epochs", "2", "--batch-size", "16"]
    assert cli_main([*args, "--output-dir", str(tmp_path / "one")]) == 0  # one process: here
    launch(deepspeed_launch(3), [*args, "--output-dir", str(tmp_path / "ds")])
    assert_same_metrics(metrics(tmp_path / "one"), metrics(tmp_path / "ds"), rel=1e-4)
    # the gathered ZeRO-3 checkpoint loads as a scorer that scores like the one-process model
    from textrl.reward_model import TrainedRewardScorer

    texts = (["Tell me about the zoo."] * 3, ["The zoo was lovely.", "The zoo was awful.", "It was a zoo."])
    ref, got = (TrainedRewardScorer(tmp_path / d)(*texts) for d in ("one", "ds"))
    assert torch.allclose(got, ref, atol=1e-3), (got, ref)


# --- the pieces, on one process -----------------------------------------------------------------------


def test_env_shards_draw_the_one_process_batch():
    tok = char_tokenizer()
    whole = target_token_env(8, tok, num_generations=2)
    shards = [target_token_env(4, tok, num_generations=2, shard=(4 * r, 8)) for r in range(2)]
    for i in range(3):  # a stream of resets stays in step
        seed = 5 if i == 0 else None
        info = whole.reset(seed=seed)[1]
        parts = [s.reset(seed=seed)[1] for s in shards]
        assert torch.equal(torch.cat([p["prompt_index"] for p in parts]), info["prompt_index"])
        assert torch.equal(torch.cat([s.input_ids for s in shards]), whole.input_ids)


def test_sampler_shards_use_the_one_process_uniforms():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    whole = sample_from_logits(logits, generator=torch.Generator().manual_seed(1))
    parts = [sample_from_logits(logits[2 * r:2 * r + 2], generator=torch.Generator().manual_seed(1),
                                shard=Shard(2 * r, 6)) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_shards_that_do_not_split_the_batch_are_refused():
    from textrl.agents.grpo import GRPOConfig
    from textrl.agents.ppo import PPOConfig

    from textrl.lm.run import rows_per_process as _check_shards

    assert _check_shards(16, 2, PPOConfig(num_minibatches=2)) == 8
    with pytest.raises(ValueError, match=r"num_envs=10 is the global batch and must be a multiple of the number "
                                         r"of processes \(4\)"):
        _check_shards(10, 4, PPOConfig(num_minibatches=1))
    with pytest.raises(ValueError, match=r"each process holds num_envs / 4 = 2 rows.*not a multiple of "
                                         r"num_generations=4"):
        _check_shards(8, 4, GRPOConfig(num_generations=4))
    with pytest.raises(ValueError, match=r"0 <= offset < total, got offset=8, total=8"):
        Shard(8, 8)
    with pytest.raises(ValueError, match=r"whole groups of num_generations=4"):
        target_token_env(4, char_tokenizer(), num_generations=4, shard=(2, 8))


def test_num_processes_flag_is_checked():
    from textrl.cli import main

    assert main(["train", "--num-processes", "zero"]) == 2
    assert main(["train", "--num-processes", "0"]) == 2


def test_multi_turn_env_on_two_processes_equals_one_process(tmp_path):
    """A multi-turn game (GuessNumber: the env writes "Higher."/"Lower." between the agent's turns) split over two
    processes, each stepping its rows of the batch, trains like one process over all of them."""
    from test_tasks import _tiny_model_dir

    model = _tiny_model_dir(tmp_path)
    args = ["train", "--env", "textrl/GuessNumber-v0", "--model", str(model), "--num-envs", "4", "--total-steps", "640",
            "--lora-r", "0", "--num-minibatches", "1", "--eval-generations", "1", "--device", "cpu",
            "--env-kwargs", '{"eval_prompts": [{"prompt": "go", "secret": 3}, {"prompt": "go", "secret": 8}]}']
    run_here([*args[1:], "--output-dir", str(tmp_path / "one")])
    launch(torchrun(), [*args, "--output-dir", str(tmp_path / "two")])
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == 2 and all(m["env/turns"] >= 1 for m in one)
    assert_in_step(tmp_path / "two", slice(None))
    assert_same_metrics(one, two, rel=1e-4)


def test_a_data_parallel_worker_ends_without_the_interpreter_teardown(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) a finished command leaves with os._exit and its exit code, after the
    process group is left and the logs flushed: torch's C++ threads could abort the interpreter's teardown
    (SIGABRT after a finished run, seen once in a suite run). A single process returns as usual."""
    import logging

    import textrl.cli as cli

    exits, shutdowns = [], []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    monkeypatch.setattr(logging, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setitem(cli.COMMANDS, "train", (lambda argv: 3, "a command that ends with code 3"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli.main(["train"])
    assert exits == [3] and shutdowns == [1]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["train"]) == 3 and exits == [3]
