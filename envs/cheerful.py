"""``textrl/Cheerful-v0``: the embedded default task. SmolLM2-135M-Instruct answers everyday prompts (a set
written for this project: 300 train, 50 held-out on disjoint topics) and is rewarded for cheerful answers
by a MiniLM sentence-embedding style scorer (:class:`~textrl.envs.scorers.MiniLMStyleScorer`). Pass
``scorer=`` to share one loaded scorer between several envs (``textrl train`` shares the training env's
with its held-out evaluation envs)."""

from __future__ import annotations

from importlib import resources

from textrl.envs.scorers import MiniLMStyleScorer
from textrl.envs.text_gen import TextGenEnv, TextGenVectorEnv

__all__ = ["cheerful_env", "prompt_file", "CheerfulEnv"]

def prompt_file(name: str) -> str:
    return str(resources.files("textrl.experiments").joinpath("prompts").joinpath(name))


def cheerful_env(num_envs: int, tokenizer, max_new_tokens: int = 32, prompts=None, eval_prompts=None,
                 scorer=None, **kwargs) -> TextGenVectorEnv:
    scorer = scorer if scorer is not None else MiniLMStyleScorer(device=kwargs.get("device", "cpu"))
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # SmolLM2's GGUF tokenizer sets PAD = EOS (<|im_end|>); <|endoftext|> is unused in chat turns
        kwargs.setdefault("pad_token_id", tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    kwargs.setdefault("chat_template", True)
    return TextGenVectorEnv(num_envs, tokenizer, prompts or prompt_file("cheerful_train.txt"), scorer,
                            max_new_tokens=max_new_tokens,
                            eval_prompts=eval_prompts or prompt_file("cheerful_eval.txt"), **kwargs)


class CheerfulEnv(TextGenEnv):
    """The single-env form of ``textrl/Cheerful-v0`` (``gym.make(..., tokenizer=...)``; ``gym.make_vec(...,
    vectorization_mode="sync")``): one row of :func:`cheerful_env`, numpy in and out. Each copy loads its own
    MiniLM scorer unless ``scorer=`` is given."""

    vector_env = staticmethod(cheerful_env)
