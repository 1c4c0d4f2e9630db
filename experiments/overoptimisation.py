"""The four models of RLHF together, and reward over-optimisation (Gao et al. 2022, arXiv:2210.10760).

    python -m textrl.experiments.overoptimisation [--out DIR] [--updates 16] [--kl-coef 0.02]

1. The reference policy (SmolLM2-135M-Instruct) answers training prompts, 4 completions each.
2. A gold scorer that ships offline (the MiniLM cheerfulness score of ``textrl/Cheerful-v0``) labels pairs of
   completions of the same prompt; labels are drawn Bradley–Terry style, P(a ≻ b) = σ((g_a − g_b)/τ), so
   the preference data is noisy as human labels are.
3. ``train_reward_model`` fits a proxy reward model on those pairs (MiniLM backbone, normalised so
   reference responses score mean 0, std 1).
4. PPO (LoRA, reference = adapters off, value head on the trunk) optimises the proxy with a small β, so the
   KL to the reference grows; every update records the batch's proxy and gold scores and its KL.

Writes ``DIR/overoptimisation.md`` (proxy and gold reward, in units of the reference policy's std, by KL)
and ``DIR/overoptimisation.png``: proxy reward keeps rising with KL while gold reward rises less, or turns.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch


def sample_reference(policy, tokenizer, prompts: list[str], k: int, seed: int, max_new_tokens: int,
                     temperature: float) -> list[tuple[str, list[str]]]:
    from textrl.envs.cheerful import cheerful_env

    from textrl.lm.collect import collect_tokens
    from textrl.lm.evaluate import decode_completions
    from textrl.lm.generate import HFGenerator

    out = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i:i + 16]
        env = cheerful_env(len(chunk) * k, tokenizer, max_new_tokens=max_new_tokens, prompts=chunk,
                           prompt_order="sequential", num_generations=k, scorer=lambda p, c: torch.zeros(len(c)))
        ro = collect_tokens(env, HFGenerator(policy, temperature), seed=seed + i)
        texts = decode_completions(tokenizer, ro)
        for g in range(len(chunk)):
            out.append((chunk[int(ro.prompt_index[g * k])], texts[g * k:(g + 1) * k]))
    return out


def label_pairs(samples, gold, tau: float, seed: int) -> list[dict]:
    """Two pairs per prompt (completions 0 vs 1 and 2 vs 3), labelled by a Bradley–Terry draw on gold scores."""
    rng = random.Random(seed)
    rows = []
    for prompt, texts in samples:
        g = gold([prompt] * len(texts), texts).tolist()
        for a, b in ((0, 1), (2, 3)):
            if texts[a].strip() == texts[b].strip():
                continue
            p_a = 1.0 / (1.0 + math.exp(-(g[a] - g[b]) / tau))
            first = rng.random() < p_a
            rows.append({"prompt": prompt, "chosen": texts[a] if first else texts[b],
                         "rejected": texts[b] if first else texts[a]})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/overoptimisation"))
    ap.add_argument("--prompts", type=int, default=96, help="training prompts answered by the reference policy")
    ap.add_argument("--updates", type=int, default=16)
    ap.add_argument("--kl-coef", type=float, default=0.02)
    ap.add_argument("--tau", type=float, default=0.1, help="label noise temperature (gold score units)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    from textrl.envs.cheerful import prompt_file
    from textrl.envs.prompts import load_prompts
    from textrl.envs.scorers import MiniLMStyleScorer

    from textrl.config import TrainConfig
    from textrl.lm.build import build_policy
    from textrl.lm.evaluate import decode_completions
    from textrl.reward_model import RewardModelConfig, train_reward_model
    from textrl.train import make_run

    T, temp = 24, 0.7
    cfg = TrainConfig(env="textrl/Cheerful-v0", seed=args.seed, num_envs=32, total_steps=32 * T * args.updates,
                      output_dir=str(args.out / "ppo"), model={"lora_r": 16, "lora_alpha": 32,
                      "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj")}, sampling={"temperature": temp},
                      kl={"coef": args.kl_coef}, eval={"generations": 1},
                      agent_config={"num_epochs": 2, "num_minibatches": 2, "learning_rate": 5e-4, "gamma": 1.0,
                                    "gae_lambda": 0.95, "vf_coef": 0.1})
    tokenizer, policy, _ = build_policy(cfg, "cpu")  # the reference policy: the model before any training
    gold = MiniLMStyleScorer()
    train_prompts = load_prompts(prompt_file("cheerful_train.txt"))
    random.Random(args.seed).shuffle(train_prompts)

    t0 = time.perf_counter()
    samples = sample_reference(policy.lm, tokenizer, train_prompts[:args.prompts], 4, args.seed, T, temp)
    rows = label_pairs(samples, gold, args.tau, args.seed)
    data = args.out / "preferences.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    rm = train_reward_model(RewardModelConfig(data=str(data), output_dir=str(args.out / "proxy_rm"), num_epochs=3,
                                              learning_rate=5e-5, seed=args.seed), quiet=True)
    # gold in the same units as the proxy: mean 0, std 1 over the reference policy's completions
    ref_gold = torch.cat([gold([p] * 4, texts) for p, texts in samples])
    g_mean, g_std = float(ref_gold.mean()), float(ref_gold.std())
    print(f"reference samples + proxy RM: {time.perf_counter() - t0:.0f} s; {len(rows)} pairs; proxy held-out "
          f"pairwise accuracy {rm['eval_accuracy']:.3f}", flush=True)

    # PPO on the proxy: a text run whose scorer is the trained reward model, driven update by update so that
    # every batch is also scored by the gold scorer
    cfg.model.reward_model = str(args.out / "proxy_rm")
    cfg.env_kwargs = {"max_new_tokens": T, "prompts": train_prompts[args.prompts:]}
    run = make_run(cfg, quiet=True)
    history = []
    for u in range(args.updates):
        ro = run.collect()
        texts = decode_completions(tokenizer, ro)
        prompts = [run.base.prompts[int(i)] for i in ro.prompt_index]
        g = (gold(prompts, texts) - g_mean) / g_std
        history.append({"update": u, "kl": float(ro.kl.sum(1).mean()), "proxy": float(ro.scores.mean()),
                        "gold": float(g.mean())})
        print(json.dumps(history[-1]), flush=True)
        run.update(ro, 1.0 - u / args.updates)
    run.close()
    (args.out / "history.jsonl").write_text("\n".join(json.dumps(h) for h in history) + "\n")

    lines = ["| update | KL to reference (nats/completion) | proxy reward (ref. std units) | gold reward (ref. std units) |",
             "|---|---|---|---|"]
    lines += [f"| {h['update']} | {h['kl']:.2f} | {h['proxy']:+.3f} | {h['gold']:+.3f} |" for h in history]
    (args.out / "overoptimisation.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    order = sorted(history, key=lambda h: h["kl"])
    ax.plot([h["kl"] for h in order], [h["proxy"] for h in order], marker="o", ms=3, label="proxy (trained RM)")
    ax.plot([h["kl"] for h in order], [h["gold"] for h in order], marker="s", ms=3, label="gold (MiniLM cheerfulness)")
    ax.set_xlabel("KL to the reference policy (nats per completion)")
    ax.set_ylabel("reward (std of reference responses)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "overoptimisation.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
