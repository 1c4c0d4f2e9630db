"""Training on text envs: RLHF with PPO on a causal LM, token-level env, KL to a frozen reference.

The loop reads as the classic one: ``rollout = text_rollout(envs, policy)``, ``stats = agent.update(rollout)``,
``tracker.log(stats)``. Around it: held-out evaluation before and after (``samples.md``, the final
``held-out reward`` line), ``curves.png``, health-check warnings, full-state checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import torch
import yaml
from safetensors.torch import load_file, save_file

from textrl.agents.base import agent_class
from textrl.checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint
from textrl.config import TrainConfig, from_dict, to_dict
from textrl.distributed import (
    Shard,
    barrier,
    broadcast_object,
    gather_objects,
    gather_rows,
    gathered_weights,
    is_main,
    is_zero3,
    make_accelerator,
    rank,
    unpartitioned_loading,
    weight_divergence,
    world_size,
)
from textrl.envs.kl_penalty import KLPenalty
from textrl.envs.text_gen import TextGenVectorEnv
from textrl.kl_control import make_kl_controller
from textrl.lm_policy import LMActorCritic, add_lora
from textrl.models import load_causal_lm, load_tokenizer
from textrl.text_rollout import TextRollout, sync_sampler, text_rollout
from textrl.tracking import Tracker

__all__ = ["is_text_env", "train_text", "TextRunResult", "evaluate"]


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def is_text_env(cfg: TrainConfig) -> bool:
    """A run is a text run when a policy model is given or the env's spec names a default one."""
    return cfg.model is not None or "model" in gym.spec(cfg.env).kwargs


@dataclass
class EvalResult:
    mean: float
    se: float
    kl: float  # mean summed KL per completion
    samples: list[tuple[str, str]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # per held-out prompt, in prompt order

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.se:.4f}"


def paired_gain(before: EvalResult, after: EvalResult) -> tuple[float, float]:
    """Mean and standard error of after − before over the same held-out prompts (a paired comparison: the
    prompt-to-prompt spread of the score cancels; both evaluations also share the sampling seed)."""
    d = torch.tensor(after.scores, dtype=torch.float64) - torch.tensor(before.scores, dtype=torch.float64)
    if d.numel() < 2:
        return float("nan"), float("nan")
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def summary_line(before: EvalResult | None, after: EvalResult) -> str:
    """``held-out reward: BEFORE ± SE -> AFTER ± SE (kl=K)``, plus the paired gain when both exist."""
    head = f"{before}" if before is not None else "(resumed)"
    line = f"held-out reward: {head} -> {after} (kl={after.kl:.3f})"
    if before is not None and len(before.scores) == len(after.scores):
        gain, se = paired_gain(before, after)
        line += f"; paired gain {gain:+.4f} ± {se:.4f} ({gain / se if se > 0 else float('nan'):.1f} SE)"
    return line


@dataclass
class TextRunResult:
    output_dir: Path
    global_step: int
    updates: int
    before: EvalResult | None
    after: EvalResult | None
    history: list[dict[str, float]] = field(default_factory=list)


DEEPSPEED_DIR = "checkpoint_deepspeed"  # DeepSpeed's own checkpoints (tag update<N>), beside ours
_REWARD_MODELS: dict[str, object] = {}  # one loaded reward model per path, shared by the train and eval envs


def _text_env(cfg: TrainConfig, tokenizer, device, num_envs: int | None = None, **overrides) -> TextGenVectorEnv:
    kwargs = {**cfg.env_kwargs, **overrides}
    with unpartitioned_loading():  # scorer models are frozen and whole on every process, even under ZeRO-3
        if cfg.reward_model:
            from textrl.reward_model import TrainedRewardScorer

            if cfg.reward_model not in _REWARD_MODELS:
                _REWARD_MODELS[cfg.reward_model] = TrainedRewardScorer(cfg.reward_model, device=device)
            kwargs["scorer"] = _REWARD_MODELS[cfg.reward_model]
        return gym.make_vec(cfg.env, num_envs=num_envs or cfg.num_envs, tokenizer=tokenizer, device=device,
                            **kwargs)


