"""Distribution at the edge: collectives, the global-batch reducer, DeepSpeed, and the learner.

Nothing under ``agents/`` or ``envs/`` imports this package: agents are plain torch and get a
:class:`~textrl.parallel.distributed.Reducer` and a model to call from the :class:`~textrl.parallel.learner.Learner`.
"""

from textrl.parallel.distributed import Reducer, is_main, process_shard, rank, world_size
from textrl.parallel.learner import Learner

__all__ = ["Learner", "Reducer", "is_main", "process_shard", "rank", "world_size"]
