"""textrl environments: the token-level text generation env, prompt sampling, the KL-to-reference wrapper,
reward scorers, and the built-in tasks (``toy``: TargetToken-v0; ``cheerful``: Cheerful-v0).

Registered ids (on ``import textrl``): ``textrl/TextGen-v0`` — ``gym.make_vec("textrl/TextGen-v0",
num_envs=B, tokenizer=..., prompts=..., scorer=...)`` builds the natively batched env, ``gym.make(...)``
its single-env form.
"""

from textrl.envs.kl_penalty import KLPenalty
from textrl.envs.prompts import PromptSampler, load_prompts
from textrl.envs.scorers import HFRewardModelScorer, Scorer, TokenScorer, check_scores
from textrl.envs.text_gen import TextGenEnv, TextGenVectorEnv

__all__ = [
    "KLPenalty", "HFRewardModelScorer", "PromptSampler", "Scorer", "TokenScorer", "check_scores", "TextGenEnv",
    "TextGenVectorEnv", "load_prompts",
]
