"""BabyAI grid tasks (the action models' second domain): observations, the bot, action checks, collection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from thrifty.agents.policy import ExpertPolicy, run_policy_episode
from thrifty.envs.babyai_grid import N_ACTIONS, STATE_DIM, BabyAIGridEnv
from thrifty.envs.seeds import eval_seed
from thrifty.train.demos import CollectSettings, DemoSet, collect


def test_observations_are_scaled_views_and_the_bot_solves_the_level():
    env = BabyAIGridEnv("babyai-UnlockLocal")
    obs, info = env.reset(seed=eval_seed(0))
    assert obs["state"].shape == (STATE_DIM,) and 0.0 <= obs["state"].min() and obs["state"].max() <= 1.0
    assert obs["state"][-4:].sum() == 1.0 and info["mission"] == "open the door"
    results = [run_policy_episode(ExpertPolicy(), "babyai-UnlockLocal", eval_seed(i)) for i in range(5)]
    assert all(r["success"] for r in results)
    assert len({r["episode_key"] for r in results}) == 5


def test_a_level_whose_mission_varies_is_refused():
    with pytest.raises(ValueError, match="mission varies"):  # found when the env is built, before any collection
        BabyAIGridEnv("babyai-GoToLocal")
    with pytest.raises(ValueError, match="babyai-<Level>"):
        BabyAIGridEnv("UnlockLocal")


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 20),
                 st.lists(st.floats(-5, 12), max_size=3)))
def test_any_requested_action_is_made_a_valid_index(request):
    action, changed = BabyAIGridEnv.sanitize_action(request)
    assert action.shape == (1,) and float(action[0]).is_integer() and 0 <= action[0] < N_ACTIONS
    if isinstance(request, int) and 0 <= request < N_ACTIONS:
        assert not changed and action[0] == request


def test_collection_is_deterministic(tmp_path):
    settings = CollectSettings(tasks=("babyai-GoToRedBallGrey",), episodes=6, noise=0.5, domain="babyai",
                               episodes_per_shard=4)
    a, b = [DemoSet(collect(tmp_path / name, settings) and tmp_path / name).arrays() for name in ("a", "b")]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["state"].shape[1] == STATE_DIM and a["action"].shape[1] == 1
    assert not np.array_equal(a["action"], a["taken"])  # the noise executed other actions; labels stay the bot's
    with pytest.raises(ValueError, match="babyai-<Level>"):
        CollectSettings(tasks=("reach-v3",), episodes=1, domain="babyai")


def test_demonstrations_of_another_domain_or_too_few_episodes_are_refused(tmp_path):
    from thrifty.train.action_model import ActionModelRecipe, train_action_model
    from thrifty.train.demos import DemoDirError
    from thrifty.train.policy import BCRecipe, train_policy

    grid = tmp_path / "grid"
    collect(grid, CollectSettings(tasks=("babyai-GoToRedBallGrey",), episodes=3, domain="babyai"))
    with pytest.raises(DemoDirError, match="holds babyai demonstrations"):
        train_policy(BCRecipe(steps=1), grid, tmp_path / "bc", tmp_path / "bc_run", progress=False)
    with pytest.raises(ValueError, match="no more episodes than the 5 held out"):
        train_action_model(ActionModelRecipe(steps=1), grid, tmp_path / "am", tmp_path / "am_run", progress=False)
