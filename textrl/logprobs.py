"""Log-probabilities and entropy of sampled tokens: the one place where logits meet the temperature.

The sampler, the KV-cached generator, the reference pass and the language-model policy every LM agent
evaluates call these functions, so a
sampled token's log-prob, its reference log-prob and the log-prob the update recomputes are all of the
same distribution softmax(logits / T) — the condition for a PPO ratio of exactly 1 on the first minibatch
(Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", detail 5).
"""

from __future__ import annotations

import torch

__all__ = ["tempered", "token_logprobs", "logprobs_and_entropy", "entropy_from_logits"]


def tempered(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``logits / temperature`` in float32, ``[..., V]``. The only function that divides by the temperature
    (at 1 it returns the float32 logits themselves: no full-vocabulary copy and no backward through one)."""
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[token]: ``logits`` ``[..., V]``, ``tokens`` ``[...]`` → ``[...]``.

    Computed as z[token] − logsumexp(z), without materialising a ``[..., V]`` log-softmax tensor."""
    z = tempered(logits, temperature)
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs` and the entropy of softmax(logits / T) per position, sharing one logsumexp.

    The entropy carries a gradient only with ``entropy_grad`` (an entropy bonus): backward through a softmax
    over the whole vocabulary is the largest cost of a small model's update. ``with_entropy=False`` (and no
    ``entropy_grad``) skips it and returns None."""
    z = tempered(logits, temperature)  # (..., V)
    lse = torch.logsumexp(z, dim=-1)  # (...)
    logprobs = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy or entropy_grad:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)  # H = logsumexp(z) − Σ p·z
    return logprobs, entropy


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) over the last dim, ``[..., V]`` → ``[...]`` (logsumexp form: large
    logits do not overflow)."""
    z = tempered(logits, temperature)
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
