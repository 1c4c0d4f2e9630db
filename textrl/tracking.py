"""Run tracking: TensorBoard events, ``metrics.jsonl`` and a progress bar, written by one object.

Every update produces one dict of fixed, namespaced metric names (``env/``, ``losses/``, ``policy/``,
``value/``, ``charts/``, ``time/``); :meth:`Tracker.log` writes it everywhere at once.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

__all__ = ["Tracker", "hparams_table"]


def hparams_table(config: dict[str, Any]) -> str:
    """A markdown table of the resolved config, flattened with dotted keys."""
    rows = ["| parameter | value |", "|---|---|"]

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            rows.append(f"| {prefix} | {value} |")

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
    ):
        self.enabled, self.quiet = enabled, quiet
        if not enabled:
            return
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.dir / "tb"))
        table = hparams_table(config)
        self.writer.add_text("hyperparameters", table, global_step=0)
        if not quiet:
            print(table, file=sys.stderr)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.postfix_keys = postfix_keys or {}
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=True if quiet else None)
        self._last_step = initial
        self._next_report = initial

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
        postfix = {label: f"{stats[k]:.3g}" for k, label in self.postfix_keys.items()
                   if k in stats and math.isfinite(stats[k])}
        if not self.bar.disable:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self._last_step)
        elif step >= self._next_report and not self.quiet:  # no TTY (CI, logs): a plain line every 10%
            shown = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"step {step}/{self.bar.total} ({100 * step // max(self.bar.total, 1)}%) {shown}",
                  file=sys.stderr, flush=True)
            self._next_report = step + max(self.bar.total // 10, 1)
        self._last_step = step

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar (quiet: warnings only)."""
        if not self.enabled or (self.quiet and not text.startswith("warning")):
            return
        tqdm.write(text, file=sys.stderr)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """TensorBoard only (not metrics.jsonl, which holds one line per update): e.g. the ``eval/`` results."""
        if not self.enabled:
            return
        for key, value in values.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.writer.flush()
        self.writer.close()
        self._jsonl.close()
