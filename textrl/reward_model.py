"""Reward models trained in textrl from preference pairs (Bradley–Terry), then frozen and used as a scorer.

    textrl train-rm --data PREFS.jsonl [--model NAME_OR_PATH] [--output-dir DIR] [--<field> VALUE ...]

Rows are ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (optionally ``"margin"``). The model is a scalar
head on any Hugging Face encoder or decoder (``AutoModelForSequenceClassification`` with one label; the
offline all-MiniLM-L6-v2 by default), trained on

    L = −log σ(r(x, y_chosen) − r(x, y_rejected) − m)            (Bradley & Terry 1952; Ouyang et al. 2022)

After training, a gain g and bias b are fitted so that g·r + b has mean 0 and std 1 over a normalisation set
of responses (lm-human-preferences does this with reference-policy samples; by default the set is the
completions of the training data, which in RLHF are the reference policy's samples). The result is saved
in Hugging Face layout (safetensors + tokenizer + ``textrl_reward.json`` holding g and b) and plugs into a
text env as its scorer: ``reward_model: DIR`` in a config, or :class:`TrainedRewardScorer` in code.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from textrl.envs.scorers import prompt_as_text
from textrl.parallel.distributed import (
    all_sum,
    barrier,
    broadcast_object,
    is_main,
    make_accelerator,
    rank,
    world_size,
)
from textrl.parallel.learner import Learner
from textrl.validate import finite_number, non_negative_int

__all__ = ["RewardModelConfig", "PreferenceRow", "load_preferences", "train_reward_model", "TrainedRewardScorer",
           "bradley_terry_loss", "NORMALISATION_FILE"]

NORMALISATION_FILE = "textrl_reward.json"
_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class RewardModelConfig:
    """``textrl train-rm`` settings; every field is a --flag."""

    data: str = ""
    """JSONL file of preference rows {"prompt", "chosen", "rejected"[, "margin"]} (required)."""
    model: str = "minilm"
    """Backbone: a Hugging Face name or local path, or "minilm" (all-MiniLM-L6-v2, shipped offline)."""
    output_dir: str | None = None
    """Where the trained model, metrics.jsonl and TensorBoard events go; default runs/reward_model__<time>."""
    eval_data: str | None = None
    """A separate held-out JSONL file; default: hold out eval_fraction of data (seeded split)."""
    eval_fraction: float = 0.1
    """Share of rows held out for pairwise accuracy when eval_data is not given."""
    num_epochs: int = 2
    """Passes over the training pairs."""
    batch_size: int = 16
    """Pairs per optimisation step."""
    learning_rate: float = 5e-5
    """AdamW learning rate (linear decay to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    margin: float = 0.0
    """Default margin m in −log σ(r_c − r_r − m); a row's own "margin" key overrides it."""
    max_length: int = 128
    """Token budget of prompt + completion (the longer one is truncated first)."""
    lora_r: int = 0
    """LoRA rank on the backbone (0 = full fine-tuning); the scalar head is always trained."""
    lora_alpha: float = 16.0
    """LoRA alpha."""
    lora_targets: tuple[str, ...] = ()
    """Modules to adapt; empty = peft's default for the architecture."""
    normalise: bool = True
    """Fit gain and bias so that normalisation-set responses score mean 0, std 1."""
    normalise_data: str | None = None
    """Prompts + responses to normalise on (JSONL rows with "prompt" and "response"); default: the training
    data's completions (chosen and rejected)."""
    skip_bad_rows: bool = False
    """Skip malformed rows (reported with their line numbers and the count) instead of stopping at them."""
    seed: int = 1
    """Seed of the split, the shuffling and the head's initialisation."""
    torch_threads: int = 0
    """torch.set_num_threads (0 = torch's default)."""
    trust_remote_code: bool = False
    """Allow the backbone's own code from the hub (only when you ask)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction!r}")
        for name in ("num_epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r!r}")
        for name in ("margin", "weight_decay", "lora_alpha"):
            finite_number(name, getattr(self, name), minimum=0, strict=False)
        non_negative_int("torch_threads", self.torch_threads)  # (0: torch's default)


@dataclass
class PreferenceRow:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    line: int = 0


def load_preferences(path: str | Path, skip_bad_rows: bool = False) -> tuple[list[PreferenceRow], list[str]]:
    """Read preference rows. Every problem names its line: non-UTF-8 bytes, invalid JSON, a missing or
    non-string key, an empty string, chosen == rejected, a non-numeric margin. Without ``skip_bad_rows`` the
    first problems raise a ValueError; with it the rows are skipped and the problems returned (never silently)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: no such file {str(path)!r}")
    rows: list[PreferenceRow] = []
    problems: list[str] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        problem, row = _parse_row(raw, number)
        if problem:
            problems.append(f"line {number}: {problem}")
        else:
            rows.append(row)
    if problems and not skip_bad_rows:
        shown = "; ".join(problems[:5]) + (f"; … ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(f"data: {path}: {len(problems)} bad row(s): {shown}. Fix them, or pass "
                         "--skip-bad-rows true to skip them (they are counted and listed)")
    if not rows:
        raise ValueError(f"data: {path} holds no usable preference rows ({len(problems)} bad)")
    return rows, problems


def _parse_row(raw: bytes, number: int) -> tuple[str | None, PreferenceRow | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 ({err.reason} at byte {err.start})", None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return f"invalid JSON ({err.msg})", None
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}", None
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        return f"missing key(s) {missing}; expected {list(_KEYS)}", None
    for key in _KEYS:
        if not isinstance(obj[key], str):
            return f"{key!r} must be a string, got {type(obj[key]).__name__}", None
    for key in ("chosen", "rejected"):
        if not obj[key].strip():
            return f"{key!r} is empty", None
    if obj["chosen"] == obj["rejected"]:
        return "chosen == rejected (the pair carries no preference)", None
    margin = obj.get("margin")
    if margin is not None and not (isinstance(margin, (int, float)) and math.isfinite(margin)):
        return f"'margin' must be a finite number, got {margin!r}", None
    return None, PreferenceRow(obj["prompt"], obj["chosen"], obj["rejected"], margin, number)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> torch.Tensor:
    """Mean of −log σ(r_c − r_r − m) (softplus form: stable for large differences)."""
    return torch.nn.functional.softplus(-(chosen - rejected - margin)).mean()


def _resolve_backbone(name: str) -> str:
    if name == "minilm":
        from textrl.lm.models import minilm_path

        return str(minilm_path())
    from textrl.lm.models import resolve_model_path

    return str(resolve_model_path(name))


def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int, device) -> dict:
    """Prompt and response as a text pair (encoders get [SEP]/segment ids; decoders a concatenation),
    truncating the longer of the two first. Training and scoring use this one function."""
    return tokenizer(list(prompts), list(responses), padding=True, truncation=True,
                     max_length=max_length, return_tensors="pt").to(device)


