"""Gymnasium conformance of the text envs (issue: "Gymnasium conformance"), in the style of Gymnasium's own
tests/vector: registered ids build with ``gym.make`` and ``gym.make_vec`` in every mode; spaces hold what the
env returns and describe what ``step`` accepts; seeding reproduces; returned observations are never written
to later; every info key has its ``_key`` mask; ``render_mode="ansi"``; the stock vector wrappers work through
:class:`~textrl.envs.text_gen.TorchToNumpy`. Tiny in-memory char tokenizer and GPT-2 only; nothing is loaded."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env, data_equivalence
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.vector import DictInfoToList, RecordEpisodeStatistics
from textrl.envs import KLPenalty, TorchToNumpy
from textrl.envs.toy import char_tokenizer, tiny_gpt2

import textrl  # noqa: F401  (registers the ids)

PROMPTS = ["hi", "hello there", "a", "good day, friend"]
TOK = char_tokenizer()
EOS, A = TOK.eos_token_id, TOK.convert_tokens_to_ids("a")


def length_scorer(prompts, completions):
    return torch.tensor([float(len(c)) for c in completions])


TEXT_GEN = dict(tokenizer=TOK, prompts=PROMPTS, scorer=length_scorer, max_new_tokens=5)
# Cheerful-v0 with the char tokenizer (no chat template) and a given scorer: no SmolLM2, no MiniLM loaded
CHEERFUL = dict(tokenizer=TOK, scorer=length_scorer, chat_template=False, max_new_tokens=3)
IDS = [("textrl/TextGen-v0", TEXT_GEN), ("textrl/TargetToken-v0", {"max_new_tokens": 4}),
       ("textrl/Cheerful-v0", CHEERFUL)]


def to_np(x):
    """Tensors → numpy copies, through dicts and tuples (for the space and equality checks)."""
    if torch.is_tensor(x):
        return x.detach().cpu().numpy().copy()
    if isinstance(x, dict):
        return {k: to_np(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(to_np(v) for v in x)
    return np.array(x, copy=True) if isinstance(x, np.ndarray) else x


def vec_env(B=3, **kw):
    return gym.make_vec("textrl/TextGen-v0", num_envs=B, **{**TEXT_GEN, **kw})


def kl_env(B=3, **kw):
    return KLPenalty(vec_env(B, **kw), tiny_gpt2(len(TOK), seed=1), kl_coef=0.1)


def run_to_end(env, actions):
    """Step ``env`` with ``actions()`` until every row has ended; the list of step results."""
    out = []
    while True:
        out.append(env.step(actions()))
        done = np.logical_or.reduce([np.asarray(step[2]) | np.asarray(step[3]) for step in out])
        if done.all():
            return out


@pytest.mark.parametrize("mode", ["make", "vector_entry_point", "sync"])
@pytest.mark.parametrize("env_id, kwargs", IDS, ids=[i for i, _ in IDS])
def test_every_registered_id_makes_in_every_mode(env_id, kwargs, mode):
    if mode == "make":
        env = gym.make(env_id, **kwargs)
    else:
        env = gym.make_vec(env_id, num_envs=2, vectorization_mode=mode, **kwargs)
        assert env.num_envs == 2 and isinstance(env.metadata["autoreset_mode"], AutoresetMode)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(to_np(obs))
    obs, reward, terminated, *_ = env.step(env.action_space.sample())
    assert env.observation_space.contains(to_np(obs))
    if mode == "make":
        assert isinstance(reward, float) and isinstance(terminated, bool)
    env.close()


def test_single_env_passes_the_env_checker_render_included():
    env = gym.make("textrl/TargetToken-v0", max_new_tokens=4)
    check_env(env.unwrapped)  # render check: re-makes the env with each of metadata["render_modes"]
    env.reset(seed=0)
    assert env.unwrapped.metadata["render_modes"] == ["ansi"]


def test_vector_env_spaces_seeding_and_step_types():
    """Gymnasium's vector checks on the native env: spaces hold what it returns, a seed reproduces the reset,
    ``action_space.sample()`` steps, ``[B]`` rewards/flags of fixed dtypes, the declared autoreset mode."""
    envs = vec_env(B=4)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.DISABLED
    assert envs.action_space == gym.vector.utils.batch_space(envs.single_action_space, 4)
    assert envs.observation_space == gym.vector.utils.batch_space(envs.single_observation_space, 4)
    obs, info = envs.reset(seed=123)
    again, info_again = vec_env(B=4).reset(seed=123)
    assert data_equivalence(to_np((obs, info)), to_np((again, info_again)))
    assert envs.observation_space.contains(to_np(obs))
    envs.action_space.seed(0)
    obs, rew, term, trunc, info = envs.step(envs.action_space.sample())
    assert envs.observation_space.contains(to_np(obs))
    assert rew.shape == term.shape == trunc.shape == (4,)
    assert rew.dtype == torch.float32 and term.dtype == trunc.dtype == torch.bool
    assert all(v.shape == (4,) for v in info.values())


def sync_env(B=3):
    return gym.make_vec("textrl/TextGen-v0", num_envs=B, vectorization_mode="sync", **TEXT_GEN)


def actions_for(envs, tokens):
    """``tokens`` as ``envs.step`` takes them: with a (made-up) log-prob for the KL wrapper."""
    if isinstance(envs.action_space, gym.spaces.Dict):
        return {"token": torch.as_tensor(tokens), "logprob": torch.full((len(tokens),), -1.0)}
    return np.asarray(tokens)


MAKERS = {"native": vec_env, "kl": kl_env, "numpy": lambda: TorchToNumpy(kl_env()), "sync": sync_env}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_returned_observations_are_never_written_to_later(make):
    envs = make()
    kept = [envs.reset(seed=0)[0]]
    copies = [to_np(kept[0])]
    for obs, *_ in run_to_end(envs, lambda: actions_for(envs, [A, A, A])):
        kept.append(obs)
        copies.append(to_np(obs))
    envs.reset(seed=1)  # a reset rewrites every buffer: the kept observations must not change
    assert all(data_equivalence(to_np(k), c) for k, c in zip(kept, copies, strict=True))
    assert len({c["input_ids"].tobytes() for c in copies}) == len(copies)  # every step wrote a token


def assert_masked(info, B):
    for key, value in info.items():
        if key.startswith("_"):
            assert key[1:] in info, f"mask {key} of no key"
            continue
        assert f"_{key}" in info, f"info[{key!r}] has no _{key} mask"
        mask = np.asarray(info[f"_{key}"])
        assert mask.dtype == np.bool_ and mask.shape == (B,), key
        if isinstance(value, dict):
            assert_masked({**value, **{f"_{k}": mask for k in value}}, B)
        else:
            assert len(value) == B, key


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_every_info_key_has_its_mask_and_the_masks_agree_across_modes(make):
    envs = make()
    _, info = envs.reset(seed=0)
    assert_masked(info, 3)
    assert set(info) >= {"prompt_index", "response_start"}
    tokens = iter([[EOS, A, A]] + [[A, A, A]] * 5)
    steps = run_to_end(envs, lambda: actions_for(envs, next(tokens)))
    for _, _, term, trunc, info in steps:
        assert_masked(info, 3)
        # _score marks the rows scored at this step, in the native and the sync form alike (a sync env
        # leaves out a key no row has)
        scored = np.asarray(info.get("_score", np.zeros(3, bool)))
        assert np.array_equal(scored, np.asarray(term) | np.asarray(trunc))
    if isinstance(envs.action_space, gym.spaces.Dict):
        assert {"kl", "kl_penalty", "ref_logprob", "kl_coef"} <= set(steps[0][-1])


def test_render_ansi():
    envs = vec_env(B=2, render_mode="ansi")
    assert "ansi" in envs.metadata["render_modes"] and envs.render_mode == "ansi"
    obs, info = envs.reset(seed=0)
    envs.step(torch.tensor([A, EOS]))
    frames = envs.render()
    prompts = [PROMPTS[i] for i in info["prompt_index"].tolist()]
    assert frames == (prompts[0] + "a", prompts[1] + "<eos>")
    assert vec_env(B=2).render() is None
    env = gym.make("textrl/TargetToken-v0", render_mode="ansi")
    env.reset(seed=0)
    env.step(A)
    assert isinstance(env.render(), str) and env.render().endswith("a")
    sync = gym.make_vec("textrl/TextGen-v0", 2, vectorization_mode="sync", render_mode="ansi", **TEXT_GEN)
    sync.reset(seed=0)
    assert all(isinstance(f, str) for f in sync.render())
    with pytest.raises(ValueError, match="render_mode"):
        vec_env(render_mode="human")


def test_kl_wrapper_action_space_describes_what_step_accepts():
    envs = kl_env(B=3)
    assert isinstance(envs.action_space, gym.spaces.Dict) and set(envs.action_space) == {"token", "logprob"}
    assert envs.action_space == gym.vector.utils.batch_space(envs.single_action_space, 3)
    envs.reset(seed=0)
    envs.action_space.seed(0)
    for _ in range(3):
        action = envs.action_space.sample()
        assert envs.action_space.contains(action)
        _, reward, *_, info = envs.step(action)
        assert torch.isfinite(reward).all() and torch.isfinite(info["kl"]).all()
    given = {"token": np.array([A, A, A]), "logprob": np.full(3, -1.0, np.float32)}
    assert envs.action_space.contains(given)
    with pytest.raises(TypeError, match="log-prob"):
        envs.step(torch.tensor([A, A, A]))


def test_record_episode_statistics_through_torch_to_numpy():
    envs = RecordEpisodeStatistics(TorchToNumpy(kl_env(B=3)))
    envs.reset(seed=0)
    tokens = iter([[EOS, A, A], [A, EOS, A]] + [[A, A, A]] * 5)
    steps = run_to_end(envs, lambda: actions_for(envs, next(tokens)))
    rewards = np.stack([s[1] for s in steps])  # (T, B) numpy
    assert all(isinstance(x, np.ndarray) for s in steps for x in (*s[0].values(), *s[1:4]))
    ends = [(t, b) for t, s in enumerate(steps) for b in np.flatnonzero(s[-1].get("_episode", []))]
    assert sorted(b for _, b in ends) == [0, 1, 2]  # each row's episode reported once, at its end
    for t, b in ends:
        stats = steps[t][-1]["episode"]
        assert stats["l"][b] == t + 1
        np.testing.assert_allclose(stats["r"][b], rewards[: t + 1, b].sum(), rtol=1e-6)
    assert list(envs.length_queue) == [1, 2, 5]
    sync = RecordEpisodeStatistics(sync_env())  # the sync form is numpy already
    sync.reset(seed=0)
    run_to_end(sync, lambda: np.array([A, A, A]))
    assert list(sync.length_queue) == [5, 5, 5]


def test_dict_info_to_list_through_torch_to_numpy():
    envs = DictInfoToList(TorchToNumpy(kl_env(B=3)))
    _, infos = envs.reset(seed=0)
    assert len(infos) == 3 and set(infos[0]) == {"prompt_index", "response_start"}
    _, _, term, _, infos = envs.step({"token": np.array([EOS, A, A]), "logprob": np.full(3, -1.0, np.float32)})
    assert "score" in infos[0] and "score" not in infos[1]  # only the row scored now
    assert {"valid", "kl", "ref_logprob"} <= set(infos[1])
