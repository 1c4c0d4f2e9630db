"""Data-parallel helpers: which process this is, and the few collectives the trainers need.

textrl runs data-parallel under ``accelerate launch`` or ``torchrun``: every process holds the whole model,
steps its own shard of the vector env, and gradients are averaged by DDP (through accelerate). The batch a
run is configured with (``num_envs``) is the *global* batch; process ``r`` of ``W`` owns rows
``r·num_envs/W … (r+1)·num_envs/W − 1``. Random streams that decide the batch (prompt draws, token
sampling) are global streams of which each process uses its rows, so a run's batches do not depend on the
process count: the union of the shards is exactly the one-process batch (see :class:`Shard`).

Everything here is a no-op on one process (no process group), so single-process code pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Shard", "world_size", "rank", "is_main", "all_sum", "all_max", "gather_rows", "gather_objects", "broadcast_object",
           "barrier", "end", "weight_divergence"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    return rank() == 0


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over processes (a new tensor; ``t`` itself is not changed)."""
    if not _active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_max(t: torch.Tensor) -> torch.Tensor:
    if not _active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``t`` along dim 0 in rank order (shapes must match): the union of the
    shards, in the row order of the one-process batch."""
    if not _active():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def gather_objects(items: list) -> list:
    """Every process's list, concatenated in rank order (e.g. the returns of the episodes that finished)."""
    if not _active():
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def broadcast_object(obj):
    """The main process's ``obj`` on every process (e.g. a run directory named after the clock)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _active():
        dist.barrier()


def end() -> None:
    """Wait for every process, then leave the process group (a process exiting while another still works,
    e.g. the main one evaluating, can make the others' transport abort)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def weight_divergence(params: list[torch.Tensor]) -> float:
    """Max − min over processes of a float64 fingerprint of ``params`` (Σ p and Σ p·position of every
    tensor): exactly 0 when all processes hold bit-identical weights."""
    with torch.no_grad():
        fp = torch.zeros(2, dtype=torch.float64, device=params[0].device)
        for p in params:
            flat = p.detach().reshape(-1).double()
            fp[0] += flat.sum()
            fp[1] += (flat * torch.linspace(0.5, 1.5, flat.numel(), dtype=torch.float64, device=flat.device)).sum()
        return float((all_max(fp) + all_max(-fp)).abs().max())


@dataclass(frozen=True)
class Shard:
    """Rows ``index·rows … (index+1)·rows − 1`` of a global batch of ``count·rows`` rows.

    A sharded env draws what the global batch needs from its (identically seeded) random stream and keeps
    its slice, so every process's stream stays in step with the one-process run.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard must satisfy 0 <= index < count, got index={self.index}, count={self.count}")

    @classmethod
    def current(cls) -> Shard:
        """This process's shard of a data-parallel run (``Shard(0, 1)`` on one process)."""
        return cls(rank(), world_size())

    def take(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """This shard's ``rows`` rows of ``t``, whose dim 0 is the global batch (``count·rows``)."""
        if self.count == 1:
            return t
        return t[self.index * rows:(self.index + 1) * rows]
