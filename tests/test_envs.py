import numpy as np
import pytest

from thrifty.envs import ACTIONS, EVAL_SEED_BASE, LEVELS, BabyAITextEnv, UnknownLevelError, eval_seed, train_seed
from thrifty.envs.babyai_text import level_id, render_observation


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


def test_memory_expert_solves_the_level_after_seeing_the_cue():
    """MemoryS13: the expert walks west until the cue is in view, then to the matching object; the cue's type is in
    the text of an earlier observation than the final approach, and the step cap replaces minigrid's 845."""
    import random

    from thrifty.envs.babyai_text import LEVEL_MAX_STEPS
    from thrifty.train.planner import collect_episode

    assert level_id("MemoryS13") == "MiniGrid-MemoryS13-v0"
    assert BabyAITextEnv("MemoryS13").max_steps == LEVEL_MAX_STEPS["MemoryS13"]
    for seed in range(12):
        ep = collect_episode("MemoryS13", seed, noise=0.2 if seed % 2 else 0.0, rng=random.Random(seed))
        assert ep["success"], seed
        env = BabyAITextEnv("MemoryS13")  # replay: the step at which the expert first saw the cue
        env.reset(seed=seed)
        inner = env._env.unwrapped
        cue = inner.grid.get(1, inner.height // 2 - 1).type
        seen_at = None
        for step, action in enumerate(ep["taken"]):
            env.expert_action()
            if seen_at is None and env._bot.cue_seen:
                seen_at = step
            env.step(ACTIONS.index(action))
        assert seen_at is not None and f"green {cue}" in ep["observations"][seen_at], seed
        assert seen_at < len(ep["taken"]) - 2, seed  # seen before the final approach to the junction


def test_memory_recall_level_puts_the_cue_in_the_first_observation_and_fixes_the_turn():
    """MemoryRecallS13: MemoryS13's walls and cue for a seed, but the agent starts beside the cue and the key is
    always north, the ball south of the junction; so the cue is named in observation 0 (cue_step 0) and the expert's
    turn at the junction is left for a key cue, right for a ball cue; the expert solves it."""
    import random

    from thrifty.train.planner import collect_episode

    turns = set()
    for seed in range(10):
        recall, base = BabyAITextEnv("MemoryRecallS13"), BabyAITextEnv("MemoryS13")
        recall.reset(seed=seed)
        base.reset(seed=seed)
        a, b = recall._env.unwrapped, base._env.unwrapped
        x, h = a.success_pos[0], a.height
        walls = lambda env: [c is not None and c.type == "wall" for c in env.grid.grid]  # noqa: E731
        assert walls(a) == walls(b) and a.grid.get(1, h // 2 - 1).type == b.grid.get(1, h // 2 - 1).type
        assert a.grid.get(x, h // 2 - 2).type == "key" and a.grid.get(x, h // 2 + 2).type == "ball"
        assert tuple(a.agent_pos) == (1, h // 2) and a.agent_dir == 0
        ep = collect_episode("MemoryRecallS13", seed, noise=0.2 if seed % 2 else 0.0, rng=random.Random(seed))
        assert ep["success"], seed
        cue = a.grid.get(1, h // 2 - 1).type
        assert ep["observations"][0].startswith(f"facing east; carrying nothing; green {cue} 1 left"), seed
        assert ep["cue_step"] == 0
        if seed % 2 == 0:  # the expert alone: straight down the hallway, then the cue's turn
            turn = ep["labels"][ep["memory_steps"][0]]
            assert turn == ("left" if cue == "key" else "right"), (seed, cue, turn)
            turns.add(turn)
            for obs in ep["observations"][1:ep["memory_steps"][0]]:  # never the cue alone again
                assert obs.count("green ") != 1, (seed, obs)
    assert turns == {"left", "right"}


def test_unknown_level_lists_the_memory_level_too():
    with pytest.raises(UnknownLevelError, match="MemoryS13"):
        level_id("MemoryS99")


def test_memory_steps_are_exactly_where_the_cue_decides_the_action():
    """`expert_needs_memory` marks the steps whose expert action differs between 'the cue is the key' and 'the cue
    is the ball' (the turn at the junction and the step after it); never before the cue is seen, never on a BabyAI
    level."""
    import random

    from thrifty.train.planner import collect_episode

    for seed in range(6):
        ep = collect_episode("MemoryS13", seed, noise=0.0, rng=random.Random(seed))
        steps = ep["memory_steps"]
        assert steps and steps == list(range(steps[0], steps[-1] + 1)), (seed, steps)
        assert ep["labels"][steps[0]] in ("left", "right"), (seed, ep["labels"])  # the turn into a branch
        assert steps[-1] >= len(ep["labels"]) - 2  # at the end of the hallway, not on the way there
        env = BabyAITextEnv("MemoryS13")
        env.reset(seed=seed)
        for step, action in enumerate(ep["taken"]):
            if not env._bot.cue_seen:
                assert not env.expert_needs_memory()
            env.step(ACTIONS.index(action))
    ep = collect_episode("GoToLocal", 0, noise=0.0, rng=random.Random(0))
    assert ep["memory_steps"] == []


EXTRA_LEVELS = ("GoToObj", "Pickup", "GoToRedBallGrey", "OpenDoor", "UnlockLocal", "PutNextS4N1", "GoToObjS6")


@pytest.mark.parametrize("level", EXTRA_LEVELS)
def test_any_registered_babyai_level_renders_and_the_bot_solves_it(level):
    for i in range(3):
        mission, texts, reward = _expert_rollout(level, eval_seed(i))
        assert reward > 0, (level, i)
        assert mission and all(t.startswith("facing ") and "; carrying " in t for t in texts)
    assert _expert_rollout(level, eval_seed(0)) == _expert_rollout(level, eval_seed(0))


def test_short_names_and_full_ids_are_the_same_level():
    from thrifty.envs.babyai_levels import registered_babyai

    assert level_id("GoToObj") == level_id("BabyAI-GoToObj-v0") == "BabyAI-GoToObj-v0"
    assert level_id("GoToObjS6") == "BabyAI-GoToObjS6-v1"  # only v1 is registered: the highest version
    assert _expert_rollout("GoToRedBallGrey", eval_seed(1)) == _expert_rollout("BabyAI-GoToRedBallGrey-v0",
                                                                                eval_seed(1))
    assert set(LEVELS) <= set(registered_babyai())
    assert all(level_id(name) == lid for name, lid in LEVELS.items())  # the named levels keep their ids


@pytest.mark.parametrize("bad", ["GoToTheMoon", "BabyAI-GoToObj-v7", "MiniGrid-Empty-5x5-v0", "gotoobj", ""])
def test_unregistered_levels_get_a_clear_error(bad):
    with pytest.raises(UnknownLevelError, match="unknown BabyAI-Text level") as e:
        BabyAITextEnv(bad)
    assert "GoToLocal" in str(e.value) and "registered BabyAI levels" in str(e.value)


def test_unregistered_level_error_suggests_close_names():
    with pytest.raises(UnknownLevelError, match="did you mean GoToObj"):
        level_id("GoToObjj")


@pytest.mark.parametrize("level", ["KeyInBox", "BabyAI-PutNextS5N2Carrying-v0"])
def test_levels_the_text_or_the_bot_cannot_serve_are_refused_with_the_reason(level):
    with pytest.raises(UnknownLevelError, match="not supported: .*(box|carrying)"):
        BabyAITextEnv(level)


def test_the_rendering_refuses_what_it_cannot_show(monkeypatch):
    """KeyInBox's key is inside a box: caught from the grid itself at reset, whatever the refusal table says."""
    import gymnasium as gym

    from thrifty.envs import babyai_levels
    from thrifty.envs.babyai_text import unexpressed

    env = gym.make("BabyAI-KeyInBox-v0")
    env.reset(seed=0)
    assert "box holds a" in unexpressed(env.unwrapped)
    monkeypatch.delitem(babyai_levels.REFUSED_LEVELS, "KeyInBox")
    with pytest.raises(UnknownLevelError, match="cannot be played as text: a box holds a"):
        BabyAITextEnv("KeyInBox").reset(seed=0)
    ok = gym.make("BabyAI-GoToObj-v0")
    ok.reset(seed=0)
    assert unexpressed(ok.unwrapped) is None


def test_a_lost_expert_does_not_end_the_episode_and_says_why(monkeypatch):
    """minigrid's bot gives up when the agent opens a box (DisappearedBoxError); the episode goes on, and only a
    caller that asks for the expert's action gets the error."""
    import pytest
    from minigrid.utils.baby_ai_bot import DisappearedBoxError

    from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv, ExpertLostError

    env = BabyAITextEnv("GoToLocal")
    env.reset(seed=3)

    def gives_up(action_taken):
        raise DisappearedBoxError("A box was opened. I am not sure I can help now.")

    monkeypatch.setattr(env._bot, "replan", gives_up)
    for _ in range(3):
        text, *_ = env.step(ACTIONS.index("left"))
        assert text.startswith("facing")
    with pytest.raises(ExpertLostError, match="DisappearedBoxError: 'A box was opened"):
        env.expert_action()
    env.reset(seed=3)  # a new episode has a new expert
    assert env.expert_action() in ACTIONS
