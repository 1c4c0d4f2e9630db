"""The shared collector: shapes, masks for next-step autoreset, truncation bootstrapping from the true final
observation under same-step autoreset, terminated vs truncated kept apart."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from textrl.collector import Collector
from textrl.rollout import ActOutput


class Counter(gym.Env):
    """obs = [steps taken]; terminates when the action is 1, else truncated by TimeLimit."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.n = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.n += 1
        return np.array([self.n], np.float32), 1.0, bool(action == 1), False, {}


class ScriptedActor:
    """V(s) = 10 + s[0] so every value can be traced back to its observation; actions follow a script."""

    def __init__(self, script):
        self.script = script
        self.t = 0

    def act(self, obs):
        a = torch.as_tensor(self.script[self.t % len(self.script)])
        self.t += 1
        return ActOutput(a, torch.zeros(len(obs)), self.value(obs))

    def value(self, obs):
        return 10.0 + obs[:, 0]


def make(mode, limit=3, n=2):
    return gym.vector.SyncVectorEnv(
        [lambda: gym.wrappers.TimeLimit(Counter(), limit) for _ in range(n)], autoreset_mode=mode
    )


def test_same_step_bootstraps_truncation_from_final_obs():
    envs = make(AutoresetMode.SAME_STEP)
    # env 0 never terminates (truncated every 3 steps), env 1 terminates on its 2nd step each episode
    col = Collector(envs, num_steps=6)
    col.reset(seed=0)
    ro = col.collect(ScriptedActor([[0, 0], [0, 1]]))
    assert ro.mask.all()  # same-step: no dead steps
    assert ro.obs.shape == (2, 6, 1) and ro.actions.shape == (2, 6)
    assert ro.truncated[0].tolist() == [False, False, True, False, False, True]
    assert not ro.terminated[0].any()
    assert ro.terminated[1].tolist() == [False, True, False, True, False, True]
    # at env 0's truncation the next value is V(final obs = 3) = 13, not V(reset obs = 0) = 10
    assert ro.next_values[0, 2].item() == 13.0 and ro.next_values[0, 5].item() == 13.0
    assert ro.next_values[0, 0].item() == 11.0 and ro.next_values[0, 1].item() == 12.0
    # finished episodes in step order, env order within a step: t1 env1, t2 env0, t3 env1, t5 env0 and env1
    assert ro.episode_returns == [2.0, 3.0, 2.0, 3.0, 2.0]
    assert ro.episode_lengths == [2, 3, 2, 3, 2]


def test_next_step_masks_the_dead_reset_step():
    envs = make(AutoresetMode.NEXT_STEP)
    col = Collector(envs, num_steps=8)
    col.reset(seed=0)
    ro = col.collect(ScriptedActor([[0, 0]]))
    # env 0: steps 0,1,2 real (truncated at 2), step 3 is the reset step (masked), 4,5,6 real, 7 masked
    assert ro.mask[0].tolist() == [True, True, True, False, True, True, True, False]
    assert ro.truncated[0, 2] and not ro.terminated[0, 2]
    # the value after a truncated step is that of the final observation (seen at the dead step)
    assert ro.next_values[0, 2].item() == 13.0
    assert ro.rewards[0, 3].item() == 0.0


def test_disabled_autoreset_is_rejected():
    envs = make(AutoresetMode.DISABLED)
    with pytest.raises(ValueError, match="autoreset_mode"):
        Collector(envs, num_steps=4)
    with pytest.raises(ValueError, match="num_steps"):
        Collector(make(AutoresetMode.SAME_STEP), num_steps=0)
