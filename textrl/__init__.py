"""textrl: reinforcement learning on language models, with text generation as a Gymnasium environment.

Import names: ``textrl`` (core maths, rollout types, the loop, runs, CLI), ``textrl.lm`` (language-model
policies, generation, collection, evaluation), ``textrl.parallel`` (the learner and data-parallel helpers),
``textrl.agents`` (one module per agent), ``textrl.envs`` (text envs, wrappers, reward scorers).
"""

from textrl.advantages import gae, next_values_from
from textrl.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from textrl.logprobs import entropy_from_logits, token_logprobs
from textrl.losses import explained_variance, kl_estimate, policy_loss, value_loss
from textrl.masking import masked_mean, masked_sum, masked_var, masked_whiten

__version__ = "0.1.0"


def _register() -> None:
    """The built-in env ids (with Gymnasium) and the in-memory tiny model of the toy task (with
    :func:`textrl.lm.models.register_model`); every target is a string, imported on first use. Every id has
    both a single-env ``entry_point`` (``gym.make``, ``make_vec(..., vectorization_mode="sync")``) and a
    natively batched ``vector_entry_point`` (``make_vec``'s default)."""
    import gymnasium as gym

    from textrl.lm.models import register_model

    register_model("textrl/tiny-char-gpt2", model="textrl.envs.toy:tiny_model",
                   tokenizer="textrl.envs.toy:char_tokenizer")
    envs = {
        "textrl/TextGen-v0": dict(entry_point="textrl.envs.text_gen:TextGenEnv",
                                  vector_entry_point="textrl.envs.text_gen:TextGenVectorEnv"),
        "textrl/TargetToken-v0": dict(entry_point="textrl.envs.toy:TargetTokenEnv",
                                      vector_entry_point="textrl.envs.toy:target_token_env",
                                      kwargs={"model": "textrl/tiny-char-gpt2"}),
        "textrl/Cheerful-v0": dict(entry_point="textrl.envs.cheerful:CheerfulEnv",
                                   vector_entry_point="textrl.envs.cheerful:cheerful_env",
                                   kwargs={"model": "smollm2-135m-instruct"}),
        **{f"textrl/{name}-v0": dict(entry_point=f"textrl.envs.tasks.{module}:{name}SingleEnv",
                                     vector_entry_point=f"textrl.envs.tasks.{module}:{name}Env",
                                     kwargs={"model": "smollm2-135m-instruct"})
           for name, module in (("Arithmetic", "arithmetic"), ("Calculator", "calculator"),
                                ("GuessNumber", "guess_number"))},
    }
    for env_id, spec in envs.items():
        if env_id not in gym.envs.registry:
            gym.register(id=env_id, **spec)


_register()


def __getattr__(name: str):
    """``textrl.Trainer`` and ``textrl.PPO`` (the Python API, :mod:`textrl.api`), imported on first use."""
    if name in ("Trainer", "PPO"):
        from textrl import api

        return getattr(api, name)
    raise AttributeError(f"module 'textrl' has no attribute {name!r}")

__all__ = [
    "gae", "next_values_from", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
    "policy_loss", "value_loss", "entropy_from_logits", "token_logprobs", "explained_variance", "kl_estimate",
    "FixedKLController", "AdaptiveKLController", "make_kl_controller", "__version__", "Trainer", "PPO",
]
