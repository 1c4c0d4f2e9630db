"""textrl environments: the token-level text generation env, prompt sampling, the KL-to-reference wrapper,
reward scorers, multi-turn envs (``turns``), verifiable-reward helpers (``verifiable``), and the built-in tasks
(``toy``: TargetToken-v0; ``cheerful``: Cheerful-v0; ``tasks``: Arithmetic-v0, Calculator-v0, GuessNumber-v0).

Registered ids (on ``import textrl``): ``textrl/TextGen-v0``, ``textrl/TargetToken-v0``,
``textrl/Cheerful-v0``, and the verifiable and multi-turn tasks of :mod:`textrl.envs.tasks`
(``textrl/Arithmetic-v0``, ``textrl/Calculator-v0``, ``textrl/GuessNumber-v0``). Multi-turn envs are written
at the level of messages with :class:`MultiTurnEnv` (:mod:`textrl.envs.turns`). ``gym.make_vec(id, num_envs=B, ...)`` builds the natively batched env (torch tensors
on the model's device, ``autoreset_mode`` DISABLED); ``gym.make(id, ...)`` its single-env form (numpy; passes
``check_env``), which ``gym.make_vec(id, num_envs=B, vectorization_mode="sync", ...)`` also uses. TextGen-v0
needs ``tokenizer=``, ``prompts=``, ``scorer=``; TargetToken-v0 needs nothing; Cheerful-v0 needs ``tokenizer=``
(and loads the MiniLM scorer unless ``scorer=`` is given). Every form takes ``render_mode="ansi"``.

Gymnasium's stock vector wrappers expect numpy: wrap the native env in :class:`TorchToNumpy` first, e.g.
``RecordEpisodeStatistics(TorchToNumpy(gym.make_vec("textrl/TargetToken-v0", num_envs=8)))`` or
``DictInfoToList(TorchToNumpy(KLPenalty(env, ref)))`` (:class:`KLPenalty` inside, on the torch env). The sync
form is numpy already. Training collects from the torch env directly (:mod:`textrl.lm.collect`).
"""

from textrl.envs.kl_penalty import KLPenalty
from textrl.envs.prompts import PromptSampler, load_prompt_records, load_prompts
from textrl.envs.scorers import HFRewardModelScorer, Scorer, TokenScorer, check_scores
from textrl.envs.text_gen import TextGenEnv, TextGenVectorEnv, TorchToNumpy
from textrl.envs.turns import MultiTurnEnv, Reply

__all__ = [
    "KLPenalty", "HFRewardModelScorer", "PromptSampler", "Scorer", "TokenScorer", "check_scores", "TextGenEnv",
    "TextGenVectorEnv", "TorchToNumpy", "load_prompt_records", "load_prompts", "MultiTurnEnv", "Reply",
]
