"""textrl RLOO / GRPO vs TRL's RLOOTrainer / GRPOTrainer (trl==1.12.0), identical settings, each side in its own
subprocess so that peak memory is its own.

    python benchmarks/group_vs_trl.py [--sizes 2l 6l] [--agents rloo grpo] [--updates 10]

Settings: the GPT-2s of ppo_vs_trl.py (2 layers n_embd 128; 6 layers n_embd 384), built once, saved to a
temporary directory and loaded from there by both sides (TRL builds its reference from the path); a reward
model of the same architecture (GPT2ForSequenceClassification, 1 label); the SmolLM2 tokenizer; 16
completions per update = 4 prompts × 4 generations, 32-token completions, one optimisation pass over the
batch in one minibatch (TRL's num_iterations=1), lr 3e-6, fp32 on the CPU. RLOO: β = 0.05, k1 KL in the reward,
sequence-level ratio (both). GRPO: β = 0.04, k3 KL in the loss, per-sequence loss averaging (TRL
loss_type="grpo"), group std scaling. Reports seconds per update (median after the first), peak RSS and ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import PROMPTS, gpt2_configs, timed_train, timed_updates, tokenizer  # noqa: E402

K, BATCH, RESPONSE, LR = 4, 16, 32, 3e-6
BETA = {"rloo": 0.05, "grpo": 0.04}


def build_models(size: str, root: Path) -> None:
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    tok = tokenizer()
    cfg = gpt2_configs(size, len(tok), tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(root / "policy")
    GPT2ForSequenceClassification(cfg).save_pretrained(root / "reward")
    for sub in ("policy", "reward"):
        tok.save_pretrained(root / sub)


def run_textrl(agent_name: str, root: Path, updates: int) -> list[float]:
    import torch
    from textrl.agents.grpo import GRPO, GRPOConfig
    from textrl.agents.rloo import RLOO, RLOOConfig
    from textrl.envs import KLPenalty, TextGenVectorEnv
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    from textrl.lm.policy import LMActorCritic

    tok = tokenizer()
    policy = LMActorCritic(GPT2LMHeadModel.from_pretrained(root / "policy"), value_head=False)
    ref = GPT2LMHeadModel.from_pretrained(root / "policy")
    rm = GPT2ForSequenceClassification.from_pretrained(root / "reward").eval()

    class RewardModel:  # token-level scorer: same tokenizer, no decode / re-encode
        token_level = True

        @torch.no_grad()
        def __call__(self, input_ids, attention_mask):
            return rm(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    base = TextGenVectorEnv(BATCH, tok, PROMPTS, RewardModel(), max_new_tokens=RESPONSE, num_generations=K)
    common = dict(num_generations=K, num_epochs=1, num_minibatches=1, learning_rate=LR)
    if agent_name == "rloo":
        env = KLPenalty(base, ref, kl_coef=BETA["rloo"], reference_pass="sequence")
        agent = RLOO(RLOOConfig(**common), policy)
    else:
        env = KLPenalty(base, ref, kl_coef=0.0, reference_pass="sequence")  # GRPO: KL in the loss; the env only reports ref log-probs
        agent = GRPO(GRPOConfig(**common, loss_type="sequence"), policy, kl_coef=BETA["grpo"])
    return timed_updates(env, policy, agent, updates)


def run_trl(agent_name: str, root: Path, updates: int) -> list[float]:
    import os

    import torch
    from datasets import Dataset

    os.environ.setdefault("WANDB_DISABLED", "true")
    if agent_name == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
        extra = {}
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
        extra = {"loss_type": "grpo", "scale_rewards": "group"}
    tok = tokenizer()
    torch.manual_seed(0)
    ds = Dataset.from_dict({"prompt": PROMPTS * 10})
    with tempfile.TemporaryDirectory() as out:
        args = Config(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_generations=K,
            max_completion_length=RESPONSE, max_steps=updates, learning_rate=LR, beta=BETA[agent_name],
            num_iterations=1, temperature=1.0, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
            logging_steps=1000, **extra,
        )
        trainer = Trainer(model=str(root / "policy"), reward_funcs=str(root / "reward"), args=args,
                          train_dataset=ds, processing_class=tok)
        return timed_train(trainer)


def child(side: str, agent: str, root: Path, updates: int) -> None:
    times = (run_textrl if side == "textrl" else run_trl)(agent, root, updates)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(json.dumps({"times": times, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2l", "6l"], choices=["2l", "6l"])
    parser.add_argument("--agents", nargs="+", default=["rloo", "grpo"], choices=["rloo", "grpo"])
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "AGENT", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]), args.updates)
        return
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build_models(size, root)
            for agent in args.agents:
                res = {}
                for side in ("trl", "textrl"):
                    proc = subprocess.run([sys.executable, __file__, "--child", side, agent, str(root),
                                           "--updates", str(args.updates)], capture_output=True, text=True)
                    if proc.returncode != 0:
                        sys.exit(f"{side} {agent} {size} failed:\n{proc.stderr[-3000:]}")
                    res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
                med = {s: statistics.median(res[s]["times"][1:]) for s in res}
                rows.append((agent, size, med["trl"], med["textrl"], res["trl"]["peak_mb"], res["textrl"]["peak_mb"]))
                print(f"{agent} {size}: TRL {med['trl']:.3f} s/update, textrl {med['textrl']:.3f} s/update "
                      f"(speed-up {med['trl'] / med['textrl']:.2f}x); peak RSS TRL {res['trl']['peak_mb']:.0f} MB, "
                      f"textrl {res['textrl']['peak_mb']:.0f} MB", flush=True)
    names = {"2l": "GPT-2 2 layers, n_embd 128", "6l": "GPT-2 6 layers, n_embd 384"}
    print("\n| agent | model | TRL s/update | textrl s/update | speed-up (TRL/textrl) | TRL peak RSS (MB) "
          "| textrl peak RSS (MB) | memory ratio (textrl/TRL) |")
    print("|---|---|---|---|---|---|---|---|")
    for agent, size, t_trl, t_ours, m_trl, m_ours in rows:
        print(f"| {agent.upper()} | {names[size]} | {t_trl:.3f} | {t_ours:.3f} | {t_trl / t_ours:.2f}x | {m_trl:.0f} "
              f"| {m_ours:.0f} | {m_ours / m_trl:.2f} |")


if __name__ == "__main__":
    main()
