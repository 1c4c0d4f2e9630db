"""textrl PPO vs Stable-Baselines3 PPO on CartPole-v1, same hyperparameters, same steps, one process.

    python benchmarks/cartpole_vs_sb3.py [--steps 100000] [--seeds 1 2 3]

Both use the rl-baselines3-zoo CartPole preset (experiments/presets/CartPole-v1.yaml): 8 envs, 32 steps,
one minibatch of 256, 20 epochs, lr 1e-3 and clip 0.2 both linearly annealed, γ 0.98, λ 0.8, vf_coef 0.5,
64-64 tanh MLPs. textrl's time includes everything its `train` does (TensorBoard, metrics.jsonl,
checkpoints at the end); SB3 runs with verbose=0. Prints wall times, their ratio and final returns
(mean of the last 20 finished episodes). Needs the `bench` extra (stable-baselines3).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def run_textrl(steps: int, seed: int) -> tuple[float, float]:
    from textrl.cli import resolve_train_config
    from textrl.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = resolve_train_config(["--env", "CartPole-v1", "--total-steps", str(steps), "--seed", str(seed),
                                       "--output-dir", tmp, "--checkpoint-every", "0"])
        start = time.perf_counter()
        result = train(cfg, quiet=True)
        return time.perf_counter() - start, result.mean_return(20)


def run_sb3(steps: int, seed: int) -> tuple[float, float]:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    def linear(start: float):
        return lambda progress_remaining: progress_remaining * start

    start = time.perf_counter()
    envs = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = PPO(
        "MlpPolicy", envs, n_steps=32, batch_size=256, n_epochs=20, learning_rate=linear(1e-3),
        clip_range=linear(0.2), gamma=0.98, gae_lambda=0.8, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5,
        seed=seed, device="cpu", verbose=0, policy_kwargs={"activation_fn": torch.nn.Tanh},
    )
    model.learn(total_timesteps=steps)
    elapsed = time.perf_counter() - start
    returns = [ep["r"] for ep in list(model.ep_info_buffer)[-20:]]
    return elapsed, float(np.mean(returns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()

    rows = []
    for i, seed in enumerate(args.seeds):
        # alternate the order so that neither side always runs on a warm (or cold) process
        order = [("textrl", run_textrl), ("sb3", run_sb3)]
        if i % 2:
            order.reverse()
        res = {name: fn(args.steps, seed) for name, fn in order}
        rows.append((seed, *res["textrl"], *res["sb3"]))
        t_ours, r_ours, t_sb3, r_sb3 = rows[-1][1:]
        print(f"seed {seed}: textrl {t_ours:6.1f} s (return {r_ours:5.1f}) | SB3 {t_sb3:6.1f} s "
              f"(return {r_sb3:5.1f}) | time ratio textrl/SB3 = {t_ours / t_sb3:.2f}", flush=True)

    t_ours = statistics.median(r[1] for r in rows)
    t_sb3 = statistics.median(r[3] for r in rows)
    print("\n| | textrl | SB3 |\n|---|---|---|")
    print(f"| median wall time, {args.steps} steps (s) | {t_ours:.1f} | {t_sb3:.1f} |")
    print(f"| final return per seed | {', '.join(f'{r[2]:.0f}' for r in rows)} | "
          f"{', '.join(f'{r[4]:.0f}' for r in rows)} |")
    print(f"\ntime ratio textrl/SB3 (median): {t_ours / t_sb3:.2f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
