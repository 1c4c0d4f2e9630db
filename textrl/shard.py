"""Which rows of a global batch a vector env (or a sampler) holds.

A data-parallel run splits every batch across its processes; the random streams that decide a batch
(prompt draws, token-sampling uniforms) are global streams of which each holder keeps its rows, so the
union of the shards is exactly the one-process batch. A :class:`Shard` says which rows those are. It knows
nothing of processes: :func:`textrl.parallel.distributed.process_shard` makes the current process's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Shard"]


@dataclass(frozen=True)
class Shard:
    """Rows ``offset … offset + rows − 1`` of a global batch of ``total`` rows (``total=None``: not sharded)."""

    offset: int = 0
    total: int | None = None

    def __post_init__(self) -> None:
        if self.total is not None and not (isinstance(self.total, int) and 0 <= self.offset < self.total):
            raise ValueError(f"shard must satisfy 0 <= offset < total, got offset={self.offset}, total={self.total}")

    @property
    def sharded(self) -> bool:
        return self.total is not None

    def take(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """This shard's ``rows`` rows of ``t``, whose dim 0 is the global batch."""
        return t[self.offset:self.offset + rows] if self.sharded else t