def build_critic(cfg: TrainConfig, policy_name: str, lm: torch.nn.Module) -> torch.nn.Module | None:
    """The separate critic trunk of ``value_model`` (None for "head"), fully trainable, checked against the
    policy's vocabulary (the critic reads the policy's token ids)."""
    if cfg.value_model == "head":
        return None
    if cfg.quantization and cfg.value_model == "policy":
        raise ValueError("value_model: 'policy' copies the policy's weights, which are quantised here; "
                         "give the critic's model name/path instead, or use value_model: head")
    # (a copy is loaded afresh when ZeRO-3 partitioned the policy while loading it: a deep copy would copy shards)
    copy_policy = cfg.value_model == "policy" and not _zero3_loading()
    critic = copy.deepcopy(lm) if copy_policy else load_causal_lm(policy_name if cfg.value_model == "policy"
                                                                   else cfg.value_model)
    vocab, need = critic.get_input_embeddings().num_embeddings, lm.get_input_embeddings().num_embeddings
    if vocab < need:
        raise ValueError(f"value_model: {cfg.value_model!r} has a vocabulary of {vocab} tokens, the policy "
                         f"{policy_name!r} {need}; the critic must share the policy's tokenizer")
    for p in critic.parameters():
        p.requires_grad_(True)
    return critic


def build_policy(cfg: TrainConfig, device: torch.device):
    name = cfg.model or gym.spec(cfg.env).kwargs["model"]
    tokenizer = load_tokenizer(name)
    lm = load_causal_lm(name, quantization=cfg.quantization)
    critic = build_critic(cfg, name, lm)
    reference = None
    if cfg.lora_r > 0:
        for p in lm.parameters():
            p.requires_grad_(False)
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, list(cfg.lora_targets) or None)
    elif _zero3_loading():  # the frozen copy, whole on every process (ZeRO-3 partitioned the policy's load)
        with unpartitioned_loading():
            reference = load_causal_lm(name)
    else:
        reference = copy.deepcopy(lm)  # a frozen copy (the KL wrapper freezes it)
    policy = LMActorCritic(lm, critic).to(device)
    reference = policy.reference() if reference is None else reference.to(device)
    return tokenizer, policy, reference


def _zero3_loading() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _group_kwargs(cfg: TrainConfig, agent_cfg) -> dict[str, int]:
    """The env's ``num_generations`` from the agent's (RLOO/GRPO); a conflicting env_kwargs value is an error."""
    k = getattr(agent_cfg, "num_generations", None)
    if k is None:
        return {}
    given = cfg.env_kwargs.get("num_generations", k)
    if given != k:
        raise ValueError(f"env_kwargs.num_generations={given} conflicts with {cfg.agent}.num_generations={k}; "
                         "set it once, in the agent's section")
    return {"num_generations": k}


