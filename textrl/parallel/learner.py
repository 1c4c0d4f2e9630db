"""The learner: the one place that turns losses into weight updates.

An agent turns a rollout into a batch (``agent.prepare(rollout, reduce)``) and a minibatch into a loss
(``agent.loss(model, minibatch, clip_range)``); both are plain torch. Everything else lives here: learning-
rate and clip schedules, epochs × minibatches × gradient-accumulation micro-batches, each micro-batch's
weight in the global minibatch, DDP's ``no_sync``, backward and gradient clipping through accelerate,
DeepSpeed's engine and checkpoints, the non-finite guards and the target-KL stop.

Non-finite guards: a step whose loss or gradient is not finite is skipped (``train/nan_skipped``); a step
that leaves a trained weight non-finite (a finite gradient times a huge learning rate) is undone, with the
rest of its update, back to the copy :meth:`Learner.remember` took at the update's start
(``train/nan_undone``).

Data-parallel runs: each process takes the same number of rows from its shard for every minibatch, and each
micro-batch loss is weighted by its share of the global minibatch's loss units (× the process count, which
DDP's gradient average divides out), so the synchronised gradient is the gradient of the loss over the union
of the shards. Decisions that change control flow (a non-finite loss, the target-KL stop) are taken on
global values, so every process takes the same path.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from textrl.parallel.deepspeed import configure_deepspeed, gathered_weights, is_deepspeed
from textrl.parallel.distributed import Reducer, all_max, all_sum, world_size

__all__ = ["Learner", "trainable"]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a learner trains: those that require a gradient."""
    return [p for p in module.parameters() if p.requires_grad]


