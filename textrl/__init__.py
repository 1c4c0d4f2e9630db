"""textrl: reinforcement learning on language models, with text generation as a Gymnasium environment.

Import names: ``textrl`` (core maths, rollout, tracking, CLI), ``textrl.agents`` (one module per agent),
``textrl.envs`` (text envs, wrappers, reward scorers).
"""

from textrl.advantages import gae, next_values_from
from textrl.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from textrl.losses import entropy_from_logits, explained_variance, kl_estimate, policy_loss, value_loss
from textrl.masking import masked_mean, masked_sum, masked_var, masked_whiten

__version__ = "0.1.0"


def _register_envs() -> None:
    import gymnasium as gym

    if "textrl/TextGen-v0" not in gym.envs.registry:
        gym.register(
            id="textrl/TextGen-v0",
            entry_point="textrl.envs.text_gen:TextGenEnv",
            vector_entry_point="textrl.envs.text_gen:TextGenVectorEnv",
        )
    if "textrl/TargetToken-v0" not in gym.envs.registry:
        gym.register(
            id="textrl/TargetToken-v0",
            vector_entry_point="textrl.envs.toy:target_token_env",
            kwargs={"model": "textrl/tiny-char-gpt2"},
        )
    if "textrl/Cheerful-v0" not in gym.envs.registry:
        gym.register(
            id="textrl/Cheerful-v0",
            vector_entry_point="textrl.envs.cheerful:cheerful_env",
            kwargs={"model": "smollm2-135m-instruct"},
        )


_register_envs()

__all__ = [
    "gae", "next_values_from", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
    "policy_loss", "value_loss", "entropy_from_logits", "explained_variance", "kl_estimate",
    "FixedKLController", "AdaptiveKLController", "make_kl_controller", "__version__",
]
