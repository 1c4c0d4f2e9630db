"""textrl PPO vs TRL's PPOTrainer (trl==1.12.0, trl.experimental.ppo), identical settings, each side in its
own subprocess so that peak memory is its own.

    python benchmarks/ppo_vs_trl.py [--sizes 2l 6l] [--updates 10]

Settings (the issue's): a GPT-2 built locally (2 layers n_embd 128, or 6 layers n_embd 384) as policy, a
reward model of the same architecture (GPT2ForSequenceClassification, 1 label, its own random weights),
a frozen reference copy, batch 16, 32-token responses, 4 PPO epochs, 1 minibatch, 10 updates, fp32 on
the CPU; and SmolLM2-135M-Instruct with LoRA r16 on q/k/v/o (reward and TRL's value model: its trunk
with a scalar head). Both sides use the SmolLM2 tokenizer (49 152 tokens) and the same prompts. TRL needs a separate
value model (same architecture); textrl uses a value head on the policy trunk — that is part of what is
compared. Reports seconds per update (median after the first) and peak RSS, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PROMPTS = [
    "The weather today is", "Once upon a time, a small robot", "The best way to learn a language is",
    "In the morning I like to", "Here is a short poem about rivers:", "My favourite book is",
    "Scientists recently discovered that", "The recipe starts with", "A good friend is someone who",
    "The city at night looks", "To fix a flat tyre, first", "The history of tea begins",
    "Our garden in spring", "The train left the station", "A letter arrived from", "The old lighthouse",
]
BATCH, RESPONSE, EPOCHS, LR = 16, 32, 4, 3e-6
REFERENCE_PASS = "sequence"  # textrl train's default: one parallel reference forward after each rollout


LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)


def smollm2_models(num_value_models: int):
    """SmolLM2-135M-Instruct (offline) policy, and its trunk with a scalar head for reward (and value) models."""
    from transformers import AutoModelForSequenceClassification

    from textrl.lm.models import load_causal_lm, resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    heads = []
    for _ in range(1 + num_value_models):
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        m.config.pad_token_id = tokenizer().pad_token_id
        heads.append(m)
    return load_causal_lm("smollm2-135m-instruct"), heads


def gpt2_configs(size: str, vocab: int, pad_id: int):
    from transformers import GPT2Config

    layers, width = {"2l": (2, 128), "6l": (6, 384)}[size]
    kw = dict(vocab_size=vocab, n_layer=layers, n_embd=width, n_head=max(2, width // 64), n_positions=256,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=pad_id, num_labels=1)
    return GPT2Config(**kw)


def tokenizer():
    from textrl.lm.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    tok.pad_token = "<|endoftext|>"  # PAD must differ from EOS
    return tok


def run_textrl(size: str, updates: int) -> list[float]:
    import torch
    from textrl.agents.ppo import PPO, PPOConfig
    from textrl.envs import KLPenalty, TextGenVectorEnv
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    from textrl.lm.policy import LMActorCritic

    tok = tokenizer()
    torch.manual_seed(0)
    if size == "smollm2":  # LoRA: the reference is the policy with adapters off, no copy
        from textrl.lm.policy import add_lora

        lm, (rm,) = smollm2_models(num_value_models=0)
        for p in lm.parameters():
            p.requires_grad_(False)
        policy = LMActorCritic(add_lora(lm, LORA["r"], LORA["lora_alpha"], LORA["target_modules"]))
        ref = policy.reference()
        rm.eval()
    else:
        cfg = gpt2_configs(size, len(tok), tok.pad_token_id)
        policy = LMActorCritic(GPT2LMHeadModel(cfg))
        ref = GPT2LMHeadModel(cfg)
        ref.load_state_dict(policy.lm.state_dict())
        rm = GPT2ForSequenceClassification(cfg).eval()

    class RewardModel:  # token-level scorer: same tokenizer, no decode / re-encode
        token_level = True

        @torch.no_grad()
        def __call__(self, input_ids, attention_mask):
            return rm(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    env = KLPenalty(TextGenVectorEnv(BATCH, tok, PROMPTS, RewardModel(), max_new_tokens=RESPONSE), ref, kl_coef=0.05,
                    reference_pass=REFERENCE_PASS)
    agent = PPO(PPOConfig(num_epochs=EPOCHS, num_minibatches=1, learning_rate=LR, anneal_lr=True), policy)
    return timed_updates(env, policy, agent, updates)


def timed_updates(env, policy, agent, updates: int) -> list[float]:
    """textrl's side: rollout + update, ``updates`` times; the wall time of each (the public pieces of a run:
    a generator, ``collect_tokens``, the learner)."""
    import torch

    from textrl.lm.collect import collect_tokens
    from textrl.lm.generate import HFGenerator
    from textrl.parallel import Learner

    generator = HFGenerator(policy.lm, rng=torch.Generator().manual_seed(0))
    learner = Learner.for_agent(agent)
    stamps = [time.perf_counter()]
    for u in range(updates):
        ro = collect_tokens(env, generator)
        learner.update(agent, ro, 1.0 - u / updates)
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def run_trl(size: str, updates: int) -> list[float]:
    import os
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    os.environ.setdefault("WANDB_DISABLED", "true")
    tok = tokenizer()
    torch.manual_seed(0)
    peft_config = None
    if size == "smollm2":  # TRL with peft: ref_model=None (adapters off), a separate full value model
        from peft import LoraConfig

        policy, (rm, value) = smollm2_models(num_value_models=1)
        ref = None
        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    else:
        cfg = gpt2_configs(size, len(tok), tok.pad_token_id)
        policy = GPT2LMHeadModel(cfg)
        ref = GPT2LMHeadModel(cfg)
        ref.load_state_dict(policy.state_dict())
        rm = GPT2ForSequenceClassification(cfg)
        value = GPT2ForSequenceClassification(cfg)
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in (PROMPTS * 20)]})
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_mini_batches=1,
            num_ppo_epochs=EPOCHS, response_length=RESPONSE, total_episodes=BATCH * updates, learning_rate=LR,
            kl_coef=0.05, num_sample_generations=0, report_to="none", save_strategy="no", use_cpu=True,
            local_rollout_forward_batch_size=BATCH, temperature=1.0, stop_token="eos", logging_steps=1000,
        )
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                             train_dataset=ds, value_model=value, peft_config=peft_config)
        return timed_train(trainer)


def timed_train(trainer) -> list[float]:
    """Run a transformers Trainer and return the wall time of each optimisation step (generation included)."""
    from transformers import TrainerCallback

    stamps = [time.perf_counter()]

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    trainer.add_callback(Stamp())
    stamps[0] = time.perf_counter()
    trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def child(side: str, size: str, updates: int) -> None:
    times = (run_textrl if side == "textrl" else run_trl)(size, updates)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(json.dumps({"times": times, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2l", "6l", "smollm2"])
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.updates)
        return
    rows = []
    for size in args.sizes:
        res = {}
        for side in ("trl", "textrl"):
            proc = subprocess.run([sys.executable, __file__, "--child", side, size, "--updates", str(args.updates)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{side} {size} failed:\n{proc.stderr[-3000:]}")
            res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        med = {s: statistics.median(res[s]["times"][1:]) for s in res}
        rows.append((size, med["trl"], med["textrl"], res["trl"]["peak_mb"], res["textrl"]["peak_mb"]))
        print(f"{size}: TRL {med['trl']:.3f} s/update, textrl {med['textrl']:.3f} s/update "
              f"(speed-up {med['trl'] / med['textrl']:.2f}x); peak RSS TRL {res['trl']['peak_mb']:.0f} MB, "
              f"textrl {res['textrl']['peak_mb']:.0f} MB", flush=True)
    print("\n| model | TRL s/update | textrl s/update | speed-up (TRL/textrl) | TRL peak RSS (MB) | textrl peak RSS (MB) | memory ratio (textrl/TRL) |")
    print("|---|---|---|---|---|---|---|")
    names = {"2l": "GPT-2 2 layers, n_embd 128", "6l": "GPT-2 6 layers, n_embd 384",
             "smollm2": "SmolLM2-135M + LoRA r16"}
    for size, t_trl, t_ours, m_trl, m_ours in rows:
        print(f"| {names[size]} | {t_trl:.3f} | {t_ours:.3f} | {t_trl / t_ours:.2f}x | {m_trl:.0f} | {m_ours:.0f} | "
              f"{m_ours / m_trl:.2f} |")


if __name__ == "__main__":
    main()
