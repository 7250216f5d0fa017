import numpy as np
import pytest

from thrifty.envs import ACTIONS, EVAL_SEED_BASE, LEVELS, BabyAITextEnv, UnknownLevelError, eval_seed, train_seed
from thrifty.envs.babyai_text import render_observation


def _expert_rollout(level, seed):
    env = BabyAITextEnv(level)
    obs, info = env.reset(seed=seed)
    texts, done, reward = [obs], False, 0.0
    while not done:
        obs, reward, term, trunc, _ = env.step(ACTIONS.index(env.expert_action()))
        texts.append(obs)
        done = term or trunc
    return info["mission"], texts, reward


@pytest.mark.parametrize("level", list(LEVELS))
def test_expert_solves_and_seeds_reproduce(level):
    a = _expert_rollout(level, eval_seed(3))
    b = _expert_rollout(level, eval_seed(3))
    assert a == b
    assert a[2] > 0, "BabyAIBot should solve its own level"
    assert all(t.startswith("facing ") for t in a[1])


def test_train_and_eval_seeds_are_disjoint():
    assert train_seed(EVAL_SEED_BASE - 1) < eval_seed(0)
    with pytest.raises(ValueError):
        train_seed(EVAL_SEED_BASE)
    with pytest.raises(ValueError):
        eval_seed(-1)


def test_unknown_level_names_the_levels():
    with pytest.raises(UnknownLevelError, match="GoToLocal"):
        BabyAITextEnv("GoToTheMoon")


def test_bad_action_is_refused():
    env = BabyAITextEnv("GoToLocal")
    env.reset(seed=eval_seed(0))
    with pytest.raises(ValueError, match="action must be an index"):
        env.step(7)


def test_rendering_of_a_hand_made_view():
    # 7x7 view, all empty floor; a red ball 2 ahead 1 left, a wall straight ahead at 4, carrying a blue key
    img = np.zeros((7, 7, 3), dtype=np.uint8)
    img[:, :, 0] = 1                      # empty
    img[2, 4] = (6, 0, 0)                 # ball, red
    img[3, 2] = (2, 5, 0)                 # wall 4 ahead
    img[3, 6] = (5, 2, 0)                 # the agent's cell shows what it carries: blue key
    img[6, 6] = (4, 4, 2)                 # locked yellow door 3 right
    text = render_observation(img, 1)
    # objects nearest first (both at 3 cells here; ties: the nearer ahead first)
    assert text == ("facing south; carrying blue key; locked yellow door 3 right; red ball 2 ahead 1 left; "
                    "wall 4 ahead")