class Learner:
    """Optimises ``policy``'s trainable parameters with an agent's losses.

    Args:
        policy: the module whose ``requires_grad`` parameters are trained (the agent's policy).
        optimizer: a torch optimizer over those parameters (see :meth:`for_agent` for the agents' Adam).
        max_grad_norm: clip the global gradient norm to this value.
        accelerator: accelerate's ``Accelerator`` (backward and clipping go through it; under several
            processes it wraps the policy in DDP or a DeepSpeed engine), or None for plain torch.
        micro_batch: DeepSpeed only: rows per process per backward.
    """

    def __init__(self, policy: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 accelerator: Any = None, micro_batch: int | None = None):
        self.policy = policy
        self.params = trainable(policy)
        self.max_grad_norm = max_grad_norm
        self.accelerator = accelerator
        self.deepspeed = is_deepspeed(accelerator)
        if self.deepspeed:
            configure_deepspeed(accelerator, micro_batch or 1, max_grad_norm, world_size())
        # ``model`` is what losses call: the policy itself, or accelerate's wrapper of it (DDP when several
        # processes run, a DeepSpeed engine under DeepSpeed) that synchronises the gradients.
        self.model, self.optimizer = policy, optimizer
        if accelerator is not None:
            self.model, self.optimizer = accelerator.prepare(policy, optimizer)
        self.reduce = Reducer()
        self._good: tuple[list[torch.Tensor], dict[str, Any]] | None = None  # see remember()
        self._buffers: dict[Any, torch.Tensor] = {}  # remember()'s CPU buffers, reused
        self.undone = False  # the last apply() undid its step (and everything since remember())

    @classmethod
    def for_agent(cls, agent: Any, accelerator: Any = None, batch_rows: int | None = None) -> Learner:
        """Adam (eps from the agent's config, fused: one kernel for all parameters) over the agent's policy.
        ``batch_rows``: this process's rows (or transitions) per rollout, for DeepSpeed's micro-batch size."""
        cfg = agent.config
        optimizer = torch.optim.Adam(trainable(agent.policy), lr=cfg.learning_rate, eps=cfg.adam_eps, fused=True)
        micro = batch_rows // cfg.num_minibatches // cfg.gradient_accumulation_steps if batch_rows else None
        return cls(agent.policy, optimizer, cfg.max_grad_norm, accelerator, micro)

    # --- one update ----------------------------------------------------------------------------
    def update(self, agent: Any, rollout: Any, progress_remaining: float) -> dict[str, float]:
        """Learn from one rollout. ``progress_remaining`` goes from 1 (start of training) to 0 (end): the
        learning rate and the clip range decay linearly with it when the agent's config anneals them."""
        cfg = agent.config
        lr = cfg.learning_rate * (progress_remaining if cfg.anneal_lr else 1.0)
        clip = cfg.clip_range * (progress_remaining if cfg.anneal_clip_range else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        data, stats = agent.prepare(rollout, self.reduce)
        stats.update(self.optimise(agent, data, clip))
        stats.update({"charts/learning_rate": lr, "policy/clip_range": clip})
        return stats

    def optimise(self, agent: Any, data: dict[str, Any], clip: float) -> dict[str, float]:
        """Epochs × minibatches (× gradient-accumulation micro-batches) over the rows of ``data``'s tensors
        (non-tensor entries pass to every minibatch unchanged)."""
        cfg = agent.config
        n = data["action_mask"].shape[0]
        dev = data["action_mask"].device
        if n < cfg.num_minibatches:
            raise ValueError(f"the batch has {n} samples, fewer than num_minibatches={cfg.num_minibatches}")
        acc = _Accumulator()
        self.remember()
        for epoch in range(cfg.num_epochs):
            acc.epochs_run = epoch + 1
            if cfg.num_minibatches == 1:  # full batch: order does not matter, skip the gather
                minibatches = [torch.arange(n, device=dev)]
            else:
                minibatches = list(torch.randperm(n, device=dev).chunk(cfg.num_minibatches))
            if any(self._minibatch(agent, data, idx, clip, acc) for idx in minibatches):
                break  # the target-KL stop ends the update
        self.optimizer.zero_grad(set_to_none=True)
        return acc.stats(dev)

    def _minibatch(self, agent: Any, data: dict[str, Any], idx: torch.Tensor, clip: float,
                   acc: _Accumulator) -> bool:
        """One optimiser step on minibatch ``idx``; True when the target-KL stop fired."""
        cfg, world, dev = agent.config, world_size(), idx.device
        self.optimizer.zero_grad(set_to_none=True)
        micro = idx.chunk(cfg.gradient_accumulation_steps)
        mask = data["action_mask"]
        units = [agent.loss_units(mask[mi]) for mi in micro]
        tokens = [int(mask[mi].sum()) for mi in micro]
        total, total_tokens = (max(float(x), 1.0) for x in all_sum(
            torch.tensor([float(sum(units)), float(sum(tokens))], dtype=torch.float64, device=dev)))
        finite, mb_stats = True, {}
        for j, mi in enumerate(micro):
            mb = {k: v[mi] if torch.is_tensor(v) else v for k, v in data.items()}
            weight = units[j] / total  # this micro-batch's share of the global minibatch's loss
            last = j == len(micro) - 1
            with self.no_sync(not last):
                loss, terms, pstats = agent.loss(self.model, mb, clip)
                if acc.count == 0 and j == 0 and math.isnan(acc.first_ratio_dev):
                    acc.first_ratio_dev = float(pstats["ratio_max_dev"])  # health check: must be ~0
                approx_kl, bad = pstats["approx_kl"].detach().float(), not bool(torch.isfinite(loss))
                if world > 1:  # one collective: the global approx_kl and whether any process saw a NaN
                    agreed = all_sum(torch.stack([approx_kl * units[j], torch.tensor(float(units[j]), device=dev),
                                                  torch.tensor(float(bad), device=dev)]))
                    approx_kl, bad = agreed[0] / agreed[1].clamp(min=1), bool(agreed[2] > 0)
                if cfg.target_kl is not None and float(approx_kl) > 1.5 * cfg.target_kl:
                    return True
                if bad:
                    finite = False
                    break
                self.backward(loss * (weight * world), last=last)
            terms.update({"losses/total": loss, "policy/approx_kl": pstats["approx_kl"],
                          "policy/clipfrac": pstats["clipfrac"]})
            for key, val in terms.items():  # token means weigh by tokens, the rest by loss units
                w = tokens[j] / total_tokens if key in agent.token_mean_stats else weight
                mb_stats[key] = mb_stats.get(key, 0.0) + float(val.detach()) * w
        grad_norm = self.clip_grad_norm() if finite else None
        if not self.apply(grad_norm):
            if self.undone:  # the weights went non-finite: the update is undone and ends here
                acc.nan_undone = 1
                return True
            acc.nan_skipped += 1  # the step is skipped and the weights kept; logged as train/nan_skipped
            return False
        acc.add(mb_stats, float(grad_norm))  # after synchronisation: the same on every process
        return False

    # --- the primitives (also used by train-rm) -----------------------------------------------------
    def no_sync(self, skip: bool):
        """Skip DDP's gradient all-reduce (a micro-batch that is not its minibatch's last)."""
        if not skip or self.accelerator is None or world_size() == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        if self.accelerator is None:
            loss.backward()
            return
        if self.deepspeed:  # DeepSpeed steps inside backward at an accumulation boundary: mark it ourselves
            # (accelerate's private setter: its public API decides the boundary from its own step counter)
            self.accelerator.gradient_state._set_sync_gradients(last)
        self.accelerator.backward(loss)

    def clip_grad_norm(self) -> torch.Tensor:
        if self.accelerator is None:
            return nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.deepspeed:  # DeepSpeed clipped (and stepped) inside backward and reports the norm it saw
            return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32)
        return norm

    def apply(self, grad_norm: torch.Tensor | None) -> bool:
        """Take the optimiser step, unless the gradient is not finite (``None``: a non-finite loss was seen):
        then drop the gradients, keep the weights and return False. A step that leaves a trained weight
        non-finite is undone back to :meth:`remember`'s copy (``self.undone`` is set) and returns False."""
        self.undone = False
        if grad_norm is None or not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        if self._good is not None and not self.weights_finite():
            self.restore()
            self.undone = True
            return False
        return True

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite (one host synchronisation)."""
        return bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()) if self.params else True

    def remember(self) -> None:
        """Copy the trained weights and the optimiser state to the CPU: :meth:`apply` goes back to this copy
        when a step makes a weight non-finite. The CPU buffers are allocated once (pinned on CUDA) and
        refilled each update with asynchronous copies, queued before the update's steps on the same stream.
        (Not under DeepSpeed, whose engine steps inside backward and partitions its state; its checkpoints
        are still refused when non-finite.)"""
        if self.deepspeed:
            return
        state = self.optimizer.state_dict()
        optimizer = {"state": {k: {n: self._stash((k, n), v) if torch.is_tensor(v) else copy.deepcopy(v)
                                   for n, v in st.items()} for k, st in state["state"].items()},
                     "param_groups": copy.deepcopy(state["param_groups"])}
        self._good = ([self._stash(i, p) for i, p in enumerate(self.params)], optimizer)

    def _stash(self, key: Any, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        return buf.copy_(t.detach(), non_blocking=t.is_cuda)

    def restore(self) -> None:
        """Back to :meth:`remember`'s copy: weights and optimiser state (its tensors return to their
        parameters' devices); the gradients are dropped."""
        weights, optimizer = self._good
        with torch.no_grad():
            for p, saved in zip(self.params, weights, strict=True):
                p.copy_(saved)
        # clones: on the CPU load_state_dict would keep the buffers themselves, which remember() refills
        state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in st.items()}
                 for k, st in optimizer["state"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": copy.deepcopy(optimizer["param_groups"])})
        self.optimizer.zero_grad(set_to_none=True)

    # --- weights and state ----------------------------------------------------------------------
    def full_weights(self):
        """The whole policy gathered on every process under ZeRO-3 (see
        :func:`textrl.parallel.deepspeed.gathered_weights`); a no-op otherwise."""
        return gathered_weights(self.accelerator, self.model, self.policy)

    def state_dict(self) -> dict[str, Any]:
        """Trained weights and optimiser state (under DeepSpeed the optimiser state is partitioned across the
        processes and lives in the engine's own checkpoint: :meth:`save_engine`)."""
        trained = {id(p) for p in self.params}
        model = {n: p.detach() for n, p in self.policy.named_parameters() if id(p) in trained}
        return {"model": model, "optimizer": {} if self.deepspeed else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = self.policy.load_state_dict(state["model"], strict=False).missing_keys
        trained = {id(p) for p in self.params}
        trainable = {n for n, p in self.policy.named_parameters() if id(p) in trained}
        if trainable & set(missing):
            raise ValueError(f"checkpoint lacks trainable weights {sorted(trainable & set(missing))[:5]}")
        if not self.deepspeed:
            self.optimizer.load_state_dict(state["optimizer"])

    def save_engine(self, folder: str | Path, tag: str) -> None:
        """DeepSpeed only, on every process: the engine's checkpoint (each process writes its partition)."""
        self.model.save_checkpoint(str(folder), tag=tag)

    def load_engine(self, folder: str | Path, tag: str) -> None:
        path, _ = self.model.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise FileNotFoundError(f"resume: no DeepSpeed checkpoint {tag!r} in {str(folder)!r}")


class _Accumulator:
    """Sums of the logged terms over an update's optimiser steps, and its health counters."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count, self.nan_skipped, self.epochs_run, self.grad_norm_sum = 0, 0, 0, 0.0
        self.nan_undone = 0
        self.first_ratio_dev = float("nan")

    def add(self, mb_stats: dict[str, float], grad_norm: float) -> None:
        self.count += 1
        self.grad_norm_sum += grad_norm
        for key, val in mb_stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + val

    def stats(self, dev: torch.device) -> dict[str, float]:
        """Means over the optimiser steps; data-parallel: each process holds its shards' weighted share, so
        the sum over processes is the global value."""
        sums, first = self.sums, self.first_ratio_dev
        if world_size() > 1 and sums:
            keys = list(sums)
            totals = all_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=dev)).tolist()
            sums = dict(zip(keys, totals, strict=True))
            first = float(all_max(torch.tensor(first, device=dev)))
        stats = {k: v / max(self.count, 1) for k, v in sums.items()}
        if self.count:
            stats["train/grad_norm"] = self.grad_norm_sum / self.count
        stats.update({"policy/first_ratio_dev": first, "train/epochs_run": float(self.epochs_run),
                      "train/nan_skipped": float(self.nan_skipped), "train/nan_undone": float(self.nan_undone)})
        return stats
