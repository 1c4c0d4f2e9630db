"""A run on a text env: RLHF on a causal LM with any agent (PPO, RLOO, GRPO, REINFORCE++ …).

Built once: the policy (LoRA, quantised base, value head when the agent has a critic), the reference, the
text env (this process's rows of the global batch) wrapped in the KL penalty, the generator, the agent and
its learner. Around the loop: the health check, the held-out evaluation before and after (``samples.md``,
the final ``held-out reward`` line), ``curves.png``, warnings, and full-state checkpoints (weights,
optimiser, KL controller, the CPU random streams, the env's and the generator's) that resume exactly on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from textrl.agents.base import agent_class
from textrl.checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint
from textrl.config import TrainConfig, from_dict
from textrl.lm.build import (
    build_kl_env,
    build_policy,
    build_text_env,
    context_length_of,
    load_reward_model,
    policy_model_name,
    vocab_size_of,
)
from textrl.lm.collect import collect_episodes, collect_tokens
from textrl.lm.evaluate import EvalResult, evaluate_heldout, summary_line
from textrl.lm.generate import HFGenerator, resolve_decoder
from textrl.lm.models import check_model_source, quiet_saving
from textrl.lm.report import plot_curves, write_samples
from textrl.lm.static import full_attention
from textrl.parallel.deepspeed import is_zero3
from textrl.parallel.distributed import Reducer, is_main, make_accelerator, process_shard, world_size
from textrl.parallel.learner import Learner
from textrl.rollout import TokenRollout
from textrl.runs import Run, RunResult, resolve_output_dir, seed_everything, torch_device
from textrl.tracking import Tracker, check_report_to, logger

__all__ = ["LMRun", "rows_per_process", "rollout_stats", "bf16_supported", "DEEPSPEED_DIR"]

DEEPSPEED_DIR = "checkpoint_deepspeed"  # DeepSpeed's own checkpoints (tag update<N>), beside ours


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def rows_per_process(num_envs: int, world: int, agent_cfg: Any) -> int:
    """Rows per process; the batch — and each process's shard of it — must split into the agent's groups
    and minibatches."""
    agent_cfg.check_batch(num_envs)
    if world == 1:
        return num_envs
    if num_envs % world:
        raise ValueError(f"num_envs={num_envs} is the global batch and must be a multiple of the number of processes "
                         f"({world}): choose num_envs from {[world * i for i in range(1, 9)]}")
    local = num_envs // world
    try:
        agent_cfg.check_batch(local)
    except ValueError as err:
        raise ValueError(f"with {world} processes each process holds num_envs / {world} = {local} rows, and: {err}. "
                         "Raise num_envs or run fewer processes") from None
    return local


def env_rows(cfg: TrainConfig, world: int, k: int) -> int:
    """The env's rows on this process: ``sampling.slots`` with continuous batching, else its share of the batch."""
    slots = cfg.sampling.slots
    if not slots:
        return cfg.num_envs // world
    if world > 1:
        raise ValueError(f"sampling.slots={slots} (continuous batching) runs on one process, and this run has "
                         f"{world}: a data-parallel sampler's stream cannot follow rows that restart at different "
                         "steps on different processes. Set slots: 0, or run one process")
    if cfg.num_envs % k:
        raise ValueError(f"num_envs={cfg.num_envs} must be a multiple of num_generations={k} (each prompt is served k "
                         f"times per batch): e.g. num_envs: {max(k, cfg.num_envs // k * k)}")
    if slots > cfg.num_envs or slots % k:
        raise ValueError(f"sampling.slots must be at most num_envs={cfg.num_envs} and a multiple of num_generations="
                         f"{k} (groups restart together), got {slots}: e.g. slots: {max(k, cfg.num_envs // 2 // k * k)}")
    return slots