def _load_model(path: str, cfg: RewardModelConfig):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from textrl.lm.models import disable_dropout

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(cfg.seed)  # the scalar head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                               trust_remote_code=cfg.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = disable_dropout(model)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="SEQ_CLS",
                          target_modules=list(cfg.lora_targets) or None)
        model = get_peft_model(model, lcfg)
    return tokenizer, model


def _scores(model, tokenizer, prompts, responses, max_length, batch_size=64) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = encode(tokenizer, prompts[i:i + batch_size], responses[i:i + batch_size], max_length, device)
            out.append(model(**enc).logits[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_accuracy(model, tokenizer, rows: list[PreferenceRow], max_length: int) -> float:
    """Share of pairs with r(chosen) > r(rejected). In a data-parallel run each process scores every
    W-th pair and the counts are summed: the result is the accuracy over all ``rows``."""
    mine = rows[rank()::world_size()]
    prompts = [r.prompt for r in mine]
    rc = _scores(model, tokenizer, prompts, [r.chosen for r in mine], max_length)
    rr = _scores(model, tokenizer, prompts, [r.rejected for r in mine], max_length)
    correct = all_sum(torch.tensor(float((rc > rr).sum()), dtype=torch.float64, device=_model_device(model)))
    return float(correct) / max(len(rows), 1)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _split(cfg: RewardModelConfig, rng: random.Random) -> tuple[list[PreferenceRow], list[PreferenceRow], list[str]]:
    """(training rows, held-out rows, problems): ``eval_data``, or a seeded ``eval_fraction`` of ``data``."""
    rows, problems = load_preferences(cfg.data, cfg.skip_bad_rows)
    if cfg.eval_data:
        eval_rows, eval_problems = load_preferences(cfg.eval_data, cfg.skip_bad_rows)
        return rows, eval_rows, problems + [f"eval_data {p}" for p in eval_problems]
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_eval = max(1, round(cfg.eval_fraction * len(rows)))
    if len(rows) - n_eval < 1:
        raise ValueError(f"data: {len(rows)} usable row(s) leave nothing to train on after holding out "
                         f"eval_fraction={cfg.eval_fraction}")
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]], problems


