"""The files a text run leaves for people: ``samples.md`` (held-out answers before and after training) and
``curves.png`` (score, KL and entropy against generated tokens)."""

from __future__ import annotations

from pathlib import Path

from textrl.lm.evaluate import EvalResult, summary_line

__all__ = ["write_samples", "plot_curves"]


def write_samples(path: Path, before: EvalResult | None, after: EvalResult | None) -> None:
    """The held-out prompts quoted in both evaluations with their first answer before and after."""
    if before is None or after is None:
        return
    lines = ["# Held-out samples, before and after training\n", summary_line(before, after) + "\n"]
    for (prompt, b), (_, a) in zip(before.samples, after.samples, strict=True):
        lines += [f"## Prompt\n\n{prompt.strip()}\n", f"**Before:** {b.strip()}\n", f"**After:** {a.strip()}\n"]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot_curves(history: list[dict[str, float]], path: Path) -> bool:
    """``curves.png`` (reward, KL, entropy per update); False, drawing nothing, without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False

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
    return True
