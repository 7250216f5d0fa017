import random
import warnings

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from thrifty.agents.coop import CoopConfig, run_coop_episode
from thrifty.agents.coop_expert import expert_decide
from thrifty.envs.coop_grid import (ACTIONS, CoopGridEnv, CoopGridError, Subgoal, low_level_action, mission_text,
                                    parse_mission, subgoal_done)


def test_pettingzoo_parallel_api():
    env = CoopGridEnv(n_robots=3, rows=2, cols=2, max_steps=150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_api_test(env, num_cycles=200)


def _random_rollout(seed, n=60):
    env = CoopGridEnv(n_robots=4)
    obs, _ = env.reset(seed=seed)
    rng = random.Random(seed)
    trace = [obs]
    for _ in range(n):
        if not env.agents:
            break
        obs, rew, term, trunc, infos = env.step({a: rng.randrange(len(ACTIONS)) for a in env.agents})
        trace.append((obs, rew, infos))
    return env.mission, trace


def test_same_seed_same_episode():
    assert _random_rollout(7) == _random_rollout(7)
    assert _random_rollout(7)[1][0] != _random_rollout(8)[1][0]
    a = run_coop_episode(expert_decide, 4, seed=11)
    b = run_coop_episode(expert_decide, 4, seed=11)
    assert a == b


def test_reset_without_seed_continues_the_rng():
    env = CoopGridEnv(n_robots=2)
    first, _ = env.reset(seed=5)
    second, _ = env.reset()
    assert first != second


@pytest.mark.parametrize("k", [1, 9, 0, 2.5, True])
def test_robot_count_outside_2_to_8_is_refused(k):
    with pytest.raises(CoopGridError, match="n_robots must be an integer in 2..8"):
        CoopGridEnv(n_robots=k)
    with pytest.raises(CoopGridError, match="n_robots"):
        run_coop_episode(expert_decide, k, seed=0)


def test_unknown_target_object_is_refused():
    assert parse_mission(mission_text(["red ball", "blue key", "green box"])) == ["red ball", "blue key",
                                                                                 "green box"]
    with pytest.raises(CoopGridError, match="unknown target object.*'pink ball'"):
        parse_mission("find the pink ball and the red key")
    with pytest.raises(CoopGridError, match="goto needs an object name"):
        Subgoal("goto", "red dragon")
    with pytest.raises(CoopGridError, match="sub-goal kind"):
        Subgoal("fly", 3)


def test_bad_action_and_finished_episode_are_refused():
    env = CoopGridEnv(n_robots=2)
    env.reset(seed=0)
    with pytest.raises(CoopGridError, match="action must be an index"):
        env.step({"robot_0": 9})
    with pytest.raises(CoopGridError, match="unknown or finished agent"):
        env.step({"robot_7": 0})


def test_text_view_and_team_map_agree():
    env = CoopGridEnv(n_robots=8)
    obs, infos = env.reset(seed=3)
    for a in env.agents:
        text = obs[a]
        assert text.startswith(f"room {infos[a]['room']}; facing {infos[a]['heading']}; carrying nothing")
        for name in infos[a]["seen"]:  # every object the robot sees is named in its line, and is on the team map
            assert f"{name} " in text
            assert env.seen[next(o.pos for o in env.objects if o.name == name)]
        assert env.seen[env.pos[a]]


def test_controller_uses_only_the_team_map():
    env = CoopGridEnv(n_robots=2)
    env.reset(seed=1)
    hidden = [o for o in env.objects if not env.seen[o.pos]]
    assert hidden, "seed 1 should hide some object at the start"
    assert low_level_action(env, "robot_0", Subgoal("goto", hidden[0].name)) == 0  # unseen: nowhere to go
    assert low_level_action(env, "robot_0", Subgoal("wait")) == 0


def test_controller_explores_a_room_and_reaches_an_object():
    env = CoopGridEnv(n_robots=2)
    env.reset(seed=2)
    for room in (8, 5, 2):
        goal = Subgoal("explore", room)
        for _ in range(80):
            if subgoal_done(env, "robot_0", goal):
                break
            env.step({"robot_0": low_level_action(env, "robot_0", goal), "robot_1": 0})
        assert room in env.explored
    assert all(env.seen[c] for c in env.room_cells(2) + env.room_cells(5) + env.room_cells(8))
    name = next(iter(env.known_objects()))
    goal = Subgoal("goto", name)
    for _ in range(80):
        if subgoal_done(env, "robot_0", goal) or not env.agents:
            break
        env.step({"robot_0": low_level_action(env, "robot_0", goal), "robot_1": 0})
    assert env.facing_object("robot_0") == name


@pytest.mark.parametrize("k", [2, 4, 8])
def test_expert_team_succeeds(k):
    results = [run_coop_episode(expert_decide, k, seed=s) for s in range(20)]
    assert np.mean([r["success"] for r in results]) >= 0.9
    assert all(r["malformed"] == 0 and r["conflicts"] == 0 for r in results)


def test_garbage_planner_is_counted_not_fatal():
    result = run_coop_episode(lambda ctx, a: "¯\\_(ツ)_/¯ goto moon", 2, seed=0, config=CoopConfig(max_rounds=3))
    assert result["malformed"] == result["calls"] == 6
    assert not result["success"]
    assert "the action must be" in result["malformed_errors"][0]


def test_costs_returned_by_the_planner_are_kept():
    result = run_coop_episode(lambda ctx, a: (expert_decide(ctx, a), {"flops": 1}), 2, seed=0)
    assert result["costs"] == [{"flops": 1}] * result["calls"]