def train_reward_model(cfg: RewardModelConfig, quiet: bool = False) -> dict[str, Any]:
    """Train, evaluate, normalise and save; returns the summary (also written to ``summary.json``)."""
    from dataclasses import asdict

    from textrl.tracking import Tracker

    if not cfg.data:
        raise ValueError("data: a preference JSONL file is required (--data PREFS.jsonl)")
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    rng = random.Random(cfg.seed)
    train_rows, eval_rows, problems = _split(cfg, rng)
    # Under `accelerate launch` / `torchrun` this joins the process group: each batch is split among the
    # processes, DDP averages the gradients, the main process writes the files.
    accelerator = make_accelerator("cuda" if torch.cuda.is_available() else "cpu", mixed_precision=None)
    world, main = world_size(), is_main()  # from the process group (accelerate on CPU + DeepSpeed reports 1)
    out = Path(cfg.output_dir or broadcast_object(f"runs/reward_model__{time.strftime('%Y-%m-%d_%H-%M-%S')}"))
    path = _resolve_backbone(cfg.model)
    tokenizer, model = _load_model(path, cfg)
    model = model.to(accelerator.device)
    total = math.ceil(len(train_rows) / cfg.batch_size) * cfg.num_epochs
    tracker = Tracker(out, {**asdict(cfg), "backbone_path": path, "train_pairs": len(train_rows),
                            "eval_pairs": len(eval_rows)}, total=total * cfg.batch_size, enabled=main,
                      postfix_keys={"train/loss": "loss", "eval/pairwise_accuracy": "acc"})
    if problems:
        tracker.message(f"skipped {len(problems)} bad row(s): " + "; ".join(problems[:10])
                        + (" …" if len(problems) > 10 else ""))
    tracker.message(f"train-rm: {len(train_rows)} train pairs, {len(eval_rows)} held-out pairs, backbone {path}"
                    + (f"; {world} processes share each batch" if world > 1 else ""))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(total, 1)))
    # DDP (or a DeepSpeed engine: one backward per batch, this process's share of it) around the model
    learner = Learner(model, opt, max_grad_norm=1.0, accelerator=accelerator, micro_batch=max(cfg.batch_size // world, 1))
    with learner.full_weights():
        acc0 = pairwise_accuracy(model.eval(), tokenizer, eval_rows, cfg.max_length)
    start = time.perf_counter()
    try:
        acc = _train_epochs(cfg, learner, sched, tokenizer, train_rows, eval_rows, rng, tracker, acc0)
    finally:
        tracker.close()
    model.eval()
    with learner.full_weights():  # the main process fits the normalisation and saves; the others wait
        summary = _finish(cfg, model, tokenizer, out, train_rows, eval_rows, problems, acc0, acc, start, quiet) \
            if main else {"output_dir": str(out), "eval_accuracy_before": acc0, "eval_accuracy": acc}
        barrier()
    return summary


def _train_epochs(cfg: RewardModelConfig, learner: Learner, sched, tokenizer, train_rows: list[PreferenceRow],
                  eval_rows: list[PreferenceRow], rng: random.Random, tracker, acc: float) -> float:
    """The epochs of Bradley–Terry steps; returns the last held-out pairwise accuracy."""
    model, world, step, nan_skipped = learner.policy, world_size(), 0, 0
    for epoch in range(cfg.num_epochs):
        model.train()  # dropout is 0 everywhere; train mode only for layers that care (none here)
        learner.remember()  # a step that makes a weight non-finite goes back to the epoch's start
        order = list(range(len(train_rows)))
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            batch = [train_rows[j] for j in order[i:i + cfg.batch_size]]
            if len(batch) < world:  # a tail too short to give every process a pair: dropped by all
                continue
            n_all = len(batch)
            batch = batch[rank() * n_all // world:(rank() + 1) * n_all // world]  # this process's share
            loss, part = _batch_loss(cfg, learner.model, tokenizer, batch)
            learner.optimizer.zero_grad(set_to_none=True)
            part = all_sum(part)  # sums over the whole batch (all processes): loss, correct, margin, non-finite
            if part[3] > 0:  # every process skips together
                nan_skipped += 1
                continue
            # each process's mean loss weighs by its share of the batch; DDP's average divides by world
            learner.backward(loss * (len(batch) * world / n_all))
            grad = learner.clip_grad_norm()
            if not learner.apply(grad):
                nan_skipped += 1
                continue
            sched.step()
            step += 1
            stats = {"train/loss": float(part[0]) / n_all, "train/accuracy": float(part[1]) / n_all,
                     "train/margin": float(part[2]) / n_all, "train/grad_norm": float(grad),
                     "charts/learning_rate": sched.get_last_lr()[0], "train/nan_skipped": float(nan_skipped)}
            if i + cfg.batch_size >= len(order):  # end of epoch: held-out pairwise accuracy
                with learner.full_weights():
                    acc = pairwise_accuracy(model.eval(), tokenizer, eval_rows, cfg.max_length)
                model.train()
                stats.update({"eval/pairwise_accuracy": acc, "train/epoch": float(epoch + 1)})
            tracker.log(stats, step * cfg.batch_size)
    return acc


def _batch_loss(cfg: RewardModelConfig, model, tokenizer, batch: list[PreferenceRow]):
    """The Bradley–Terry loss of this process's pairs and the sums to agree on: loss·n, correct pairs, margin,
    a non-finite flag."""
    prompts = [r.prompt for r in batch] * 2
    responses = [r.chosen for r in batch] + [r.rejected for r in batch]
    enc = encode(tokenizer, prompts, responses, cfg.max_length, _model_device(model))
    r = model(**enc).logits[:, 0].float()
    rc, rr = r[:len(batch)], r[len(batch):]
    margin = torch.tensor([cfg.margin if b.margin is None else b.margin for b in batch], device=r.device)
    loss = bradley_terry_loss(rc, rr, margin)
    part = torch.stack([loss.detach().double() * len(batch), (rc > rr).sum().double(),
                        (rc - rr).detach().sum().double(), (~torch.isfinite(loss)).double()])
    return loss, part


def _finish(cfg: RewardModelConfig, model, tokenizer, out: Path, train_rows, eval_rows, problems, acc0: float,
            acc: float, start: float, quiet: bool) -> dict[str, Any]:
    """Normalise, save (safetensors + tokenizer + textrl_reward.json + summary.json), report."""
    if cfg.lora_r > 0:
        model = model.merge_and_unload()  # a plain transformers model on disk
    gain, bias = 1.0, 0.0
    if cfg.normalise:
        gain, bias = fit_normalisation(model, tokenizer, cfg, train_rows)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / NORMALISATION_FILE).write_text(json.dumps({"gain": gain, "bias": bias, "max_length": cfg.max_length,
                                                      "normalised_on": cfg.normalise_data or "training completions"}))
    summary = {"output_dir": str(out), "train_pairs": len(train_rows), "eval_pairs": len(eval_rows),
               "skipped_rows": len(problems), "eval_accuracy_before": acc0, "eval_accuracy": acc,
               "gain": gain, "bias": bias, "seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if not quiet:
        print(f"reward model: held-out pairwise accuracy {acc0:.3f} -> {acc:.3f} on {len(eval_rows)} pairs; "
              f"normalisation gain {gain:.4g} bias {bias:.4g}; saved to {out}", file=sys.stderr)
    return summary


def fit_normalisation(model, tokenizer, cfg: RewardModelConfig, rows: list[PreferenceRow]) -> tuple[float, float]:
    """g, b with mean(g·r + b) = 0 and std(g·r + b) = 1 over the normalisation responses."""
    if cfg.normalise_data:
        pairs = [json.loads(x) for x in Path(cfg.normalise_data).read_text(encoding="utf-8").splitlines() if x.strip()]
        prompts, responses = [p["prompt"] for p in pairs], [p["response"] for p in pairs]
    else:
        prompts = [r.prompt for r in rows] * 2
        responses = [r.chosen for r in rows] + [r.rejected for r in rows]
    scores = _scores(model, tokenizer, prompts, responses, cfg.max_length).tolist()
    if len(scores) < 2:
        raise ValueError("normalisation needs at least 2 responses")
    mean, std = statistics.fmean(scores), statistics.pstdev(scores)
    if std == 0:
        raise ValueError("normalisation: every response scores the same; the reward model did not learn anything")
    return 1.0 / std, -mean / std


class TrainedRewardScorer:
    """A reward model saved by ``textrl train-rm`` as a text env scorer: its own tokenizer, eval mode, no
    gradients, the stored gain and bias applied (scores of reference responses: mean 0, std 1)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        meta_file = path / NORMALISATION_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"reward_model: {str(path)!r} has no {NORMALISATION_FILE}; "
                                    "expected a directory written by `textrl train-rm`")
        meta = json.loads(meta_file.read_text())
        self.gain, self.bias, self.max_length = float(meta["gain"]), float(meta["bias"]), int(meta["max_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size

    def raw(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        texts = [prompt_as_text(p, self.tokenizer) for p in prompts]  # (chat conversations as text)
        return _scores(self.model, self.tokenizer, texts, list(completions), self.max_length, self.batch_size)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return self.raw(prompts, [c if c.strip() else "." for c in completions]) * self.gain + self.bias
