"""textrl PPO vs TRL's PPOTrainer (trl==1.12.0, trl.experimental.ppo), identical settings, each side in its
own subprocess so that peak memory is its own.

    python benchmarks/ppo_vs_trl.py [--sizes 2l 6l smollm2 random:PATH] [--updates 10] [--device cpu|cuda]
                                    [--batch 16] [--response 32]

Settings (the issue's): a GPT-2 built locally (2 layers n_embd 128, or 6 layers n_embd 384) as policy, a
reward model of the same architecture (GPT2ForSequenceClassification, 1 label, its own random weights),
a frozen reference copy, batch 16, 32-token responses, 4 PPO epochs, 1 minibatch, 10 updates, fp32 on
the CPU; and SmolLM2-135M-Instruct with LoRA r16 on q/k/v/o (reward and TRL's value model: its trunk
with a scalar head). Both sides use the SmolLM2 tokenizer (49 152 tokens) and the same prompts. TRL needs a separate
value model (same architecture); textrl uses a value head on the policy trunk — that is part of what is
compared. Reports seconds per update (median after the first) and peak RSS, and the ratios.

Options:
    --device cpu|cuda   where both sides run (default cpu). On cuda textrl's policy, reference, reward model
                        and env buffers live on the GPU and TRL's trainer (accelerate) puts its models there;
                        the clock is read after torch.cuda.synchronize(), and the memory column is the peak
                        GPU memory PyTorch allocated (torch.cuda.max_memory_allocated, MB) instead of peak RSS.
                        fp32 on both sides (TRL's PPOConfig is given bf16=False).
    --batch N           prompts (episodes) per update (default 16).
    --response N        tokens generated per response (default 32).
    --sizes ... random:PATH
                        PATH is a folder with a Hugging Face config.json and tokenizer files but no weights
                        (e.g. SmolLM2-135M-Instruct's config.json, tokenizer.json, tokenizer_config.json,
                        generation_config.json, chat_template.jinja): the policy is
                        AutoModelForCausalLM.from_config with seeded random weights (seed 0), the reward model
                        (seed 1) and TRL's value model (seed 2) AutoModelForSequenceClassification.from_config
                        with 1 label, identical on both sides; LoRA r16 on q/k/v/o (a Llama-style config) as
                        for smollm2, reference = adapters off; the tokenizer is PATH's (PAD <|endoftext|>,
                        distinct from EOS). For machines without the SmolLM2 weights.

On one GPU, e.g.:

    python benchmarks/ppo_vs_trl.py --device cuda --sizes 6l random:/tmp/smollm2-shape --batch 64 --response 64
"""

from __future__ import annotations

import argparse
import json
import os
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


def is_lora(size: str) -> bool:
    return size == "smollm2" or size.startswith("random:")


