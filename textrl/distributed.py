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

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "Shard", "make_accelerator", "world_size", "rank", "is_main", "all_sum", "all_max", "gather_rows",
    "gather_objects", "broadcast_object", "barrier", "end", "weight_divergence", "is_deepspeed", "is_zero3",
    "configure_deepspeed", "gathered_weights", "unpartitioned_loading",
]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def make_accelerator(device: torch.device | str):
    """accelerate's ``Accelerator`` for a run on ``device``. On a machine without GPUs ``cpu=True`` (so that
    ``accelerate launch --multi_gpu`` or ``torchrun`` still gives gloo processes), except under a DeepSpeed
    launch, where DeepSpeed's own accelerator picks the device."""
    from accelerate import Accelerator

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return Accelerator(cpu=torch.device(device).type == "cpu" and not deepspeed)


def is_deepspeed(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type.value == "DEEPSPEED"


def is_zero3(accelerator) -> bool:
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def unpartitioned_loading():
    """Models loaded inside this context are whole on every process even under ZeRO-3's ``zero3_init_flag``
    (which partitions every ``from_pretrained`` while it loads): for frozen models no DeepSpeed engine owns —
    reward models, scorers, a full-copy reference. A no-op otherwise."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    return _zero3_init_off()


@contextlib.contextmanager
def _zero3_init_off():
    # transformers partitions a from_pretrained while its DeepSpeed config (registered by accelerate) says ZeRO-3;
    # accelerate 1.15's zero3_init_context_manager(enable=False) re-registers the same stage-3 config, so the
    # registration itself is lifted here and restored after.
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    config = AcceleratorState().deepspeed_plugin.dschf
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def configure_deepspeed(accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """DeepSpeed's batch settings, from textrl's: ``micro_batch`` rows per process per backward; DeepSpeed's
    own gradient accumulation stays 1 because textrl weights its micro-batches itself and marks the
    accumulation boundary (``accelerator.gradient_state``); gradients clipped at ``max_grad_norm``."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds.update({"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
               "train_batch_size": micro_batch * world_size(), "gradient_clipping": max_grad_norm})


def gathered_weights(accelerator, engine, module):
    """Under DeepSpeed ZeRO-3 every weight is partitioned across the processes and each forward gathers a
    layer's weights (a collective). Code that runs ``module`` outside lockstep forwards — generation, whose
    length differs between processes, and work done by the main process alone (evaluation, saving) — runs
    inside this context on *every* process: it gathers the whole module once (it must fit one device, as in
    TRL's ``ds3_gather_for_generation``). A no-op without ZeRO-3."""
    if not is_zero3(accelerator):
        return contextlib.nullcontext()
    return _zero3_gathered(engine, module)


@contextlib.contextmanager
def _zero3_gathered(engine, module):
    import deepspeed

    # DeepSpeed's per-module forward hooks fetch (all-gather) parameters even when they are already gathered:
    # off while gathered, or processes that run different numbers of forwards deadlock. (Private DeepSpeed API;
    # TRL's unwrap_model_for_generation does the same.)
    # The root module's start-of-forward hook checks (a collective) that every process runs the same step.
    offload = engine.optimizer.parameter_offload
    root = offload.module
    start_hook = root._forward_pre_hooks.get(offload.fwd_pre_hook.id)
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        for hook in [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            if start_hook is not None:
                offload.fwd_pre_hook = root.register_forward_pre_hook(start_hook, prepend=True)
            offload._register_deepspeed_module(root)


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


@dataclass(frozen=True)
class Shard:
    """Rows ``offset … offset + rows − 1`` of a global batch of ``total`` rows (``total=None``: not sharded).

    A sharded env draws what the global batch needs from its (identically seeded) random streams and keeps
    its rows, so every process's streams stay in step with each other and with the one-process run.
    """

    offset: int = 0
    total: int | None = None

    def __post_init__(self) -> None:
        if self.total is not None and not (isinstance(self.total, int) and 0 <= self.offset < self.total):
            raise ValueError(f"shard must satisfy 0 <= offset < total, got offset={self.offset}, total={self.total}")

    @classmethod
    def current(cls, rows: int) -> Shard:
        """This process's shard when every process holds ``rows`` rows (unsharded on one process)."""
        world = world_size()
        return cls(rank() * rows, world * rows) if world > 1 else cls()

    @property
    def sharded(self) -> bool:
        return self.total is not None

    def take(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """This shard's ``rows`` rows of ``t``, whose dim 0 is the global batch."""
        return t[self.offset:self.offset + rows] if self.sharded else t