def rollout_decoder(sampling: Any, model: torch.nn.Module, device: torch.device | str, no_graphs: bool) -> str:
    """The decoder a run's rollouts use: ``sampling.decoder``, with "auto" resolved for ``device`` (compiled on
    CUDA) unless the run cannot compile its step (``no_graphs``: ZeRO-3 gathers the weights around each rollout,
    bitsandbytes' kernels do not compile) or runs continuous batching (``sampling.slots``) in a model with
    sliding-window layers, which a static cache cannot take: then dynamic. An explicit static or compiled
    decoder with slots and such a model is refused before any rollout."""
    decoder = resolve_decoder(sampling.decoder, device)
    if decoder == "dynamic" or not sampling.slots or full_attention(model):
        return "dynamic" if sampling.decoder == "auto" and no_graphs else decoder
    if sampling.decoder == "auto":
        return "dynamic"
    raise ValueError(f"sampling.decoder={sampling.decoder!r} with slots={sampling.slots}: continuous batching in a "
                     f"static cache needs full-attention layers, and {type(model).__name__} has sliding-window ones. "
                     "Set sampling.decoder: dynamic (or auto), or slots: 0")


def rollout_stats(ro: TokenRollout, reduce: Reducer) -> dict[str, float]:
    """Per-batch rollout metrics, over the union of the processes' rows (one process: its batch)."""
    scores, seq_kl = reduce.gather(ro.scores), reduce.gather(ro.kl.sum(1))  # (B_global,) each
    returns, lengths = reduce.gather(ro.rewards.sum(1)), reduce.gather(ro.action_mask.sum(1).float())
    eos = reduce.gather(ro.terminated.any(1).float())
    counts = {f"env/{k}": float(reduce.gather(v).mean()) for k, v in ro.episode_stats.items()}  # turns, tool calls…
    return {**counts,
        "reward/score_mean": float(scores.mean()),
        "reward/score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "reward/total_mean": float(returns.mean()),
        "policy/kl_ref": float(seq_kl.mean()),  # summed KL per completion
        "env/response_length": float(lengths.mean()),
        "env/eos_rate": float(eos.mean()),
    }


def eval_scalars(result: EvalResult) -> dict[str, float]:
    """The held-out evaluation as TensorBoard scalars (before training at step 0, after at the last step)."""
    return {"eval/reward_mean": result.mean, "eval/reward_se": result.se, "eval/kl": result.kl}


