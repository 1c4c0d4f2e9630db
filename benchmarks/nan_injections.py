"""Non-finite values injected into training, systematically: where a NaN or an inf can enter (a scorer, a reward,
the policy's logits, the value head, the reference, a gradient, the learning rate, the initial weights, a
classic env's reward or observation), once or for good, for text PPO, GRPO and CartPole. Counts how each run
ends.

    python benchmarks/nan_injections.py [--only NAME ...]

Each case runs in this process (the toy env with a tiny random model, 4 updates of 16 rows; CartPole 6 updates
of 256 steps), a checkpoint after every update, the value injected during the second update. A case is

- **survived**: the run finished and logged what it did (``train/nan_skipped``, ``train/nan_undone``, or a
  skipped row), with finite weights and a verified, finite last checkpoint;
- **stopped clearly**: the run stopped with an error that says what was not finite (ValueError /
  FloatingPointError naming it), and its last checkpoint verifies and is finite (``--resume`` goes on from it);
- **silent**: the run finished with finite weights but logged nothing about it;
- **bad**: a non-finite weight in the model or a checkpoint, or another exception (a raw traceback).

Prints a table and the cases that are not survived/stopped clearly; exits 1 if any is bad or silent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from textrl.checkpoint import CHECKPOINT_DIR, verify_checkpoint  # noqa: E402
from textrl.cli import resolve_train_config  # noqa: E402
from textrl.loop import loop  # noqa: E402
from textrl.train import make_run  # noqa: E402

TOY = ["--env", "textrl/TargetToken-v0", "--num-envs", "16", "--total-steps", "1024", "--seed", "1"]
CARTPOLE = ["--env", "CartPole-v1", "--num-envs", "8", "--num-steps", "32", "--total-steps", "1536", "--seed", "1"]
AT = 1  # the update (0-based) whose collection or optimisation gets the value
CLEAR = ("not finite", "non-finite", "nan", "inf", "learning rate")


class Once:
    """True during update ``AT`` only (``always``: from update ``AT`` on)."""

    def __init__(self, always: bool = False):
        self.update, self.always = -1, always

    @property
    def on(self) -> bool:
        return self.update == AT or (self.always and self.update >= AT)


def _count_collects(run, when: Once) -> None:
    real = run.collect

    def collect():
        when.update += 1
        return real()
    run.collect = collect


def _poison(t: torch.Tensor, value: float, row: int | None = 0) -> torch.Tensor:
    t = t.clone()
    if row is None:
        t.fill_(value)
    else:
        t[row] = value
    return t


# --- injections: each installs itself on a built run -------------------------------------------------------

def scorer_value(value: float, always: bool = False) -> Callable:
    def install(run, when: Once) -> None:
        base = run.envs.unwrapped
        real = base.scorer

        def scorer(prompts, completions, **kw):
            scores = torch.as_tensor(real(prompts, completions, **kw), dtype=torch.float32)
            return _poison(scores, value) if when.on else scores
        base.scorer = scorer
    return install


def rollout_reward(value: float) -> Callable:
    def install(run, when: Once) -> None:
        real = run.update

        def update(batch, progress_remaining):
            if when.on:
                (batch.rewards if hasattr(batch, "rewards") else batch["rewards"])[0, -1] = value
            return real(batch, progress_remaining)
        run.update = update
    return install


def forward_output(module_of: Callable, value: float, grad: bool = False) -> Callable:
    """``value`` in row 0 of a module's output, in rollouts (no grad) or in the update's forwards (grad)."""
    def install(run, when: Once) -> None:
        def hook(_module, _inputs, out):
            if not when.on or torch.is_grad_enabled() != grad:
                return out
            if hasattr(out, "logits"):
                out.logits = _poison(out.logits, value)
                return out
            return _poison(out, value)
        module_of(run).register_forward_hook(hook)
    return install


def gradient(value: float) -> Callable:
    def install(run, when: Once) -> None:
        param = run.learner.params[0]
        param.register_hook(lambda g: _poison(g, value, row=None) if when.on else g)
    return install


def learning_rate(lr: float) -> Callable:
    def install(run, when: Once) -> None:
        # the learner sets the scheduled lr at each update's start: set it before each step of the poisoned ones
        real_opt = run.learner.optimizer.step

        def step(*a, **kw):
            if when.on:
                for group in run.learner.optimizer.param_groups:
                    group["lr"] = lr
            return real_opt(*a, **kw)
        run.learner.optimizer.step = step
    return install


def damaged_model(value: float) -> Callable:
    """Flags of a toy run whose policy is loaded from a saved model with one ``value`` weight."""
    def flags(folder: Path) -> list[str]:
        from textrl.envs.toy import char_tokenizer, tiny_gpt2

        tok = char_tokenizer()
        model = tiny_gpt2(len(tok))
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = value
        model.save_pretrained(folder / "model")
        tok.save_pretrained(folder / "model")
        return [*TOY, "--model", str(folder / "model")]
    return flags


def nothing(run, when: Once) -> None:
    """(the case's value is in its flags)"""


def classic_env(what: str, value: float) -> Callable:
    def install(run, when: Once) -> None:
        envs = run.collector.envs
        real = envs.step

        def step(actions):
            obs, reward, term, trunc, info = real(actions)
            if when.on and not step.done:
                step.done = True
                if what == "reward":  # every sub-env (a sub-env starting an episode has no action at this step)
                    reward = reward.copy()
                    reward[:] = value
                else:
                    obs = obs.copy()
                    obs[:, 0] = value
            return obs, reward, term, trunc, info
        step.done = False
        envs.step = step
    return install


CASES: dict[str, tuple[list[str] | Callable, Callable, bool]] = {  # name: (flags, injection, always)
    "ppo: scorer NaN at one row": (TOY, scorer_value(float("nan")), False),
    "ppo: scorer +inf at one row": (TOY, scorer_value(float("inf")), False),
    "ppo: reward NaN at one token": (TOY, rollout_reward(float("nan")), False),
    "ppo: reward -inf at one token": (TOY, rollout_reward(float("-inf")), False),
    "ppo: policy logits NaN at one row (rollout)": (TOY, forward_output(lambda r: r.policy.lm, float("nan")), False),
    "ppo: policy logits NaN at one row (update)": (TOY, forward_output(lambda r: r.policy.lm, float("nan"), True),
                                                   False),
    "ppo: value head NaN at one row (rollout)": (TOY, forward_output(lambda r: r.policy.value_head, float("nan")),
                                                 False),
    "ppo: reference logits NaN at one row": (TOY, forward_output(lambda r: r.reference, float("nan")), False),
    "ppo: gradient NaN": (TOY, gradient(float("nan")), False),
    "ppo: gradient +inf": (TOY, gradient(float("inf")), False),
    "ppo: learning rate 1e39 for one update": (TOY, learning_rate(1e39), False),
    "ppo: learning rate 1e39 from then on": (TOY, learning_rate(1e39), True),
    "ppo: a NaN weight in the model file": (damaged_model(float("nan")), nothing, False),
    "grpo: reward NaN at one token": ([*TOY, "--agent", "grpo"], rollout_reward(float("nan")), False),
    "grpo: gradient NaN": ([*TOY, "--agent", "grpo"], gradient(float("nan")), False),
    "grpo: learning rate 1e39 for one update": ([*TOY, "--agent", "grpo"], learning_rate(1e39), False),
    "cartpole: env reward NaN at one step (every sub-env)": (CARTPOLE, classic_env("reward", float("nan")), False),
    "cartpole: env observation NaN at one step (every sub-env)": (CARTPOLE, classic_env("obs", float("nan")), False),
    "cartpole: gradient NaN": (CARTPOLE, gradient(float("nan")), False),
    "cartpole: learning rate 1e39 from then on": (CARTPOLE, learning_rate(1e39), True),
}


def _finite_checkpoint(run_dir: Path) -> str | None:
    """What is wrong with the run's last checkpoint (None: it verifies and every tensor is finite)."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return "no checkpoint"
    problem = verify_checkpoint(folder)
    if problem:
        return problem
    weights = load_file(str(folder / "model.safetensors"))
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    return f"non-finite tensors {bad[:3]}" if bad else None


def _logged(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return any((m.get("train/nan_skipped") or 0) > 0 or (m.get("train/nan_undone") or 0) > 0
               or (m.get("train/rows_skipped") or 0) > 0 for m in lines)


def run_case(name: str, root: Path) -> tuple[str, str]:
    flags, inject, always = CASES[name]
    out = root / name.replace(" ", "_").replace(":", "").replace("/", "_")
    out.mkdir(parents=True)
    flags = flags(out) if callable(flags) else flags
    cfg, _ = resolve_train_config([*flags, "--checkpoint-every", "1", "--output-dir", str(out / "run")])
    error: BaseException | None = None
    run = None
    try:
        run = make_run(cfg, quiet=True)
        when = Once(always)
        _count_collects(run, when)
        inject(run, when)
        loop(run)
    except (ValueError, FloatingPointError, RuntimeError, TypeError, IndexError) as err:
        error = err
    params_ok = run is None or all(torch.isfinite(p).all() for p in run.learner.params)
    ckpt = _finite_checkpoint(out / "run")
    if run is None and ckpt == "no checkpoint":
        ckpt = None  # refused before the run was built: there was nothing to lose
    if ckpt or not params_ok:
        return "bad", ckpt or "non-finite weights in the model after the run"
    if error is None:
        return ("survived", "logged") if _logged(out / "run") else ("silent", "finished, nothing logged")
    text = f"{type(error).__name__}: {error}"
    clear = isinstance(error, (ValueError, FloatingPointError)) and any(w in str(error).lower() for w in CLEAR)
    return ("stopped clearly" if clear else "bad"), text.splitlines()[0][:160]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    args = parser.parse_args(argv)
    names = [n for n in CASES if not args.only or any(o in n for o in args.only)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            outcome, detail = run_case(name, Path(tmp))
            rows.append((name, outcome, detail))
            print(f"{outcome:16s} {name}: {detail}", flush=True)
    counts = {k: sum(r[1] == k for r in rows) for k in ("survived", "stopped clearly", "silent", "bad")}
    print("\n| injections | survived | stopped clearly | silent | bad |\n|---|---|---|---|---|")
    print(f"| {len(rows)} | {counts['survived']} | {counts['stopped clearly']} | {counts['silent']} | {counts['bad']} |")
    return 1 if counts["silent"] or counts["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
