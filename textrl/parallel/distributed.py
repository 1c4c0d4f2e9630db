"""Data-parallel helpers: which process this is, the few collectives textrl needs, and the reducer agents use.

textrl runs data-parallel under ``accelerate launch`` or ``torchrun``: every process holds the whole model,
steps its own shard of the vector env, and gradients are averaged by DDP (through accelerate). The batch a
run is configured with (``num_envs``) is the *global* batch; process ``r`` of ``W`` owns rows
``r·num_envs/W … (r+1)·num_envs/W − 1``. Random streams that decide the batch (prompt draws, token
sampling) are global streams of which each process uses its rows (:class:`~textrl.shard.Shard`), so a run's
batches do not depend on the process count.

Everything here is a no-op on one process (no process group), so single-process code pays nothing.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from textrl.masking import masked_whiten
from textrl.shard import Shard

__all__ = [
    "make_accelerator", "world_size", "rank", "is_main", "all_sum", "all_max", "gather_rows", "gather_objects",
    "broadcast_object", "barrier", "end", "weight_divergence", "process_shard", "Reducer",
]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def make_accelerator(device: torch.device | str, mixed_precision: str | None = "no"):
    """accelerate's ``Accelerator`` for a run on ``device``. On a machine without GPUs ``cpu=True`` (so that
    ``accelerate launch --multi_gpu`` or ``torchrun`` still gives gloo processes), except under a DeepSpeed
    launch, where DeepSpeed's own accelerator picks the device."""
    from accelerate import Accelerator

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)  # one process on cuda:N: accelerate takes the current device
    # RL runs: mixed precision is textrl's (model.bf16, the same autocast for old and new log-probs): an
    # accelerate config's mixed_precision would run only the loss's forward in bf16, so the PPO ratio would not
    # start at 1. train-rm passes None: accelerate's own setting (its config or --mixed_precision) applies.
    return Accelerator(cpu=device.type == "cpu" and not deepspeed, mixed_precision=mixed_precision)


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    return rank() == 0


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not _active():
        return t
    out = t.detach().clone()  # a new tensor; ``t`` itself is not changed
    dist.all_reduce(out, op=op)
    return out


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over processes."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_max(t: torch.Tensor) -> torch.Tensor:
    """Max over processes."""
    return _all_reduce(t, dist.ReduceOp.MAX)


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


def process_shard(rows: int) -> Shard:
    """This process's shard when every process holds ``rows`` rows (unsharded on one process)."""
    world = world_size()
    return Shard(rank() * rows, world * rows) if world > 1 else Shard()


class Reducer:
    """Global-batch statistics for agents, injected by the learner (agents import nothing distributed).

    Each process holds its rows of the global batch; these methods give what one process holding the whole
    batch would compute. On one process every method is the identity (or the plain local computation)."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch's rows of ``t`` (dim 0), in one-process row order."""
        return gather_rows(t)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """The maximum over processes of a (scalar) tensor."""
        return all_max(t)

    def local(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """This process's ``rows`` rows of ``t``, whose dim 0 is the global batch."""
        return process_shard(rows).take(t, rows)

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """:func:`~textrl.masking.masked_whiten` with the statistics of the global batch (all processes'
        rows); unchanged when it has fewer than two real positions."""
        if world_size() == 1:
            return masked_whiten(x, mask, shift_mean) if int(mask.sum()) > 1 else x
        u_x, u_m = gather_rows(x), gather_rows(mask)
        if int(u_m.sum()) <= 1:
            return x
        return self.local(masked_whiten(u_x, u_m, shift_mean), x.shape[0])
