"""Per-update figures of finished runs, from their metrics.jsonl: one Markdown row per run directory.

    python benchmarks/run_figures.py RUN_DIR [RUN_DIR ...]

Seconds per update (collect and update, medians after the first update, which includes warm-up), the
agent tokens per second over the run, and the peak GPU memory (text runs on cuda).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def row(run_dir: Path) -> str:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return f"| {run_dir.name} | no metrics.jsonl (the run failed: see its log) | | | | |"
    metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not metrics:
        return f"| {run_dir.name} | 0 (no update finished: see its log) | | | | |"
    later = metrics[1:] or metrics

    def median(key: str) -> str:
        values = [m[key] for m in later if m.get(key) is not None]
        return f"{statistics.median(values):.3f}" if values else "-"

    last = metrics[-1]
    peak = last.get("memory/gpu_peak_mb")
    return (f"| {run_dir.name} | {len(metrics)} | {median('time/collect_s')} | {median('time/update_s')} "
            f"| {last.get('time/tokens_per_s', float('nan')):.0f} | {'-' if peak is None else f'{peak:.0f}'} |")


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    print("| run | updates | collect (s, median) | update (s, median) | agent tokens/s | peak GPU MiB |")
    print("|---|---|---|---|---|---|")
    for arg in argv:
        print(row(Path(arg)))


if __name__ == "__main__":
    main(sys.argv[1:])