class LMRun(Run):
    """Any registered agent on a textrl text env (``cfg.env`` with a ``model``, or ``model.name`` given)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool = False, model: Any = None,
                 tokenizer: Any = None):
        """``model`` / ``tokenizer``: objects given from Python, used instead of loading ``cfg.model.name``."""
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        seed_everything(cfg.seed)
        self.cfg, self.quiet, self.resumed, self.history = cfg, quiet, resume, []
        check_report_to(cfg.report_to)  # a missing tracker package fails here, before any model loads
        self.notes: list[str] = []  # messages from before the tracker exists, shown at start()
        want = torch.device(torch_device(cfg.device))
        # accelerate at the edges: under `accelerate launch` / `torchrun` this joins the process group (gloo on
        # CPU, NCCL on GPUs) and the run becomes data-parallel, each process stepping its shard of the env
        accelerator = make_accelerator(want)
        self.device = accelerator.device if want.type != "cpu" else want
        if self.device.type == "cuda":  # memory/gpu_peak_mb: this run's peak, not an earlier one's in the process
            torch.cuda.reset_peak_memory_stats(self.device)
        # the process count from torch.distributed (under DeepSpeed on CPU accelerate's own state reports 1)
        self.world, self.main = world_size(), is_main()
        self._plan()
        self.output_dir, resume = resolve_output_dir(cfg, resume)
        self.resumed = resume
        if cfg.model.bf16 and not bf16_supported(self.device):
            raise ValueError(f"bf16: this {self.device.type} has no bf16 support (avx512_bf16/amx_bf16 or a bf16 "
                             "GPU); set bf16: false")
        self._build(accelerator, model, tokenizer)
        self.steps_per_update = cfg.num_envs * self.base.max_new_tokens
        self.num_updates = math.ceil(cfg.total_steps / self.steps_per_update)
        if resume:
            self._resume()
        else:  # seeds the prompt draws once; rollouts continue the stream (the same global stream on every process)
            self.base.reset(seed=cfg.seed)
        self.tracker = Tracker(self.output_dir, self.write_config(), total=self.num_updates * self.steps_per_update,
                               initial=self.global_step, enabled=self.main, quiet=quiet, report_to=cfg.report_to,
                               postfix_keys={"reward/score_mean": "score", "policy/kl_ref": "kl",
                                             "losses/policy": "pg"})
        self.comparable_weights = not is_zero3(accelerator)
        self.tokens_seen, self.warn_streak, self.before, self.fallback_told = 0.0, 0, None, False

    def _plan(self) -> None:
        """The agent and the batch's layout, checked from the config alone: before the run directory is
        touched (``--overwrite`` deletes nothing for a config that would be refused) and before any model loads."""
        cfg = self.cfg
        self.agent_cls = cls = agent_class(cfg.agent)
        self.agent_cfg = agent_cfg = from_dict(cls.config_class, cfg.agent_config)
        if cls.kl_in == "loss" and cfg.kl.target is not None:
            raise ValueError(f"kl.target={cfg.kl.target}: the adaptive β steers the KL penalty in the reward, and "
                             f"{cfg.agent} puts the KL in its loss (weight kl.coef); set kl.target: null")
        if cls.kl_in == "reward" and cfg.kl.estimator != "k1" and cfg.kl.coef > 0:
            raise ValueError(
                f"kl_estimator={cfg.kl.estimator!r}: {cfg.agent} pays the KL penalty in the reward, and there only k1 "
                "(log π − log π_ref) makes the policy gradient the gradient of KL(π‖π_ref); a k2 or k3 reward "
                "pushes in another direction (tests/test_losses.py enumerates it). Use --kl-estimator k1 (k2 and k3 "
                "suit a KL loss term: --agent grpo)")
        self.local_envs = rows_per_process(cfg.num_envs, self.world, agent_cfg)
        self.k = cls.completions_per_prompt(agent_cfg)
        given = cfg.env_kwargs.get("num_generations")  # (an agent without groups may still ask the env for them)
        k = self.k or (given if isinstance(given, int) and given > 0 else 1)
        self.env_rows = env_rows(cfg, self.world, k)  # the batch's rows, or continuous batching's slots

    def _build(self, accelerator: Any, model: Any = None, tokenizer: Any = None) -> None:
        """Policy and reference → env → agent and learner → KL wrapper (after :meth:`_plan`)."""
        cfg, cls, agent_cfg, k = self.cfg, self.agent_cls, self.agent_cfg, self.k
        sources = {"model": policy_model_name(cfg) if model is None else None, "reward_model": cfg.model.reward_model,
                   "value_model": cfg.model.value_model if cfg.model.value_model not in ("head", "policy") else None}
        for field, name in sources.items():
            if name is not None:
                check_model_source(field, name)
        low = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32} \
            if model is not None else set()
        if low:
            self.notes.append(f"note: the model object's weights are {', '.join(sorted(low))}: upcast to float32 in "
                              "place for training (bf16: true gives bf16 autocast in the update)")
        self.tokenizer, self.policy, self.reference = build_policy(cfg, self.device, cls.has_critic, model, tokenizer)
        scorer = load_reward_model(cfg.model.reward_model, self.device) if cfg.model.reward_model else None
        self.shard = process_shard(self.local_envs)
        eos = getattr(getattr(self.policy.lm, "generation_config", None), "eos_token_id", None)
        self.envs = build_text_env(cfg, self.tokenizer, self.device, self.env_rows, self.shard, k, scorer,
                                   generation_eos_ids=[eos] if isinstance(eos, int) else list(eos or ()),
                                   context_length=context_length_of(getattr(self.policy.lm, "config", None)),
                                   vocab_size=vocab_size_of(self.policy.lm))
        self.base = self.envs.unwrapped
        cls.check_env(self.envs, agent_cfg)
        self.agent = cls(agent_cfg, self.policy, kl_coef=cfg.kl.coef if cls.kl_in == "loss" else 0.0)
        self.learner = Learner.for_agent(self.agent, accelerator, self.local_envs)
        self.kl_env = build_kl_env(self.envs, self.reference, cfg.kl, cfg.sampling.temperature,
                                   in_reward=cls.kl_in == "reward")
        self.rng = torch.Generator(device=self.device).manual_seed(cfg.seed)  # the sampling stream
        decoder = rollout_decoder(cfg.sampling, self.policy.lm, self.device,
                                  no_graphs=is_zero3(accelerator) or bool(cfg.model.quantization))
        sampling = dataclasses.replace(cfg.sampling, decoder=decoder)
        self.generator = HFGenerator.from_config(self.policy.lm, sampling, self.rng, self.shard,
                                                 stop_ids=self.base.stop_token_ids)

    def _resume(self) -> None:
        out = self.output_dir
        agent_state, state = load_checkpoint(out, device=self.device)
        if not self.learner.deepspeed:  # DeepSpeed restores weights and optimiser from its own checkpoint
            self.learner.load_state_dict(agent_state)
        self.start_update, self.global_step = state["update"], state["global_step"]
        if self.learner.deepspeed:  # the partitioned optimiser state, from the engine's checkpoint of the update
            self.learner.load_engine(out / DEEPSPEED_DIR, f"update{self.start_update}")
        self.kl_env.controller.load_state_dict(state["kl_controller"])
        seed = state.get("env_seed")  # the env's seed, then its random stream where it was
        self.base.reset(seed=seed if isinstance(seed, int) and seed >= 0 else None)
        self.base.np_random.bit_generator.state = state["env_rng"]
        self.base.prompt_sampler.load_state_dict(state.get("prompt_sampler", {}))
        try:
            self.generator.load_rng_state(load_file(str(out / CHECKPOINT_DIR / "sampler.safetensors"))["state"])
        except ValueError as err:  # resumed on another device type (CPU <-> GPU): the run goes on, not exactly
            self.notes.append(f"warning: {err}; sampling continues from a stream seeded with seed + update "
                              f"{self.start_update} (the resumed run is not the uninterrupted one)")
            self.rng.manual_seed(self.cfg.seed + self.start_update)
        if self.main:
            lines = (out / "metrics.jsonl").read_text().splitlines()[:self.start_update]
            self.history = [json.loads(x) for x in lines]

    def _check_train_mode_is_deterministic(self) -> None:
        """Health check: two train-mode forwards of the policy on one input agree (dropout that no module or
        config names, e.g. a float attribute a custom attention copied at init, would make them differ)."""
        lm, ids = self.policy.lm, self.tokenizer("A health check of the policy.")["input_ids"][:8]
        ids = torch.tensor([ids or [self.base.eos_token_id]], device=self.device)
        was = lm.training
        lm.train()
        with torch.no_grad():
            first, second = (lm(input_ids=ids).logits.float() for _ in range(2))
        lm.train(was)
        gap = float((first - second).abs().max())
        if not gap <= 1e-4:
            raise ValueError(f"dropout: two train-mode forwards of the policy on the same input differ by {gap:.3g}: "
                             "a dropout that textrl could not switch off is live (RLHF needs it off: the rollout's "
                             "log-probs must be the update's). Set the model's dropout probabilities to 0")

    # --- what the loop calls --------------------------------------------------------------------
    def start(self) -> None:
        live = [m for m in self.policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if live:
            raise ValueError(f"dropout must be off in RLHF models; {len(live)} dropout module(s) have p > 0")
        if self.comparable_weights:  # (not under ZeRO-3, where a plain forward needs the engine's gathering)
            self._check_train_mode_is_deterministic()
        msg = self.tracker.message
        for note in self.notes:
            msg(note)
        if getattr(self.base, "pad_note", None):
            msg(f"note: {self.base.pad_note}")
        msg(f"health: PAD={self.base.pad_token_id} != EOS={self.base.eos_token_id}; dropout off; "
            f"reference = {'policy with LoRA adapters off' if self.policy.is_lora else 'frozen copy'}; "
            f"decoder = {self.generator.decoder}")
        if self.cfg.sampling.slots:
            msg(f"continuous batching: {self.cfg.num_envs} completions per rollout through {self.base.num_envs} rows")
        if self.world > 1:
            msg(f"data-parallel: {self.world} processes × {self.local_envs} rows = num_envs {self.cfg.num_envs} "
                f"({self.learner.accelerator.distributed_type.value}: gradients averaged across the processes)")
        if self.agent.kl_in == "loss":
            msg(f"{self.cfg.agent}: KL to the reference is a loss term (kl.coef={self.agent.kl_coef}); the env's "
                "reward carries no KL penalty")
        if not self.agent.has_critic and self.cfg.model.value_model != "head":
            msg(f"warning: value_model={self.cfg.model.value_model!r} is not used: {self.cfg.agent} has no critic")
        if self.cfg.model.bf16:
            msg("bf16 autocast on for the update (rollouts stay fp32; set bf16: false to turn it off)")
        if not self.resumed:
            self.before = self.heldout()
            if self.before is not None:  # (a no-op on the non-main processes)
                msg(f"held-out reward before training: {self.before} (kl={self.before.kl:.3f})")
                self.tracker.scalars(eval_scalars(self.before), self.global_step)

    def heldout(self) -> EvalResult | None:
        """The held-out evaluation (every process answers its share of the prompts)."""
        cfg = self.cfg
        with self.learner.full_weights():
            result = evaluate_heldout(self.base, self.policy.lm, self.reference, self.base.eval_prompts,
                                    sampling=cfg.sampling, kl=cfg.kl, generations=cfg.eval.generations,
                                    samples=cfg.eval.samples, seed=cfg.seed, progress=self.main and not self.quiet)
        if hasattr(self.base.scorer, "take_means"):
            self.base.scorer.take_means()  # the held-out answers do not count in the next update's reward/<name>
        return result

    def collect(self) -> TokenRollout:
        # Rollouts stay in fp32: bf16 noise on the logits biases the sampled tokens' log π − log π_ref upwards
        # (tokens whose logit was rounded up get sampled more), inflating the KL penalty.
        with self.learner.full_weights():
            rollout = collect_episodes(self.kl_env, self.generator, self.local_envs) if self.cfg.sampling.slots \
                else collect_tokens(self.kl_env, self.generator)
        fallback = getattr(self.generator.forward, "fallback", None)
        if fallback and not self.fallback_told:
            self.fallback_told = True
            self.tracker.message(f"warning: decoder: the compiled decode step failed ({fallback}); rollouts go on "
                                 "with the eager static-cache step (the same tokens, slower). Set sampling.decoder: "
                                 "static to skip compiling")
        return rollout

    def update(self, batch: TokenRollout, progress_remaining: float) -> dict[str, float]:
        # the update's old log-probs and new ones come from the same (bf16 or fp32) path
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.model.bf16):
            return self.learner.update(self.agent, batch, progress_remaining)

    def after_update(self, batch: TokenRollout, stats: dict[str, float], elapsed: float) -> dict[str, float]:
        out = rollout_stats(batch, self.learner.reduce)
        self.kl_env.controller.update(out["policy/kl_ref"], n_steps=self.cfg.num_envs)
        self.tokens_seen += out["env/response_length"] * self.cfg.num_envs  # agent tokens, not padded slots
        out.update({"reward/kl_coef": self.kl_env.kl_coef, "time/tokens_per_s": self.tokens_seen / elapsed})
        if hasattr(self.base.scorer, "take_means"):  # several reward functions: each one's mean (this process's rows)
            out.update({f"reward/{name}": v for name, v in self.base.scorer.take_means().items()})
        if self.device.type == "cuda":  # this run's peak so far (weights, caches, optimiser)
            out["memory/gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if stats.get("policy/approx_kl", 0) > 0.1 or stats.get("policy/clipfrac", 0) > 0.3:
            self.warn_streak += 1
            if self.warn_streak == 3:
                self.tracker.message("warning: approx_kl > 0.1 or clipfrac > 0.3 for 3 updates: lower the learning "
                                     "rate, lower clip_range (0.2 -> 0.1) or raise kl.coef (--kl-coef 0.05 -> 0.1)")
        else:
            self.warn_streak = 0
        return out

    def checkpoint(self, update: int) -> None:
        out = self.output_dir
        if self.learner.deepspeed:  # every process writes its partition of the optimiser state first
            self.learner.save_engine(out / DEEPSPEED_DIR, f"update{update}")
        with self.learner.full_weights():
            if self.main:  # written once: the processes' states are identical (the env's and sampler's streams
                # are global, weights and optimiser synchronised): any process count can resume it
                self._save(update)
                for old in (out / DEEPSPEED_DIR).glob("update*"):  # keep the engine's matching one
                    if old.name != f"update{update}":
                        shutil.rmtree(old, ignore_errors=True)
            self.barrier()

    def _save(self, update: int) -> None:
        policy, tokenizer = self.policy, self.tokenizer

        def extra(ckpt: Path) -> None:
            save_file({"state": self.generator.rng_state()}, str(ckpt / "sampler.safetensors"))
            # The policy in Hugging Face layout (peft adapter or full model) and the value head, for users
            # (no "Writing model shards" bar in the run's log at every checkpoint).
            with quiet_saving():
                policy.lm.save_pretrained(ckpt / "policy", safe_serialization=True)
            tokenizer.save_pretrained(ckpt / "policy")
            if policy.value_head is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in policy.value_head.state_dict().items()},
                          str(ckpt / "value_head.safetensors"))
            if policy.critic is not None:  # the separate critic's trunk, in Hugging Face layout
                with quiet_saving():
                    policy.critic.save_pretrained(ckpt / "critic", safe_serialization=True)

        save_checkpoint(self.output_dir, self.learner.state_dict(), {
            "update": update, "global_step": self.global_step, "kl_controller": self.kl_env.controller.state_dict(),
            "env_rng": self.base.np_random.bit_generator.state, "env_seed": self.base.np_random_seed,
            "prompt_sampler": self.base.prompt_sampler.state_dict(),
        }, write_extra=extra, keep=self.cfg.keep_checkpoints)

    def finish(self, stats: dict[str, float]) -> RunResult:
        after = self.heldout()
        result = RunResult(self.output_dir, self.global_step, self.num_updates, self.history, stats)
        if not self.main:
            return result
        if self.history and not plot_curves(self.history, self.output_dir / "curves.png"):
            self.tracker.message("warning: curves.png skipped: matplotlib is not installed (pip install "
                                 "'textrl-gym[examples]'); the curves are in TensorBoard and metrics.jsonl")
        write_samples(self.output_dir / "samples.md", self.before, after)
        if after is not None:
            self.tracker.scalars(eval_scalars(after), self.global_step)
            samples = self.output_dir / "samples.md"  # (a resumed run has no "before" and writes none)
            if self.before is not None and samples.is_file():
                self.tracker.text("eval/samples", samples.read_text(), self.global_step)
            if not self.quiet:
                logger.info(summary_line(self.before, after))
        result.before, result.after = self.before, after
        return result
