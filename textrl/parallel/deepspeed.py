"""DeepSpeed ZeRO-2/3 under ``accelerate launch``: the few places where textrl must know about it.

The learner (:mod:`textrl.parallel.learner`) configures the engine and marks the accumulation boundary; the
LM run loads frozen models whole (:func:`unpartitioned_loading`) and runs generation, evaluation and saving
with the policy's weights gathered (:func:`gathered_weights`). Everything is a no-op without DeepSpeed.
"""

from __future__ import annotations

import contextlib

__all__ = ["is_deepspeed", "is_zero3", "zero3_loading", "unpartitioned_loading", "configure_deepspeed",
           "gathered_weights"]


def is_deepspeed(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type.value == "DEEPSPEED"


def is_zero3(accelerator) -> bool:
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def zero3_loading() -> bool:
    """True while transformers partitions every ``from_pretrained`` across the processes (ZeRO-3's init)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def unpartitioned_loading():
    """Models loaded inside this context are whole on every process even under ZeRO-3's ``zero3_init_flag``
    (which partitions every ``from_pretrained`` while it loads): for frozen models no DeepSpeed engine owns —
    reward models, scorers, a full-copy reference. A no-op otherwise."""
    if not zero3_loading():
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


def configure_deepspeed(accelerator, micro_batch: int, max_grad_norm: float, processes: int) -> None:
    """DeepSpeed's batch settings, from textrl's: ``micro_batch`` rows per process per backward; DeepSpeed's
    own gradient accumulation stays 1 because textrl weights its micro-batches itself and marks the
    accumulation boundary (see :meth:`textrl.parallel.learner.Learner.backward`); gradients clipped at
    ``max_grad_norm``."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds.update({"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
               "train_batch_size": micro_batch * processes, "gradient_clipping": max_grad_norm})


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