@torch.no_grad()
def evaluate(cfg: TrainConfig, policy: LMActorCritic, reference, tokenizer, device, prompts: list[str] | None,
             n_samples: int) -> EvalResult | None:
    """Answer every held-out prompt ``eval_generations`` times (sequential order, fixed sampling seed, rows of
    at most 64). A prompt's score is the mean of its answers; the result is the mean over prompts ± the
    standard error of that mean (prompts are the independent units).

    Data-parallel runs call it on every process: each takes a contiguous share of every chunk of rows (its
    slice of the chunk's sampling uniforms, as in training), and the rows are gathered, so the result is the
    one-process result."""
    if not prompts:
        return None
    k = cfg.eval_generations
    rows = [p for p in prompts for _ in range(k)]
    per_prompt = torch.zeros(len(prompts), dtype=torch.float64)
    samples, kl_sum = [], 0.0
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    chunk = max(k, 64 // k * k)
    world, me = world_size(), rank()
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        lo, hi = me * len(part) // world, (me + 1) * len(part) // world  # this process's rows of the chunk
        shard = Shard(lo, len(part)) if world > 1 else Shard()
        sharded = {"shard": shard} if world > 1 else {}
        mine: list[tuple[float, float, str]] = []
        if hi > lo:
            env = KLPenalty(_text_env(cfg, tokenizer, device, num_envs=hi - lo, prompts=part, **sharded,
                                      prompt_order="sequential", num_generations=1),
                            reference, 0.0, cfg.kl_estimator, cfg.temperature, cfg.reference_pass)
            ro = text_rollout(env, policy.lm, cfg.temperature, cfg.top_k, cfg.top_p, seed=cfg.seed, generator=gen)
            mine = list(zip(ro.scores.tolist(), ro.kl.sum(1).tolist(), _completions(tokenizer, ro), strict=True))
        else:  # no rows here (a chunk smaller than the process count): keep the sampler in step
            sync_sampler(0, 0, shard, device, gen)
        scores, kls, texts = zip(*gather_objects(mine), strict=True)  # the chunk's rows, in row order
        first = start // k  # rows are prompt-major: row j answers prompt first + j // k
        per_prompt.index_add_(0, first + torch.arange(len(part)) // k, torch.tensor(scores, dtype=torch.float64) / k)
        kl_sum += float(torch.tensor(kls, dtype=torch.float32).sum())
        samples += [(part[j], texts[j]) for j in range(0, len(part), k)]  # the first answer of each prompt
    n = len(prompts)
    se = float(per_prompt.std() / math.sqrt(n)) if n > 1 else float("nan")
    return EvalResult(float(per_prompt.mean()), se, kl_sum / len(rows), samples[:n_samples], per_prompt.tolist())


def _completions(tokenizer, ro: TextRollout) -> list[str]:
    ids = [t[m].tolist() for t, m in zip(ro.tokens, ro.mask, strict=True)]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _check_health(policy: LMActorCritic, envs: TextGenVectorEnv, tracker: Tracker) -> None:
    live = [m for m in policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if live:
        raise ValueError(f"dropout must be off in RLHF models; {len(live)} dropout module(s) have p > 0")
    tracker.message(f"health: PAD={envs.pad_token_id} != EOS={envs.eos_token_id}; dropout off; "
                    f"reference = {'policy with LoRA adapters off' if policy.is_lora else 'frozen copy'}")


def _write_samples(path: Path, before: EvalResult | None, after: EvalResult | None) -> None:
    if before is None or after is None:
        return
    lines = ["# Held-out samples, before and after training\n",
             summary_line(before, after) + "\n"]
    for (prompt, b), (_, a) in zip(before.samples, after.samples, strict=True):
        lines += [f"## Prompt\n\n{prompt.strip()}\n", f"**Before:** {b.strip()}\n", f"**After:** {a.strip()}\n"]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward/score_mean", "reward (score)"), ("policy/kl_ref", "KL to reference (nats/completion)"),
            ("policy/entropy", "entropy (nats/token)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    steps = [h["global_step"] for h in history]
    for ax, (key, label) in zip(axes, keys, strict=True):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], marker="o", ms=3)
        ax.set_title(label)
        ax.set_xlabel("generated tokens (rows × max_new_tokens)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_text(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> TextRunResult:
    from textrl.train import default_output_dir, seed_everything

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)

    want = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                        ("cpu" if cfg.device == "auto" else cfg.device))
    # accelerate at the edges: device placement, backward, gradient clipping; the maths and the env are plain torch
    # Under `accelerate launch` / `torchrun` this joins the process group (gloo on CPU, NCCL on GPUs): the run
    # becomes data-parallel, each process stepping its shard of the env (see textrl.distributed).
    accelerator = make_accelerator(want)
    device = accelerator.device if want.type != "cpu" else want
    world, main = world_size(), is_main()  # from the process group (accelerate on CPU + DeepSpeed reports 1)
    if cfg.output_dir is None:
        cfg.output_dir = broadcast_object(default_output_dir(cfg))  # one directory, named by the main process
    out = Path(cfg.output_dir)

    bf16 = cfg.bf16
    if bf16 and not bf16_supported(device):
        raise ValueError(f"bf16: this {device.type} has no bf16 support (avx512_bf16/amx_bf16 or a bf16 GPU); set bf16: false")
    cls = agent_class(cfg.agent)
    agent_cfg = from_dict(cls.config_class, cfg.agent_config)
    agent_cfg.check_batch(cfg.num_envs, rows_only=True)  # fail before loading any model
    local_envs = _check_shards(cfg.num_envs, world, agent_cfg)
    tokenizer, policy, reference = build_policy(cfg, device)
    shard = {"shard": Shard.current(local_envs)} if world > 1 else {}
    envs = _text_env(cfg, tokenizer, device, num_envs=local_envs, **shard, **_group_kwargs(cfg, agent_cfg))
    if not isinstance(envs.unwrapped, TextGenVectorEnv):
        raise TypeError(f"env: {cfg.env} is not a textrl text env (got {type(envs.unwrapped).__name__})")
    agent = cls(envs, agent_cfg, device=str(device), policy=policy, accelerator=accelerator)
    agent.temperature = cfg.temperature
    # Agents with the KL in their loss (GRPO) get an env penalty of 0; the env still reports ref log-probs and KL.
    kl_in_reward = getattr(cls, "kl_in_reward", True)
    kl_ctl = make_kl_controller(cfg.kl_coef if kl_in_reward else 0.0, cfg.kl_target if kl_in_reward else None,
                                cfg.kl_horizon)
    kl_env = KLPenalty(envs, reference, kl_ctl, cfg.kl_estimator, cfg.temperature, cfg.reference_pass)
    base = envs.unwrapped
    steps_per_update = cfg.num_envs * base.max_new_tokens
    num_updates = math.ceil(cfg.total_steps / steps_per_update)
    sampler = torch.Generator(device=device).manual_seed(cfg.seed)

    start_update, global_step, history = 0, 0, []
    if resume:
        agent_state, state = load_checkpoint(out, device=device)
        if not agent.deepspeed:  # DeepSpeed restores weights and optimiser from its own checkpoint (below)
            agent.load_state_dict(agent_state)
        start_update, global_step = state["update"], state["global_step"]
        if agent.deepspeed:  # the partitioned optimiser state, from the engine's checkpoint of the same update
            agent.load_engine(out / DEEPSPEED_DIR, f"update{start_update}")
        kl_ctl.load_state_dict(state["kl_controller"])
        base.np_random.bit_generator.state = state["env_rng"]
        base._np_random_seed = state.get("env_seed")
        sampler.set_state(load_file(str(out / CHECKPOINT_DIR / "sampler.safetensors"))["state"])
        if main:
            history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][:start_update]
    else:
        # seeds the prompt sampler once; rollouts continue its stream. Every process seeds the same global
        # stream and keeps its shard's draws.
        base.reset(seed=cfg.seed)
    resolved = {**to_dict(cfg), "agent_config": to_dict(agent.config)}
    if main:  # the main process writes every file of the run; the others only train
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    tracker = Tracker(out, resolved, total=num_updates * steps_per_update, initial=global_step, enabled=main,
                      postfix_keys={"reward/score_mean": "score", "policy/kl_ref": "kl", "losses/policy": "pg"})
    _check_health(policy, base, tracker)
    if world > 1:
        tracker.message(f"data-parallel: {world} processes × {local_envs} rows = num_envs {cfg.num_envs} "
                        f"({accelerator.distributed_type.value}: gradients averaged across the processes)")
    if not kl_in_reward:
        tracker.message(f"{cfg.agent}: KL to the reference is a loss term (beta={getattr(agent.config, 'beta', 0)}); "
                        "the env's reward carries no KL penalty (kl_coef ignored)")
    if bf16:
        tracker.message("bf16 autocast on for the PPO update (rollouts stay fp32; set bf16: false to turn it off)")
    with full_weights(agent):  # held-out evaluation: every process answers its share of the prompts
        before = None if resume else evaluate(cfg, policy, reference, tokenizer, device, base.eval_prompts,
                                              cfg.eval_samples)
    if before is not None and not quiet:  # (a no-op on the non-main processes)
        tracker.message(f"held-out reward before training: {before} (kl={before.kl:.3f})")

    warn_streak = 0
    start_time, start_step = time.perf_counter(), global_step
    try:
        for update in range(start_update, num_updates):
            # Rollouts stay in fp32: bf16 noise on the logits biases the sampled tokens' log π − log π_ref
            # upwards (tokens whose logit was rounded up get sampled more), inflating the KL penalty.
            with full_weights(agent):
                ro = text_rollout(kl_env, policy.lm, cfg.temperature, cfg.top_k, cfg.top_p, generator=sampler)
            global_step += steps_per_update
            with autocast(device, bf16):  # the update: old log-probs and new ones come from the same bf16 path
                stats = agent.update(ro, progress_remaining=1.0 - update / num_updates)
            stats.update(rollout_stats(ro))  # over the global batch (every process's rows)
            kl_ctl.update(stats["policy/kl_ref"], n_steps=cfg.num_envs)
            stats.update({
                "reward/kl_coef": kl_env.kl_coef,
                "time/tokens_per_s": (global_step - start_step) / (time.perf_counter() - start_time),
            })
            if world > 1 and not is_zero3(agent.accelerator):  # 0 when every process holds the same weights
                stats["dist/weight_divergence"] = weight_divergence(agent.params)
                if stats["dist/weight_divergence"] > 0:
                    tracker.message(f"warning: update {update}: the processes' weights differ "
                                    f"(divergence {stats['dist/weight_divergence']:.3g})")
            tracker.log(stats, global_step)
            history.append({"global_step": global_step, **stats})
            if stats.get("policy/approx_kl", 0) > 0.1 or stats.get("policy/clipfrac", 0) > 0.3:
                warn_streak += 1
                if warn_streak == 3:
                    tracker.message("warning: approx_kl > 0.1 or clipfrac > 0.3 for 3 updates: lower the learning "
                                    "rate, lower clip_range (0.2 -> 0.1) or raise kl_coef (0.05 -> 0.1)")
            else:
                warn_streak = 0
            if stats.get("train/nan_skipped"):
                tracker.message(f"update {update}: skipped {int(stats['train/nan_skipped'])} non-finite step(s)")
            last = update + 1 == num_updates
            if last or (cfg.checkpoint_every and (update + 1) % cfg.checkpoint_every == 0):
                if agent.deepspeed:  # every process writes its partition of the optimiser state first
                    agent.save_engine(out / DEEPSPEED_DIR, f"update{update + 1}")
                with full_weights(agent):
                    if main:  # written once: the processes' states are identical (the env's and sampler's
                        # streams are global, weights and optimiser synchronised): any process count can resume it
                        _save(out, agent, policy, tokenizer, kl_ctl, base, sampler, update + 1, global_step)
                        for old in (out / DEEPSPEED_DIR).glob("update*"):  # keep the engine's matching one
                            if old.name != f"update{update + 1}":
                                shutil.rmtree(old, ignore_errors=True)
                    barrier()
    finally:
        tracker.close()

    with full_weights(agent):
        after = evaluate(cfg, policy, reference, tokenizer, device, base.eval_prompts, cfg.eval_samples)
    if not main:
        return TextRunResult(out, global_step, num_updates, None, None, history)
    if history:
        plot_curves(history, out / "curves.png")
    _write_samples(out / "samples.md", before, after)
    if after is not None and not quiet:
        print(summary_line(before, after), file=sys.stderr)
    return TextRunResult(out, global_step, num_updates, before, after, history)


