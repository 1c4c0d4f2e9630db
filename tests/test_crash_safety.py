"""Weights and run directories that cannot be lost: non-finite weights undone and never checkpointed, the
checkpoint swap recoverable at any moment, checksummed checkpoints, a lock on the run directory, and a resume
of a run that stopped before its first checkpoint."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import reproducible
from safetensors.torch import load_file

from textrl.checkpoint import recover_checkpoint, save_checkpoint, verify_checkpoint
from textrl.cli import resolve_train_config
from textrl.train import make_run, train


def cfg_for(tmp_path, *flags):
    cfg, _ = resolve_train_config(["--env", "CartPole-v1", "--output-dir", str(tmp_path), *flags])
    return cfg


def steps_logged(run_dir):
    return [json.loads(x)["global_step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_step_that_makes_weights_non_finite_is_undone_with_its_update(tmp_path):
    run = make_run(cfg_for(tmp_path, "--learning-rate", "1e-3"), quiet=True)
    rollout = run.collect()
    run.learner.update(run.agent, rollout, 1.0)  # an ordinary update first: the optimiser has state
    before = {k: v.clone() for k, v in run.agent.policy.state_dict().items()}
    opt_before = {k: v.clone() for k, v in run.learner.optimizer.state_dict()["state"][0].items()}
    run.agent.config.learning_rate = 1e39  # finite loss and gradient; the step overflows the weights
    stats = run.learner.update(run.agent, rollout, 1.0)
    assert stats["train/nan_undone"] == 1
    for k, v in run.agent.policy.state_dict().items():
        assert torch.equal(v, before[k]), k  # the weights of the update's start, exactly
    for k, v in run.learner.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, opt_before[k]), k  # and Adam's moments and step count
    run.agent.config.learning_rate = 1e-3
    assert run.learner.update(run.agent, rollout, 1.0)["train/nan_undone"] == 0  # training goes on from there
    # the copy's buffers are reused: the restored optimiser state must not be them (the next copy refills them)
    opt_mid = {k: v.clone() for k, v in run.learner.optimizer.state_dict()["state"][0].items()}
    assert any(not torch.equal(opt_mid[k], opt_before[k]) for k in opt_mid)
    run.agent.config.learning_rate = 1e39
    assert run.learner.update(run.agent, rollout, 1.0)["train/nan_undone"] == 1
    for k, v in run.learner.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, opt_mid[k]), k
    run.close()


def test_exploding_learning_rate_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    train(cfg_for(tmp_path, "--total-steps", "512", "--checkpoint-every", "1"), quiet=True)
    good = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    resume_cfg, _ = resolve_train_config(["--resume", str(tmp_path), "--total-steps", "2048",
                                          "--learning-rate", "1e39"])
    with pytest.raises(FloatingPointError, match=r"3 updates in a row made the weights non-finite.*learning_rate=1e\+39"):
        train(resume_cfg, resume=True, quiet=True)
    kept = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(kept[k], v) for k, v in good.items())  # nothing non-finite was written over it
    assert verify_checkpoint(tmp_path / "checkpoint") is None


def test_non_finite_weights_are_never_written(tmp_path):
    state = {"model": {"w": torch.tensor([1.0, float("inf")])}, "optimizer": {}}
    with pytest.raises(FloatingPointError, match="1 weight tensor.*not finite \\(w\\).*not written"):
        save_checkpoint(tmp_path, state, {"update": 1, "global_step": 1})
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("value_model", ["head", "policy"])
def test_a_model_file_with_a_non_finite_weight_is_refused_naming_the_tensor(tmp_path, value_model):
    from textrl.envs.toy import char_tokenizer, tiny_gpt2

    tok, model = char_tokenizer(), tiny_gpt2(len(char_tokenizer()))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = float("inf")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cfg, _ = resolve_train_config(["--env", "textrl/TargetToken-v0", "--model", str(tmp_path / "model"),
                                   "--value-model", value_model, "--output-dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"model: '.*model' holds non-finite weights \(transformer.h.0.mlp.c_fc"
                                         r".weight: 1 of \d+ values are NaN or inf\).*checkpoint-<N>"):
        make_run(cfg, quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("moment", ["new_complete_old_aside", "new_complete_no_old", "new_incomplete"])
def test_a_crash_inside_the_checkpoint_swap_resumes_from_a_complete_copy(tmp_path, moment):
    """The swap's intermediate states, as a kill would leave them; --resume continues from the newest complete
    checkpoint and the run ends where the uninterrupted one does."""
    train(cfg_for(tmp_path, "--total-steps", "768", "--checkpoint-every", "1"), quiet=True)  # 3 updates
    ckpt, tmp, old = (tmp_path / n for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    if moment == "new_complete_old_aside":  # killed between "old aside" and "new in place"
        ckpt.rename(tmp)
        shutil.copytree(tmp, old)
        state = json.loads((old / "trainer_state.json").read_text())
        (old / "trainer_state.json").write_text(json.dumps({**state, "update": 2}))
        (old / "manifest.json").unlink()  # (its manifest would not match the edit; an older one needs none)
        expect_update = 3
    elif moment == "new_complete_no_old":
        ckpt.rename(tmp)
        expect_update = 3
    else:  # killed while writing checkpoint.tmp: no manifest yet; the previous checkpoint is still in place
        shutil.copytree(ckpt, tmp)
        (tmp / "manifest.json").unlink()
        expect_update = 3
    notes = recover_checkpoint(tmp_path)
    assert json.loads((ckpt / "trainer_state.json").read_text())["update"] == expect_update
    assert (moment == "new_incomplete") == (notes == [])
    resume_cfg, _ = resolve_train_config(["--resume", str(tmp_path), "--total-steps", "1024"])
    result = train(resume_cfg, resume=True, quiet=True)
    assert result.global_step == 1024 and steps_logged(tmp_path) == [256, 512, 768, 1024]
    assert not tmp.exists() and not old.exists()


def test_a_corrupted_checkpoint_is_detected_and_an_earlier_kept_one_is_used(tmp_path, capfd):
    train(cfg_for(tmp_path, "--total-steps", "768", "--checkpoint-every", "1", "--keep-checkpoints", "2"), quiet=True)
    model = tmp_path / "checkpoint" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x10  # one flipped bit inside the tensor data: safetensors itself would load it
    model.write_bytes(bytes(data))
    assert "model.safetensors does not match its sha256" in verify_checkpoint(tmp_path / "checkpoint")
    resume_cfg, _ = resolve_train_config(["--resume", str(tmp_path), "--total-steps", "1024"])
    capfd.readouterr()
    result = train(resume_cfg, resume=True, quiet=True)
    err = capfd.readouterr().err
    assert "is damaged (model.safetensors does not match its sha256" in err and "update 2 found in checkpoint-2/" in err
    assert result.global_step == 1024 and steps_logged(tmp_path) == [256, 512, 768, 1024]  # update 3 redone


def test_a_damaged_checkpoint_without_a_fallback_is_refused_naming_the_file(tmp_path):
    train(cfg_for(tmp_path, "--total-steps", "512", "--checkpoint-every", "1"), quiet=True)
    optimizer = tmp_path / "checkpoint" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    resume_cfg, _ = resolve_train_config(["--resume", str(tmp_path), "--total-steps", "768"])
    with pytest.raises(ValueError, match=r"damaged: optimizer.pt has 100 bytes, the manifest says \d+ .*--overwrite"):
        train(resume_cfg, resume=True, quiet=True)


def test_resuming_a_run_that_stopped_before_its_first_checkpoint_starts_it_again(tmp_path, capfd):
    train(cfg_for(tmp_path, "--total-steps", "512", "--checkpoint-every", "0"), quiet=True)  # (only at the end)
    shutil.rmtree(tmp_path / "checkpoint")  # as if killed before the end
    capfd.readouterr()
    resume_cfg, _ = resolve_train_config(["--resume", str(tmp_path)])
    result = train(resume_cfg, resume=True, quiet=True)
    assert "holds no checkpoint (the run stopped before its first one): the run starts again" in capfd.readouterr().err
    assert result.global_step == 512 and steps_logged(tmp_path) == [256, 512]  # the old lines are gone


def test_resuming_a_run_killed_before_it_wrote_its_config_says_to_start_it_again(tmp_path):
    (tmp_path / ".textrl.lock").touch()  # what a kill during start-up leaves
    with pytest.raises(FileNotFoundError, match="stopped during start-up, before writing it.*without --resume"):
        resolve_train_config(["--resume", str(tmp_path)])
    train(cfg_for(tmp_path, "--total-steps", "256"), quiet=True)  # the original command reuses the directory
    assert steps_logged(tmp_path) == [256]


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(tmp_path / '.textrl.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('locked', flush=True)\n"
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another textrl process \(pid {holder.pid}\)"):
            train(cfg_for(tmp_path, "--total-steps", "256"), quiet=True)
    finally:
        holder.kill()
        holder.wait()
    assert train(cfg_for(tmp_path, "--total-steps", "256"), quiet=True).global_step == 256  # the lock died with it


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="output_dir: .* is a file, not a directory"):
        train(cfg_for(tmp_path / "f", "--total-steps", "256"), quiet=True)


def test_a_resume_with_settings_that_cannot_change_is_refused_before_anything_loads(tmp_path):
    train(cfg_for(tmp_path, "--total-steps", "512", "--num-envs", "4"), quiet=True)
    for flags, named in ((["--num-envs", "8"], "num_envs: 4 (the run) -> 8 (given)"),
                         (["--seed", "3", "--num-epochs", "2"], "seed: 1 (the run) -> 3 (given); agent_config.num_epochs"),
                         (["--env", "Acrobot-v1"], "env: 'CartPole-v1' (the run) -> 'Acrobot-v1' (given)")):
        cfg, _ = resolve_train_config(["--resume", str(tmp_path), "--total-steps", "1024", *flags])
        with pytest.raises(ValueError, match="resume: .*cannot change on resume: " + named.replace("(", r"\(").replace(")", r"\)")):
            train(cfg, resume=True, quiet=True)
    # a run written before a field existed (here sampling.slots) resumes when the field keeps its default
    saved = (tmp_path / "config.yaml").read_text()
    assert "  slots: 0\n" in saved
    (tmp_path / "config.yaml").write_text(saved.replace("  slots: 0\n", ""))
    cfg, _ = resolve_train_config(["--resume", str(tmp_path), "--total-steps", "1024", "--slots", "4"])
    with pytest.raises(ValueError, match=r"sampling.slots: '\(unset\)' \(the run\) -> 4 \(given\)"):
        train(cfg, resume=True, quiet=True)
    cfg, _ = resolve_train_config(["--resume", str(tmp_path), "--total-steps", "1024", "--learning-rate", "5e-4",
                                   "--checkpoint-every", "1"])
    assert train(cfg, resume=True, quiet=True).global_step == 1024  # these may change


def _metrics(run_dir):
    return reproducible([json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()])


@pytest.mark.parametrize("flags", [
    ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "32", "--total-steps", "1536"],
    ["--env", "textrl/TargetToken-v0", "--num-envs", "8", "--total-steps", "1024"],
    ["--env", "textrl/TargetToken-v0", "--num-envs", "8", "--total-steps", "1024", "--agent", "grpo"],
], ids=["cartpole", "text-ppo", "text-grpo"])
def test_killed_at_random_moments_and_resumed_equals_the_uninterrupted_run(tmp_path, flags):
    """SIGKILL at random moments of the updates and checkpoint writes (each a random delay after the run logged
    an update, so every session makes progress whatever the machine's load), then --resume, up to four times;
    the run then ends: its metrics (all but timings) and final weights equal an uninterrupted run's."""
    import os
    import random
    import statistics
    import time

    from textrl.cli import main

    cmd = [sys.executable, "-m", "textrl", "train", *flags, "--checkpoint-every", "1", "--seed", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    assert main([*cmd[3:], "--output-dir", str(tmp_path / "straight")]) == 0  # the uninterrupted run, here
    # one update's time here (median collect + update, and half again for its checkpoint write): a kill lands
    # within the next update on a slow or a fast machine
    logged = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    update_s = 1.5 * statistics.median(m["time/collect_s"] + m["time/update_s"] for m in logged)
    run, rng, kills = tmp_path / "killed", random.Random(0), 0
    metrics = run / "metrics.jsonl"

    def lines() -> int:
        try:  # (a resume that finds no checkpoint deletes the file and starts again: it may go between calls)
            return len(metrics.read_text().splitlines())
        except FileNotFoundError:
            return 0

    args = [*cmd[4:], "--output-dir", str(run)]
    while True:
        with (tmp_path / "stderr.log").open("w") as err:
            proc = subprocess.Popen([*cmd[:4], *args], env=env, stdout=subprocess.DEVNULL, stderr=err)
        if kills < 4:
            seen = lines()
            while proc.poll() is None and lines() <= seen:  # until this session has logged an update
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, update_s))  # then somewhere in the next update or checkpoint write
            if proc.poll() is None:
                proc.kill()
                kills += 1
        if proc.wait() == 0:
            break  # the run ended
        assert proc.returncode == -9, (tmp_path / "stderr.log").read_text()[-3000:]  # killed, not failed
        args = ["--resume", str(run)]
    assert kills >= 3
    assert _metrics(run) == _metrics(tmp_path / "straight")
    a = load_file(str(run / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