def random_models(size: str, num_value_models: int):
    """``random:PATH``: PATH's config (no weights needed) with seeded random fp32 weights, the same on both
    sides: the causal LM policy (seed 0), the reward model (seed 1) and value models (seeds 2, ...), each an
    AutoModelForSequenceClassification with 1 label."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from textrl.lm.models import disable_dropout

    path = size.removeprefix("random:")
    pad_id = tokenizer(size).pad_token_id
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    lm = disable_dropout(lm)
    heads = []
    for i in range(1 + num_value_models):
        torch.manual_seed(1 + i)
        m = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, num_labels=1),
                                                           dtype=torch.float32)
        m.config.pad_token_id = pad_id
        heads.append(m)
    return lm, heads


def lora_models(size: str, num_value_models: int):
    if size == "smollm2":
        return smollm2_models(num_value_models)
    return random_models(size, num_value_models)


def gpt2_configs(size: str, vocab: int, pad_id: int):
    from transformers import GPT2Config

    layers, width = {"2l": (2, 128), "6l": (6, 384)}[size]
    kw = dict(vocab_size=vocab, n_layer=layers, n_embd=width, n_head=max(2, width // 64), n_positions=256,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=pad_id, num_labels=1)
    return GPT2Config(**kw)


def tokenizer(size: str = "smollm2"):
    """The SmolLM2 tokenizer, or for ``random:PATH`` PATH's own; PAD <|endoftext|>."""
    if size.startswith("random:"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(size.removeprefix("random:"))
    else:
        from textrl.lm.models import load_tokenizer

        tok = load_tokenizer("smollm2-135m-instruct")
    tok.pad_token = "<|endoftext|>"  # PAD must differ from EOS
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        sys.exit(f"{size}: the tokenizer has no <|endoftext|> distinct from EOS to pad with")
    return tok


def clock(device: str) -> float:
    """perf_counter, after the GPU's queued work is done on cuda."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def run_textrl(size: str, updates: int, device: str = "cpu", batch: int = BATCH,
               response: int = RESPONSE) -> list[float]:
    import torch
    from textrl.agents.ppo import PPO, PPOConfig
    from textrl.envs import KLPenalty, TextGenVectorEnv
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    from textrl.lm.policy import LMActorCritic

    tok = tokenizer(size)
    torch.manual_seed(0)
    if is_lora(size):  # LoRA: the reference is the policy with adapters off, no copy
        from textrl.lm.policy import add_lora

        lm, (rm,) = lora_models(size, num_value_models=0)
        for p in lm.parameters():
            p.requires_grad_(False)
        if size != "smollm2":
            torch.manual_seed(3)  # the LoRA A matrices: as TRL's side draws them
        policy = LMActorCritic(add_lora(lm, LORA["r"], LORA["lora_alpha"], LORA["target_modules"]))
        ref = policy.reference()
        rm.eval()
    else:
        cfg = gpt2_configs(size, len(tok), tok.pad_token_id)
        policy = LMActorCritic(GPT2LMHeadModel(cfg))
        ref = GPT2LMHeadModel(cfg)
        ref.load_state_dict(policy.lm.state_dict())
        rm = GPT2ForSequenceClassification(cfg).eval()
    policy.to(device)
    rm.to(device)
    if isinstance(ref, torch.nn.Module):  # LoRA's reference is a view of the policy
        ref.to(device)

    class RewardModel:  # token-level scorer: same tokenizer, no decode / re-encode
        token_level = True

        @torch.no_grad()
        def __call__(self, input_ids, attention_mask):
            return rm(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    env = KLPenalty(TextGenVectorEnv(batch, tok, PROMPTS, RewardModel(), max_new_tokens=response, device=device),
                    ref, kl_coef=0.05, reference_pass=REFERENCE_PASS)
    agent = PPO(PPOConfig(num_epochs=EPOCHS, num_minibatches=1, learning_rate=LR, anneal_lr=True), policy)
    return timed_updates(env, policy, agent, updates, device)


def timed_updates(env, policy, agent, updates: int, device: str = "cpu") -> list[float]:
    """textrl's side: rollout + update, ``updates`` times; the wall time of each (the public pieces of a run:
    a generator, ``collect_tokens``, the learner)."""
    import torch

    from textrl.lm.collect import collect_tokens
    from textrl.lm.generate import HFGenerator
    from textrl.parallel import Learner

    generator = HFGenerator(policy.lm, rng=torch.Generator(device=device).manual_seed(0))
    learner = Learner.for_agent(agent)
    stamps = [clock(device)]
    for u in range(updates):
        ro = collect_tokens(env, generator)
        learner.update(agent, ro, 1.0 - u / updates)
        stamps.append(clock(device))
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def run_trl(size: str, updates: int, device: str = "cpu", batch: int = BATCH,
            response: int = RESPONSE) -> list[float]:
    import os
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    os.environ.setdefault("WANDB_DISABLED", "true")
    tok = tokenizer(size)
    torch.manual_seed(0)
    peft_config = None
    if is_lora(size):  # TRL with peft: ref_model=None (adapters off), a separate full value model
        from peft import LoraConfig

        policy, (rm, value) = lora_models(size, num_value_models=1)
        ref = None
        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    else:
        cfg = gpt2_configs(size, len(tok), tok.pad_token_id)
        policy = GPT2LMHeadModel(cfg)
        ref = GPT2LMHeadModel(cfg)
        ref.load_state_dict(policy.state_dict())
        rm = GPT2ForSequenceClassification(cfg)
        value = GPT2ForSequenceClassification(cfg)
    # at least one full batch (the dataloader drops the last, ragged one)
    repeats = max(20, -(-batch // len(PROMPTS)))
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in (PROMPTS * repeats)]})
    # cpu: use_cpu; cuda: accelerate puts the models on the GPU. fp32 either way (PPOConfig's bf16 defaults
    # to True; PPOTrainer's own Accelerator ignores it, False says so)
    where = dict(use_cpu=True) if device == "cpu" else dict(bf16=False)
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=1,
            num_ppo_epochs=EPOCHS, response_length=response, total_episodes=batch * updates, learning_rate=LR,
            kl_coef=0.05, num_sample_generations=0, report_to="none", save_strategy="no", **where,
            local_rollout_forward_batch_size=batch, temperature=1.0, stop_token="eos", logging_steps=1000,
        )
        if is_lora(size) and size != "smollm2":
            torch.manual_seed(3)  # the LoRA A matrices (get_peft_model in the trainer), as textrl's side
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                             train_dataset=ds, value_model=value, peft_config=peft_config)
        return timed_train(trainer, device)


def timed_train(trainer, device: str = "cpu") -> list[float]:
    """Run a transformers Trainer and return the wall time of each optimisation step (generation included)."""
    from transformers import TrainerCallback

    stamps = [clock(device)]

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(clock(device))

    trainer.add_callback(Stamp())
    stamps[0] = clock(device)
    trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def child(side: str, size: str, updates: int, device: str = "cpu", batch: int = BATCH,
          response: int = RESPONSE) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--device cuda: no CUDA device (torch {torch.__version__})")
    times = (run_textrl if side == "textrl" else run_trl)(size, updates, device, batch, response)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(json.dumps({"times": times, "peak_mb": peak_mb}))


def model_name(size: str) -> str:
    names = {"2l": "GPT-2 2 layers, n_embd 128", "6l": "GPT-2 6 layers, n_embd 384",
             "smollm2": "SmolLM2-135M + LoRA r16"}
    if size in names:
        return names[size]
    path = size.removeprefix("random:")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return (f"random-init {cfg.get('model_type', '?')} {cfg.get('num_hidden_layers', '?')} layers, "
            f"hidden {cfg.get('hidden_size', '?')} ({path}) + LoRA r16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2l", "6l", "smollm2"])
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--response", type=int, default=RESPONSE)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.updates, args.device, args.batch, args.response)
        return
    for size in args.sizes:
        config = os.path.join(size.removeprefix("random:"), "config.json")
        if size not in ("2l", "6l", "smollm2") and not (size.startswith("random:") and os.path.isfile(config)):
            sys.exit(f"unknown size {size!r}: 2l, 6l, smollm2 or random:PATH (a folder with config.json)")
    mem = "peak GPU" if args.device == "cuda" else "peak RSS"
    rows = []
    for size in args.sizes:
        res = {}
        for side in ("trl", "textrl"):
            cmd = [sys.executable, __file__, "--child", side, size, "--updates", str(args.updates),
                   "--device", args.device, "--batch", str(args.batch), "--response", str(args.response)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{side} {size} failed:\n{proc.stderr[-3000:]}")
            res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        med = {s: statistics.median(res[s]["times"][1:]) for s in res}
        rows.append((size, med["trl"], med["textrl"], res["trl"]["peak_mb"], res["textrl"]["peak_mb"]))
        print(f"{size}: TRL {med['trl']:.3f} s/update, textrl {med['textrl']:.3f} s/update "
              f"(speed-up {med['trl'] / med['textrl']:.2f}x); {mem} TRL {res['trl']['peak_mb']:.0f} MB, "
              f"textrl {res['textrl']['peak_mb']:.0f} MB", flush=True)
    print(f"\ndevice {args.device}, batch {args.batch}, {args.response}-token responses, {EPOCHS} PPO epochs, "
          f"1 minibatch, {args.updates} updates, fp32; s/update: the median after the first update"
          + ("; peak GPU: torch.cuda.max_memory_allocated" if args.device == "cuda" else ""))
    print(f"\n| model | TRL s/update | textrl s/update | speed-up (TRL/textrl) | TRL {mem} (MB) | "
          f"textrl {mem} (MB) | memory ratio (textrl/TRL) |")
    print("|---|---|---|---|---|---|---|")
    for size, t_trl, t_ours, m_trl, m_ours in rows:
        print(f"| {model_name(size)} | {t_trl:.3f} | {t_ours:.3f} | {t_trl / t_ours:.2f}x | {m_trl:.0f} | {m_ours:.0f} | "
              f"{m_ours / m_trl:.2f} |")


if __name__ == "__main__":
    main()
