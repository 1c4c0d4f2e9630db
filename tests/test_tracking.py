"""Tracking: accelerate's trackers through report_to (a custom GeneralTracker here: no service is reachable),
clear errors for unknown or missing ones before anything loads, the config in TensorBoard's HParams tab, and
messages through the standard logger "textrl" (quiet really quiet)."""

import logging

import pytest
from accelerate.tracking import GeneralTracker

from textrl.config import TrainConfig
from textrl.tracking import check_report_to, flat_hparams, logger
from textrl.train import train


class ListTracker(GeneralTracker):
    name = "list"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logged, self.finished = None, [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def _toy(tmp_path, name="run", **fields):
    return TrainConfig(env="textrl/TargetToken-v0", num_envs=8, total_steps=256, output_dir=str(tmp_path / name),
                       **fields)


def test_report_to_feeds_an_accelerate_tracker_every_update_and_the_evaluation(tmp_path):
    tracker = ListTracker()
    train(_toy(tmp_path, report_to=(tracker,)), quiet=True)
    assert tracker.config["env"] == "textrl/TargetToken-v0" and tracker.config["kl.coef"] == 0.001  # preset, flat
    steps = [step for step, values in tracker.logged if "losses/policy" in values]
    assert steps == [128, 256]
    evals = [step for step, values in tracker.logged if "eval/reward_mean" in values]
    assert evals == [0, 256] and tracker.finished  # before and after training


def test_report_to_errors_name_the_tracker_and_the_fix_before_anything_loads(tmp_path, monkeypatch):
    import accelerate.tracking

    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbored'; expected some of \[.*'wandb'"):
        check_report_to("tensorbored")
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])  # as on a machine without wandb
    with pytest.raises(ValueError, match="'wandb' is not installed; pip install wandb"):
        train(_toy(tmp_path, report_to=("wandb",)), quiet=True)
    assert not (tmp_path / "run").exists()  # refused before the run directory or a model
    assert check_report_to("tensorboard, ") == []  # always on
    with pytest.raises(TypeError, match="tracker names or accelerate GeneralTracker objects"):
        check_report_to([3])


def test_hparams_tab_holds_the_flat_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_toy(tmp_path), quiet=True)
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    plugin = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugin and "_hparams_/session_start_info" in plugin
    assert b"kl.coef" in plugin["_hparams_/session_start_info"]
    assert flat_hparams({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": "None"}


def test_messages_go_through_the_textrl_logger_and_quiet_prints_nothing(tmp_path, capsys):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        train(_toy(tmp_path), quiet=False)
        capsys.readouterr()
        assert any("health: PAD=" in r.getMessage() for r in records)  # a user can redirect or silence them
        records.clear()
        train(_toy(tmp_path, "quiet"), quiet=True)
    finally:
        logger.removeHandler(handler)
    assert [r for r in records if r.levelno < logging.WARNING] == []
    captured = capsys.readouterr()
    assert "warning" not in captured.err and captured.err.strip() == "" and captured.out == ""
