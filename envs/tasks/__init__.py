"""Built-in verifiable and multi-turn tasks (registered on ``import textrl``; SmolLM2-135M-Instruct by default):

- ``textrl/Arithmetic-v0`` (:mod:`.arithmetic`): single-digit sums, exact-match reward.
- ``textrl/Calculator-v0`` (:mod:`.calculator`): harder sums with a calculator tool the agent may call.
- ``textrl/GuessNumber-v0`` (:mod:`.guess_number`): find a hidden number from "higher"/"lower" replies.

Each is a :class:`~textrl.envs.turns.MultiTurnEnv` whose data is generated from a fixed seed (train and held-out
rows disjoint) and whose ``success`` count gives accuracy and pass@k in ``textrl eval``.
"""