def full_weights(agent):
    """The whole policy gathered on every process under ZeRO-3 (:func:`textrl.distributed.gathered_weights`)."""
    return gathered_weights(agent.accelerator, agent.model, agent.policy)


def rollout_stats(ro: TextRollout) -> dict[str, float]:
    """Per-batch rollout metrics, over the union of the processes' rows (one process: its batch)."""
    scores, seq_kl = gather_rows(ro.scores), gather_rows(ro.kl.sum(1))  # (B_global,) each
    returns, lengths = gather_rows(ro.rewards.sum(1)), gather_rows(ro.mask.sum(1).float())
    eos = gather_rows(ro.terminated.any(1).float())
    return {
        "reward/score_mean": float(scores.mean()),
        "reward/score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "reward/total_mean": float(returns.mean()),
        "policy/kl_ref": float(seq_kl.mean()),  # summed KL per completion
        "env/response_length": float(lengths.mean()),
        "env/eos_rate": float(eos.mean()),
    }


def _check_shards(num_envs: int, world: int, agent_cfg) -> int:
    """Rows per process; the shard must split into the agent's groups and minibatches like the whole batch."""
    if world == 1:
        return num_envs
    if num_envs % world:
        raise ValueError(f"num_envs={num_envs} is the global batch and must be a multiple of the number of processes "
                         f"({world}): choose num_envs from {[world * i for i in range(1, 9)]}")
    local = num_envs // world
    try:
        agent_cfg.check_batch(local, rows_only=True)
    except ValueError as err:
        raise ValueError(f"with {world} processes each process holds num_envs / {world} = {local} rows, and: {err}. "
                         "Raise num_envs or run fewer processes") from None
    return local


def _save(out: Path, agent, policy: LMActorCritic, tokenizer, kl_ctl, base, sampler, update: int, step: int) -> None:
    def extra(ckpt: Path) -> None:
        save_file({"state": sampler.get_state()}, str(ckpt / "sampler.safetensors"))
        # The policy in Hugging Face layout (peft adapter or full model) and the value head, for users.
        policy.lm.save_pretrained(ckpt / "policy", safe_serialization=True)
        tokenizer.save_pretrained(ckpt / "policy")
        save_file({k: v.detach().cpu().contiguous() for k, v in policy.value_head.state_dict().items()},
                  str(ckpt / "value_head.safetensors"))
        if policy.critic is not None:  # the separate critic's trunk, in Hugging Face layout
            policy.critic.save_pretrained(ckpt / "critic", safe_serialization=True)

    save_checkpoint(out, agent.state_dict(), {
        "update": update, "global_step": step, "kl_controller": kl_ctl.state_dict(),
        "env_rng": base.np_random.bit_generator.state, "env_seed": base.np_random_seed,
    }, write_extra=extra)
