"""Meta-World ground: the environment, its seeds, the expert, demonstrations and the policy episode loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.agents.policy import ExpertPolicy, PolicyStep, run_policy_episode, sanitize_action
from thrifty.cost import CostRecord
from thrifty.envs.metaworld import (EVAL_SEED_BASE, InvalidActionError, MetaWorldEnv, UnknownTaskError,
                                    eval_seed, layout_vector, resolve_tasks, scripted_expert, train_seed)
from thrifty.train.demos import CollectSettings, DemoDirError, DemoSet, collect, map_shard, write_shard


def _rollout(task: str, seed: int, steps: int = 30) -> np.ndarray:
    env, expert = MetaWorldEnv(task, max_steps=steps), scripted_expert(task)
    obs, _ = env.reset(seed=seed)
    states = [obs["state"]]
    for _ in range(steps):
        obs, _, term, trunc, _ = env.step(expert(obs["state"]))
        states.append(obs["state"])
        if term or trunc:
            break
    return np.stack(states)


def test_same_seed_same_episode_and_other_seed_other_layout():
    a, b = _rollout("reach-v3", eval_seed(3)), _rollout("reach-v3", eval_seed(3))
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], _rollout("reach-v3", eval_seed(4), steps=1)[0])


@pytest.mark.parametrize("task", ["reach-v3", "drawer-close-v3"])
def test_train_and_eval_layouts_never_overlap(task):
    train = {tuple(layout_vector(task, train_seed(i))) for i in range(100)}  # two MT1 blocks
    evals = {tuple(layout_vector(task, eval_seed(i))) for i in range(50)}
    assert len(train) == 100 and len(evals) == 50
    assert not train & evals
    assert eval_seed(0) == EVAL_SEED_BASE and train_seed(EVAL_SEED_BASE - 1) < eval_seed(0)


def test_expert_solves_and_episode_ends_at_success():
    env, expert = MetaWorldEnv("reach-v3"), scripted_expert("reach-v3")
    obs, _ = env.reset(seed=eval_seed(0))
    for _ in range(200):
        obs, _, term, trunc, info = env.step(expert(obs["state"]))
        if term or trunc:
            break
    assert term and info["success"] and not trunc
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(np.zeros(4))


def test_step_cap_truncates_and_stepping_past_it_is_refused():
    env = MetaWorldEnv("push-v3", max_steps=3)
    env.reset(seed=eval_seed(0))
    out = [env.step(np.zeros(4, np.float32)) for _ in range(3)]
    assert [o[3] for o in out] == [False, False, True]
    with pytest.raises(RuntimeError, match="3-step cap"):
        env.step(np.zeros(4))


def test_bad_inputs_have_clear_errors():
    with pytest.raises(UnknownTaskError, match="unknown Meta-World task 'opne-door'"):
        MetaWorldEnv("opne-door")
    with pytest.raises(UnknownTaskError, match="task sets: MT10, MT50"):
        resolve_tasks("MT11")
    assert resolve_tasks("MT10")[:2] == ("reach-v3", "push-v3") and len(resolve_tasks("MT50")) == 50
    assert resolve_tasks("reach, reach-v3 drawer-open") == ("reach-v3", "drawer-open-v3")
    with pytest.raises(ValueError, match="max_steps"):
        MetaWorldEnv("reach-v3", max_steps=501)
    with pytest.raises(ValueError, match="unknown camera"):
        MetaWorldEnv("reach-v3", camera="nope")
    env = MetaWorldEnv("reach-v3")
    with pytest.raises(ValueError, match="needs a seed"):
        env.reset()
    env.reset(seed=eval_seed(0))
    with pytest.raises(InvalidActionError, match="got shape \\(3,\\)"):
        env.step(np.zeros(3))
    with pytest.raises(InvalidActionError, match="NaN"):
        env.step(np.array([0, np.nan, 0, 0]))


@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32)), min_size=0, max_size=7))
def test_sanitize_action_always_gives_a_valid_action(xs):
    a, changed = sanitize_action(xs)
    assert a.shape == (4,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1.0)
    valid = len(xs) == 4 and all(np.isfinite(x) and abs(x) <= 1 for x in xs)
    assert changed == (not valid)
    if valid:
        assert np.array_equal(a, np.asarray(xs, np.float32))


class _BrokenPolicy:
    name = "broken"

    def reset(self, task, instruction):
        self.n = 0

    def act(self, observation):
        self.n += 1
        return PolicyStep(np.array([np.nan, 5.0, 0.0, 0.0]) if self.n % 2 else np.zeros(2), CostRecord(flops=10))


def test_policy_episode_counts_invalid_actions_instead_of_crashing():
    r = run_policy_episode(_BrokenPolicy(), "reach-v3", eval_seed(0), max_steps=6)
    assert r["steps"] == 6 and r["invalid_actions"] == 6 and r["flops_total"] == 60 and not r["success"]


def test_expert_policy_episode_is_deterministic():
    a = run_policy_episode(ExpertPolicy(), "reach-v3", eval_seed(1), max_steps=100)
    b = run_policy_episode(ExpertPolicy(), "reach-v3", eval_seed(1), max_steps=100)
    assert a["success"] and a["actions_sha"] == b["actions_sha"] and a["steps"] == b["steps"]


# ---------------------------------------------------------------------- demonstrations
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.booleans(), st.integers(0, 2**31 - 1))
def test_shard_round_trips(tmp_path_factory, t, with_frames, seed):
    rng = np.random.default_rng(seed)
    arrays = {"state": rng.normal(size=(t, 39)).astype(np.float32),
              "action": rng.uniform(-1, 1, (t, 4)).astype(np.float32),
              "success": rng.integers(0, 2, t).astype(np.uint8), "episode": rng.integers(0, 10**9, t).astype(np.int32),
              "task_id": rng.integers(0, 50, t).astype(np.int16)}
    if with_frames:
        arrays["frame"] = rng.integers(0, 256, (t, 8, 8, 3)).astype(np.uint8)
    path = tmp_path_factory.mktemp("shard") / "s.safetensors"
    write_shard(path, arrays)
    back = map_shard(path)
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and np.array_equal(np.asarray(back[k]), v)


def _settings(**kw):
    base = dict(tasks=("reach-v3",), episodes=3, noise=0.3, max_steps=15, episodes_per_shard=2)
    return CollectSettings(**(base | kw))


def test_collect_is_deterministic_and_resumes_without_duplicates(tmp_path):
    full = collect(tmp_path / "a", _settings())
    # an interrupted run: the first shard finished, the second was never written
    part = tmp_path / "b"
    collect(part, _settings(episodes=2))
    manifest = json.loads((part / "manifest.json").read_text())
    manifest["settings"]["episodes"] = 3  # what the interrupted run of the 3-episode collection had recorded
    (part / "manifest.json").write_text(json.dumps(manifest))
    resumed = collect(part, _settings())
    assert [s["seeds"] for s in resumed.shards] == [s["seeds"] for s in full.shards] == [[0, 1], [2]]
    a, b = DemoSet(tmp_path / "a").arrays(), DemoSet(part).arrays()
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert len(np.unique(a["episode"])) == 3
    assert not np.array_equal(a["action"], a["taken"])  # noise executed random actions, labels stayed the expert's


def test_collect_refuses_a_directory_of_another_task_set(tmp_path):
    collect(tmp_path, _settings(episodes=1))
    with pytest.raises(DemoDirError, match="other settings .*tasks"):
        collect(tmp_path, _settings(episodes=1, tasks=("push-v3",)))
    with pytest.raises(DemoDirError, match="no demonstrations of \\['push-v3'\\]"):
        DemoSet(tmp_path).arrays(tasks=("push-v3",))
    with pytest.raises(DemoDirError, match="no demonstrations at"):
        DemoSet(tmp_path / "missing")


def test_frames_are_rendered_upright_at_the_asked_size():
    env = MetaWorldEnv("reach-v3", render=True, size=32, max_steps=5)
    obs, _ = env.reset(seed=eval_seed(0))
    frame = obs["frame"]
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8 and frame.std() > 1.0
    assert env.observation_space["frame"].contains(frame)
    env.close()
    with pytest.raises(RuntimeError, match="render=False"):
        MetaWorldEnv("reach-v3").render()
