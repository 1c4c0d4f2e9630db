"""THE training loop, for every run kind:

    batch = run.collect()                      # env(s) + policy/generator + wrappers' end-of-episode hooks
    stats = run.update(batch, progress)        # learner: agent.prepare → epochs × minibatches → agent.loss
    stats |= run.after_update(batch, stats, elapsed)  # rollout statistics, KL controller, throughput, warnings
    run.log(stats)                             # TensorBoard, metrics.jsonl, progress bar
    checkpoint every ``checkpoint_every`` updates and at the end

A run resumed from a checkpoint starts at its saved position (``run.start_update``, ``run.global_step``).
"""

from __future__ import annotations

import time

import torch

from textrl.parallel.distributed import weight_divergence, world_size
from textrl.runs import Run, RunResult

__all__ = ["loop"]


def loop(run: Run) -> RunResult:
    """Train ``run`` from its start position to its last update; returns its result."""
    run.start()
    stats: dict[str, float] = {}
    start_time = time.perf_counter()
    try:
        for update in range(run.start_update, run.num_updates):
            t0 = time.perf_counter()
            batch = run.collect()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # the collection's queued GPU work is counted in collect_s
            t1 = time.perf_counter()
            run.global_step += run.steps_per_update
            stats = run.update(batch, progress_remaining=1.0 - update / run.num_updates)
            stats.update(run.after_update(batch, stats, time.perf_counter() - start_time))
            stats.update({"time/collect_s": t1 - t0, "time/update_s": time.perf_counter() - t1})
            if world_size() > 1 and run.comparable_weights:  # 0 when every process holds the same weights
                stats["dist/weight_divergence"] = weight_divergence(run.learner.params)
                if stats["dist/weight_divergence"] > 0:
                    run.tracker.message(f"warning: update {update}: the processes' weights differ "
                                        f"(divergence {stats['dist/weight_divergence']:.3g})")
            run.log(stats)
            every = run.cfg.checkpoint_every
            if update + 1 == run.num_updates or (every and (update + 1) % every == 0):
                run.checkpoint(update + 1)
        result = run.finish(stats)  # the held-out evaluation after training, reports (the tracker still open)
    finally:
        run.close()
    return result
