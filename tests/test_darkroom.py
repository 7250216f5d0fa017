"""The Darkroom family (thrifty.envs.darkroom): variants, the seeded task split, trials of same-task episodes,
rewards, the vectorised step against one env at a time, and a differential test against toymeta's Dark Room."""

import doctest

import numpy as np
import pytest

from thrifty.envs import darkroom
from thrifty.envs.darkroom import (MOVES, VARIANTS, DarkroomVectorEnv, UnknownDarkroomVariantError, greedy_action,
                                   optimal_return, task_split)


def test_variants_are_the_papers_settings():
    v = VARIANTS
    assert (v["darkroom"].size, v["darkroom"].horizon, v["darkroom"].start) == (10, 100, "corner")
    assert (v["darkroom-ad"].size, v["darkroom-ad"].horizon, v["darkroom-ad"].start) == (9, 20, "centre")
    assert v["darkroom-hard"].reward == "first_visit"
    assert (v["key-to-door"].size, v["key-to-door"].horizon, v["key-to-door"].reward) == (9, 50, "key_door")
    assert v["key-to-door"].n_tasks == 81 * 80


def test_unknown_variant_lists_the_variants():
    with pytest.raises(UnknownDarkroomVariantError, match="darkroom-ad.*key-to-door"):
        DarkroomVectorEnv("darkroom-huge")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_task_split_is_seeded_disjoint_and_80_20(variant):
    train, held = task_split(variant, seed=0)
    n = VARIANTS[variant].n_tasks
    assert len(train) == round(0.8 * n) and len(train) + len(held) == n
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(range(n))
    again, _ = task_split(variant, seed=0)
    other, _ = task_split(variant, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_darkroom_split_has_80_train_and_20_heldout_goals_and_reset_draws_from_it():
    train, held = task_split("darkroom")
    assert (len(train), len(held)) == (80, 20)
    envs = DarkroomVectorEnv("darkroom", num_envs=64, split="heldout")
    _, info = envs.reset(seed=3)
    assert set(info["task"]) <= set(held)


def test_key_to_door_tasks_are_distinct_key_door_pairs():
    spec = VARIANTS["key-to-door"]
    key, door = spec.task_cells(np.arange(spec.n_tasks))
    assert not np.any(np.all(key == door, axis=1))
    pairs = {(tuple(k), tuple(d)) for k, d in zip(key, door)}
    assert len(pairs) == spec.n_tasks




@pytest.mark.parametrize("variant", ["darkroom", "darkroom-ad", "darkroom-hard"])
def test_trials_keep_the_goal_and_the_greedy_expert_scores_the_optimal_return(variant):
    spec = VARIANTS[variant]
    envs = DarkroomVectorEnv(variant, num_envs=4)
    tasks = np.array([0, spec.n_tasks - 1, 13, spec.size + 1])
    obs, info = envs.reset(seed=0, options={"tasks": tasks})
    start = obs.copy()
    goal, _ = spec.task_cells(tasks)
    returns = np.zeros((3, 4))
    for t in range(3 * spec.horizon):
        obs, r, term, trunc, info = envs.step(greedy_action(obs, goal))
        returns[t // spec.horizon] += r
        assert not term.any() and np.array_equal(info["task"], tasks)
        if (t + 1) % spec.horizon == 0:
            assert trunc.all() and np.array_equal(obs, start) and "final_obs" in info
            assert np.array_equal(info["final_obs"], goal)  # the expert ended on the goal
            assert np.all(info["episode_index"] == (t + 1) // spec.horizon) and np.all(info["step"] == 0)
        else:
            assert not trunc.any() and "final_obs" not in info
    want = [optimal_return(variant, int(k)) for k in tasks]
    assert np.array_equal(returns, np.tile(want, (3, 1)))
    assert optimal_return("darkroom", 0) == 100.0  # goal on the start cell: reward from the first step on


def test_first_visit_rewards_once_and_key_to_door_needs_the_key_first():
    hard = DarkroomVectorEnv("darkroom-hard", num_envs=1)
    hard.reset(options={"tasks": [8 * 17 + 9]})  # goal (8, 9), one step +y from the centre
    rewards = [hard.step([a])[1][0] for a in (2, 4, 3, 2, 4)]
    assert rewards == [1, 0, 0, 0, 0]  # staying on, leaving and re-entering the goal scores nothing more

    kd = DarkroomVectorEnv("key-to-door", num_envs=1)
    spec = VARIANTS["key-to-door"]
    kd.reset(seed=0)
    task = int(kd.tasks[0])
    key, door = (c[0] for c in spec.task_cells(np.array([task])))
    kd.pos[0] = door  # on the door without the key: nothing
    r_door_first = kd.step([4])[1][0]
    total, pos = 0.0, kd.pos.copy()
    for target in (key, door, key, door):
        while not np.array_equal(pos[0], target):
            pos, r, *_ = kd.step(greedy_action(pos, target[None]))
            total += r[0]
    assert r_door_first == 0 and total == 2.0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_vectorised_step_equals_one_env_at_a_time(variant):
    rng = np.random.default_rng(0)
    spec = VARIANTS[variant]
    n, steps = 5, 2 * spec.horizon + 7
    tasks = rng.integers(0, spec.n_tasks, size=n)
    actions = rng.integers(0, 5, size=(steps, n))
    vec = DarkroomVectorEnv(variant, num_envs=n)
    obs, _ = vec.reset(seed=1, options={"tasks": tasks})
    singles = [DarkroomVectorEnv(variant, num_envs=1) for _ in range(n)]
    for i, e in enumerate(singles):
        e.reset(options={"tasks": tasks[i:i + 1]})
        e.pos[:] = obs[i]  # same start (key-to-door draws it)
    for t in range(steps):
        o, r, _, tr, info = vec.step(actions[t])
        for i, e in enumerate(singles):
            oi, ri, _, tri, infoi = e.step(actions[t, i:i + 1])
            assert ri[0] == r[i] and tri[0] == tr[i]
            if tr[i]:
                assert np.array_equal(infoi["final_obs"][0], info["final_obs"][i])
                e.pos[:] = o[i]
            assert np.array_equal(e.pos[0], o[i])


def test_bad_actions_and_tasks_are_refused():
    envs = DarkroomVectorEnv("darkroom", num_envs=2)
    with pytest.raises(ValueError, match="2 task indices"):
        envs.reset(options={"tasks": [1, 2, 3]})
    with pytest.raises(ValueError, match="task indices must lie"):
        envs.reset(options={"tasks": [1, 100]})
    envs.reset()
    with pytest.raises(ValueError, match=r"integers in \[0, 5\)"):
        envs.step(np.array([0, 5]))


def test_docstring_example_runs():
    assert doctest.testmod(darkroom, raise_on_error=True).failed == 0


# ---------------------------------------------------------------------------------------- toymeta (differential)
# toymeta (corl-team/toy-meta-gym, PyPI 0.0.1) implements AD's Dark Room family. Its actions are noop, (-1,0),
# (0,1), (1,0), (0,-1); ours are +x, -x, +y, -y, stay; its observation is the cell index x * size + y.
_TO_TOYMETA = np.array([3, 1, 2, 4, 0])


@pytest.mark.parametrize("variant,toymeta_id", [("darkroom-ad", "Dark-Room-9x9-v0"),
                                                 ("darkroom-hard", "Dark-Room-Hard-17x17-v0")])
def test_dark_room_matches_toymeta_step_by_step(variant, toymeta_id):
    gym = pytest.importorskip("gymnasium")
    pytest.importorskip("toymeta")
    spec = VARIANTS[variant]
    rng = np.random.default_rng(0)
    for task in rng.choice(spec.n_tasks, size=6, replace=False):
        goal, _ = spec.task_cells(np.array([task]))
        theirs = gym.make(toymeta_id, goal=goal[0])
        ours = DarkroomVectorEnv(variant, num_envs=1)
        s, _ = theirs.reset(seed=0)
        o, _ = ours.reset(options={"tasks": [task]})
        assert s == o[0, 0] * spec.size + o[0, 1]
        # Their Hard variant ends on the goal; before that (and all along for Dark Room) the two must agree.
        for a in rng.integers(0, 5, size=spec.horizon):
            s, r_t, term, trunc, _ = theirs.step(int(_TO_TOYMETA[a]))
            o, r_o, _, tr_o, info = ours.step([a])
            last = info["final_obs"][0] if tr_o[0] else o[0]
            assert s == last[0] * spec.size + last[1] and r_t == r_o[0] and trunc == tr_o[0]
            if term:
                assert variant == "darkroom-hard" and r_o[0] == 1
                break


def test_key_to_door_matches_toymeta_until_the_door():
    pytest.importorskip("toymeta")
    from toymeta.dark_key_door import DarkKeyToDoor  # its registered id points at a module that does not exist

    spec = VARIANTS["key-to-door"]
    rng = np.random.default_rng(1)
    for task in rng.choice(spec.n_tasks, size=6, replace=False):
        key, door = (c[0] for c in spec.task_cells(np.array([task])))
        ours = DarkroomVectorEnv("key-to-door", num_envs=1)
        o, _ = ours.reset(seed=int(task), options={"tasks": [task]})
        theirs = DarkKeyToDoor(size=9, goal=(door, key), random_start=False)
        theirs.reset(seed=0)
        theirs.agent_pos = o[0].astype(np.float32)  # our random start
        path = []
        pos = o.copy()
        for target in (key, door):  # walk to the key then the door, with random detours
            while not np.array_equal(pos[0], target):
                a = greedy_action(pos, target[None])[0] if rng.random() < 0.7 else rng.integers(0, 5)
                path.append(a)
                s, r_t, term, *_ = theirs.step(int(_TO_TOYMETA[a]))
                pos, r_o, _, tr, _ = ours.step([a])
                assert r_t == r_o[0] and s == pos[0, 0] * 9 + pos[0, 1]
                if term or tr[0]:
                    break
            if term or tr[0]:
                break
        assert len(path) > 0
