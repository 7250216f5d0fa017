"""MemoryVaried and MemoryVariedTyped (issue 23): episodes vary in everything but the task, the expert acting on
what it has seen solves them, a cue-blind expert is at chance, and the cue is the one thing the junction decision
needs."""

import random

import gymnasium as gym
import pytest

from thrifty.bench.memory_level import measure_memory_level
from thrifty.envs import ACTIONS, BabyAITextEnv, eval_seed
from thrifty.envs.memory_varied import MEMORY_SIZES, MemoryVariedEnv, UnknownMemorySizeError
from thrifty.train.planner import collect_episode


VARIED = ["MemoryVaried", "MemoryVariedTyped"]


@pytest.mark.parametrize("level", VARIED)
def test_the_three_figures_of_docs_memory_level(level):
    """At least 0.9 of 60 evaluation seeds distinct, expert success >= 0.95, the cue-blind expert at chance (its
    95% interval holds 1/2; over 60 seeds it cannot be told from a coin)."""
    f = measure_memory_level(level, 60)
    assert f["episodes"] == 60 and f["distinct_fraction"] >= 0.9
    assert f["expert_success"] >= 0.95
    lo, hi = f["blind_success_ci95"]
    assert lo <= 0.5 <= hi and f["blind_success"] < f["expert_success"]


def test_the_old_recall_level_is_two_episodes_and_has_no_blind_expert():
    f = measure_memory_level("MemoryRecallS13", 40)
    assert f["distinct_episodes"] == 2 and f["expert_success"] == 1.0 and f["blind_success"] is None


def test_matching_arm_is_balanced_and_episodes_vary_in_every_factor():
    env = gym.make("thrifty/MemoryVaried-v0").unwrapped
    sizes, north, arms, cues, counts, starts = set(), 0, set(), set(), set(), set()
    n = 200
    for i in range(n):
        env.reset(seed=eval_seed(i))
        c = env.hallway_row
        sizes.add(env.size)
        north += env.success_pos[1] < c
        arms.add((c - env.objects_at[0][1] - 1, env.objects_at[1][1] - c - 1))
        cues.add(env.cue)
        counts.add(len(env.distractors))
        starts.add((tuple(int(v) for v in env.agent_pos), int(env.agent_dir)))
        names = [(o.type, o.color) for o in (env.grid.get(*p) for p in env.objects_at)]
        assert names[0] != names[1] and names.count(env.cue) == 1  # the cue names exactly one junction object
        for p in env.distractors:  # distractors never carry a junction object's name
            assert (env.grid.get(*p).type, env.grid.get(*p).color) not in names
        cue = env.grid.get(*env.cue_pos)
        assert (cue.type, cue.color) == env.cue and env.cue_pos[0] <= 3
    assert sizes == set(MEMORY_SIZES) and len(arms) >= 6 and len(cues) >= 15 and counts == {0, 1, 2, 3}
    assert len(starts) >= 20
    assert 0.4 <= north / n <= 0.6


@pytest.mark.parametrize("level", VARIED)
def test_the_cue_is_the_one_object_of_the_first_observation_and_unseen_until_the_junction(level):
    """The first observation names the cue and nothing else; after it, the cue's name is in view only while the
    agent is still in the start room or when the matching junction object is in view."""
    for i in range(30):
        env = BabyAITextEnv(level)
        obs, _ = env.reset(seed=eval_seed(i))
        u = env._env.unwrapped
        name = f"{u.cue[1]} {u.cue[0]}"
        objects = [p for p in obs.split("; ")[2:] if not p.startswith("wall")]
        assert len(objects) == 1 and objects[0].startswith(name + " "), obs
        match = u.objects_at[0] if u.success_pos[1] < u.hallway_row else u.objects_at[1]
        done = False
        while not done:
            obs, reward, term, trunc, _ = env.step(ACTIONS.index(env.expert_action()))
            done = term or trunc
            if name in obs:
                assert u.agent_pos[0] <= 3 or u.agent_sees(*match), (i, obs)
        assert reward > 0


@pytest.mark.parametrize("level", VARIED)
def test_memory_steps_come_after_the_cue_at_the_junction_and_the_expert_recovers_from_noise(level):
    for seed in range(20):
        ep = collect_episode(level, seed, noise=0.0, rng=random.Random(seed))
        assert ep["success"] and ep["cue_step"] == 0 and ep["memory_steps"], seed
        env = BabyAITextEnv(level)
        env.reset(seed=seed)
        for step, action in enumerate(ep["taken"]):
            if step in ep["memory_steps"]:
                assert env._env.unwrapped.agent_pos[0] >= 5, seed  # past the start room, toward the junction
            env.step(ACTIONS.index(action))
        noisy = collect_episode(level, seed, noise=0.3, rng=random.Random(seed))
        assert noisy["labels"] and len(noisy["labels"]) <= 96


def test_the_typed_junction_is_a_key_north_and_a_ball_south_and_the_cue_picks_one_by_type():
    """MemoryVariedTyped: the junction always shows one colour's key (north) and ball (south), so it says nothing
    about the cue; the cue is one of them (balanced), its colour varies, and distractors include keys and balls of
    other colours but never a junction object's name."""
    env = gym.make("thrifty/MemoryVariedTyped-v0").unwrapped
    north, colours, distractor_types, n = 0, set(), set(), 200
    for i in range(n):
        env.reset(seed=eval_seed(i))
        names = [(o.type, o.color) for o in (env.grid.get(*p) for p in env.objects_at)]
        assert names[0][0] == "key" and names[1][0] == "ball" and names[0][1] == names[1][1]
        assert env.cue in names and (env.success_pos[1] < env.hallway_row) == (env.cue[0] == "key")
        for p in env.distractors:
            obj = env.grid.get(*p)
            assert (obj.type, obj.color) not in names
            distractor_types.add(obj.type)
        north += env.cue[0] == "key"
        colours.add(env.cue[1])
    assert 0.4 <= north / n <= 0.6 and len(colours) == 6 and {"key", "ball"} <= distractor_types


def test_an_unknown_junction_kind_is_refused():
    with pytest.raises(ValueError, match="match, typed"):
        MemoryVariedEnv(junction="fixed")


def test_seeds_reproduce():
    a, b = BabyAITextEnv("MemoryVaried"), BabyAITextEnv("MemoryVaried")
    assert a.reset(seed=eval_seed(7))[0] == b.reset(seed=eval_seed(7))[0] and a.episode_key == b.episode_key
    a.reset(seed=eval_seed(8))
    assert a.episode_key != b.episode_key


@pytest.mark.parametrize("sizes", [(12,), (7,), (15, 13), (), (True,)])
def test_an_unknown_memory_size_is_refused_naming_the_sizes(sizes):
    with pytest.raises(UnknownMemorySizeError, match="9, 11, 13, 17"):
        MemoryVariedEnv(sizes=sizes)
    with pytest.raises(UnknownMemorySizeError):
        gym.make("thrifty/MemoryVaried-v0", sizes=sizes)


def test_one_size_only_draws_that_size():
    env = MemoryVariedEnv(sizes=(9,))
    for i in range(5):
        env.reset(seed=i)
        assert env.size == 9 and env.width == 9 and env.junction == (7, 4)


@pytest.mark.parametrize("module", ["thrifty.envs.memory_varied", "thrifty.envs.seeds"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(module), raise_on_error=True).failed == 0
