"""Run tracking: TensorBoard events, ``metrics.jsonl``, any of accelerate's trackers and a progress bar,
written by one object.

Every update produces one dict of fixed, namespaced metric names (``env/``, ``losses/``, ``policy/``,
``value/``, ``charts/``, ``time/``); :meth:`Tracker.log` writes it everywhere at once. TensorBoard and
``metrics.jsonl`` are always written; ``report_to`` adds accelerate's trackers by name (``wandb``,
``trackio``, ``mlflow``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``) or any
``accelerate.tracking.GeneralTracker`` object. The resolved config goes to TensorBoard's HParams tab (and to
each tracker's config). Messages go through the standard ``logging`` logger ``"textrl"``: set its level or add
handlers to silence or redirect them.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

__all__ = ["Tracker", "hparams_table", "flat_hparams", "check_report_to", "logger"]

logger = logging.getLogger("textrl")
#: the metrics the HParams tab shows beside each run's hyperparameters (those a run logs)
HPARAM_METRICS = ("eval/reward_mean", "reward/score_mean", "policy/kl_ref", "env/episode_return_mean20")


class _TqdmHandler(logging.Handler):
    """Writes log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


if not logger.handlers:  # textrl's default: plain lines on stderr; replace or silence through logging
    logger.addHandler(_TqdmHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def check_report_to(report_to: Any) -> list[Any]:
    """The trackers ``report_to`` names, checked before anything expensive: each a name accelerate knows, with
    its package installed, or a ``GeneralTracker`` object. "tensorboard" is always on (and dropped here)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers

    items = [report_to] if isinstance(report_to, str) or isinstance(report_to, GeneralTracker) else list(report_to or [])
    names = [x.strip() for item in items if isinstance(item, str) for x in item.split(",") if x.strip()]
    out: list[Any] = [item for item in items if isinstance(item, GeneralTracker)]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name in ("tensorboard", "none"):
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"report_to: unknown tracker {name!r}; expected some of {sorted(LOGGER_TYPE_TO_CLASS)} "
                             f"(TensorBoard and metrics.jsonl are always written)")
        if name not in available:
            raise ValueError(f"report_to: {name!r} is not installed; pip install {name.replace('_', '-')} "
                             f"(or drop it from report_to)")
        out.append(name)
    bad = [item for item in items if not isinstance(item, (str, GeneralTracker))]
    if bad:
        raise TypeError(f"report_to: expected tracker names or accelerate GeneralTracker objects, got {bad!r}")
    return out


def flat_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The config flattened with dotted keys into the values TensorBoard's HParams accept (numbers, bools,
    strings; everything else as its string)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            value = value if isinstance(value, (bool, int, float)) else str(value)
            out[prefix] = value if not isinstance(value, str) or len(value) <= 300 else value[:297] + "..."

    walk("", config)
    return out


def hparams_table(config: dict[str, Any]) -> str:
    """A markdown table of the resolved config, flattened with dotted keys."""
    rows = ["| parameter | value |", "|---|---|"]

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            text = str(value)  # (a long value — a prompt list — is cut here; config.yaml holds it whole)
            rows.append(f"| {prefix} | {text if len(text) <= 300 else text[:297] + '...'} |")

    walk("", config)
    return "\n".join(rows)


class Tracker:
    """Writes metrics to TensorBoard and ``metrics.jsonl``; shows a progress bar over ``total`` steps.

    Args:
        output_dir: the run directory (events go to ``output_dir/tb``).
        config: the resolved config, written once as a hyperparameter table.
        total: total environment steps, for the progress bar.
        postfix_keys: metric names shown on the bar, with the short label to show them under.
        initial: steps already done (when resuming).
        enabled: False makes every method a no-op that writes nothing (the non-main processes of a
            data-parallel run: metrics are gathered, and written once).
        quiet: print nothing but warnings (no table, no progress); the files are written as always.
        report_to: more trackers (see :func:`check_report_to`), started with ``project`` as their project name.
    """

    def __init__(
        self,
        output_dir: str | Path,
        config: dict[str, Any],
        total: int,
        postfix_keys: dict[str, str] | None = None,
        initial: int = 0,
        enabled: bool = True,
        quiet: bool = False,
        report_to: Any = None,
        project: str = "textrl",
    ):
        self.enabled, self.quiet = enabled, quiet
        if not enabled:
            return
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # resumed: TensorBoard drops the events a crashed session logged after the checkpoint's step (>= its + 1)
        self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=initial + 1 if initial > 0 else None)
        table = hparams_table(config)
        self.writer.add_text("hyperparameters", table, global_step=0)
        self._write_hparams(config)
        self.trackers = self._start_trackers(check_report_to(report_to), project, config)
        if not quiet:
            logger.info(table)
        self._jsonl = self._open_jsonl(initial)
        self.postfix_keys = postfix_keys or {}
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=True if quiet else None)
        self._last_step = initial
        self._next_report = initial

    def _write_hparams(self, config: dict[str, Any]) -> None:
        """The config in TensorBoard's HParams tab, in this run's own event file, with the metrics to compare."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(flat_hparams(config), {k: float("nan") for k in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary)

    def _start_trackers(self, trackers: list[Any], project: str, config: dict[str, Any]) -> list[Any]:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        started = []
        for item in trackers:
            if isinstance(item, str):
                cls = LOGGER_TYPE_TO_CLASS[item]
                item = cls(project, str(self.dir)) if cls.requires_logging_directory else cls(project)
            item.start()
            item.store_init_configuration(flat_hparams(config))
            started.append(item)
        return started

    def _open_jsonl(self, initial: int) -> Any:
        """``metrics.jsonl``, fresh; when resuming (``initial`` > 0) it keeps the lines up to the checkpoint's
        step and drops those a crashed session wrote after it (they are trained again)."""
        path = self.dir / "metrics.jsonl"
        kept = []
        if initial > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("global_step", 0) <= initial:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):  # a line cut by the crash
                    logger.warning(f"warning: metrics.jsonl: dropped an unreadable line ({line[:60]!r})")
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return open(path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, stats: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        record = {"global_step": int(step)}
        for key, value in stats.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else None  # JSON has no NaN
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        finite = {k: v for k, v in record.items() if k != "global_step" and v is not None}
        for tracker in self.trackers:
            tracker.log(finite, step=int(step))
        postfix = {label: f"{stats[k]:.3g}" for k, label in self.postfix_keys.items()
                   if k in stats and math.isfinite(stats[k])}
        if not self.bar.disable:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self._last_step)
        elif step >= self._next_report and not self.quiet:  # no TTY (CI, logs): a plain line every 10%
            shown = " ".join(f"{k}={v}" for k, v in postfix.items())
            logger.info(f"step {step}/{self.bar.total} ({100 * step // max(self.bar.total, 1)}%) {shown}")
            self._next_report = step + max(self.bar.total // 10, 1)
        self._last_step = step

    def message(self, text: str) -> None:
        """Log a line (logger ``"textrl"``; lines starting "warning" at WARNING level) without breaking the
        progress bar (quiet: warnings only)."""
        warning = text.startswith("warning")
        if not self.enabled or (self.quiet and not warning):
            return
        logger.log(logging.WARNING if warning else logging.INFO, text)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """TensorBoard only (not metrics.jsonl, which holds one line per update): e.g. the ``eval/`` results."""
        if not self.enabled:
            return
        finite = {key: value for key, value in values.items() if math.isfinite(value)}
        for key, value in finite.items():
            self.writer.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log(finite, step=int(step))

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        for tracker in self.trackers:
            tracker.finish()
        self.writer.flush()
        self.writer.close()
        self._jsonl.close()
