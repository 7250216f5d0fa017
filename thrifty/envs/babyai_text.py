"""BabyAI-Text: minigrid's BabyAI levels with each egocentric observation rendered as one short line of text.

Levels: the named ones (`LEVELS`, `MEMORY_LEVELS`) and any registered `BabyAI-*` level, by short name
(`GoToObj`, `GoToRedBallGrey`) or id (`BabyAI-GoToObj-v0`); see `thrifty.envs.babyai_levels`.

The agent sees its 7x7 egocentric view (minigrid's own partial observation, occlusion included). We render:

    facing east; carrying nothing; red ball 2 ahead 1 left; closed blue door 3 ahead 2 right; wall 3 ahead; wall 1 left

- `facing` is the agent's absolute heading (minigrid's `direction`), needed for instructions that refer to the
  start pose ("the ball behind you").
- objects (key, ball, box, door, goal, lava) with colour, door state, and offsets in cells (`ahead` of the
  agent, then `left`/`right`), nearest first;
- `wall N ahead|left|right`: the first wall along each of the three rays from the agent, when seen.

Actions are the 7 minigrid actions as words (`ACTIONS`). The expert is minigrid's `BabyAIBot` (on the Memory levels,
`MemoryExpert`), replanned after every step with the action that was actually taken, so it also recovers from other
agents' mistakes.

Example:
    >>> env = BabyAITextEnv("GoToLocal")
    >>> obs, info = env.reset(seed=1_000_000_000)
    >>> info["mission"].startswith("go to")
    True
    >>> obs, reward, terminated, truncated, info = env.step(ACTIONS.index(env.expert_action()))
"""

from __future__ import annotations

import contextlib
import io

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI ids)
import numpy as np
from gymnasium import spaces
from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT
from minigrid.core.world_object import Ball, Key
from minigrid.envs.memory import MemoryEnv
from minigrid.utils.baby_ai_bot import BabyAIBot

from thrifty.envs.babyai_levels import UnknownLevelError, babyai_id, unknown_level
from thrifty.envs.memory_expert import MemoryExpert, VariedMemoryExpert
from thrifty.envs.memory_varied import MemoryVariedEnv  # (registers thrifty/MemoryVaried-v0)
from thrifty.envs.seeds import EVAL_SEED_BASE, episode_key, eval_seed, train_seed  # noqa: F401  (re-exported)

ACTIONS = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
"""The 7 minigrid actions as words, in minigrid's index order."""

LEVELS = {
    "GoToLocal": "BabyAI-GoToLocal-v0",
    "PickupLoc": "BabyAI-PickupLoc-v0",
    "PutNextLocal": "BabyAI-PutNextLocal-v0",
    "GoToObjMazeS4": "BabyAI-GoToObjMazeS4-v0",  # multi-room: 2x2 rooms joined by doors
}
"""Short level name -> minigrid id. GoToObjMazeS4 is the multi-room level (long episodes, 1-2k-token contexts).
The levels the shipped planner is trained and benchmarked on; every other registered BabyAI level works too."""


class _MemoryRecallEnv(MemoryEnv):
    """MiniGrid-Memory reduced to recalling one old observation: the agent starts beside the cue (the west end of the
    hallway, facing east) instead of at a random cell of the hallway, and the two objects at the east end are always
    the key to the north and the ball to the south. So the cue is named in the first observation ("green key 1
    left") and never again, and the turn at the junction, a whole hallway later, is a function of the cue alone
    (key: left, ball: right). In `MemoryEnv` the turn is the cue's type XOR the random placement, which a 2.5M
    planner trained by behaviour cloning did not learn (p(left) stayed constant; docs/babyai.md). Walls, cue and success
    rule are `MemoryEnv`'s for the same seed."""

    def _gen_grid(self, width, height):
        super()._gen_grid(width, height)
        self.agent_pos = np.array((1, height // 2))
        self.agent_dir = 0
        x = self.success_pos[0]  # hallway_end + 1: the column of both objects
        north, south = (x, height // 2 - 2), (x, height // 2 + 2)
        self.grid.set(*north, Key("green"))
        self.grid.set(*south, Ball("green"))
        cue_is_key = self.grid.get(1, height // 2 - 1).type == "key"
        self.success_pos, self.failure_pos = ((x, north[1] + 1), (x, south[1] - 1)) if cue_is_key else \
            ((x, south[1] - 1), (x, north[1] + 1))


gym.register("thrifty/MemoryRecallS13-v0", entry_point=_MemoryRecallEnv, kwargs={"size": 13})

MEMORY_LEVELS = {"MemoryS13": "MiniGrid-MemoryS13-v0", "MemoryRecallS13": "thrifty/MemoryRecallS13-v0",
                 "MemoryVaried": "thrifty/MemoryVaried-v0", "MemoryVariedTyped": "thrifty/MemoryVariedTyped-v0"}
"""Levels whose decisions need old context: MiniGrid's Memory task (see `thrifty.envs.memory_expert`). Not in
`LEVELS`, so the BabyAI planner's recipe and suites are unchanged; the `memory` suite and planner use them.
In MemoryS13 the agent starts anywhere in the hallway and the junction's objects are placed at random, so the turn
is the cue XOR the placement; MemoryRecallS13 (`_MemoryRecallEnv`) makes it a recall of the first observation, but
its seeds give only two distinct episodes (kept for reference: the shipped memory planner was trained on it).
MemoryVaried (`thrifty.envs.memory_varied`) varies everything but the task: hallway length, start, cue type and
colour, distractors, junction arms, and asks the planner to match the cue's name at the junction;
MemoryVariedTyped keeps that variety with MiniGrid's typed junction (key north, ball south), so the turn follows
from the cue's type: the level of the `memory` suite (issue 23, docs/memory_level.md)."""
LEVEL_MAX_STEPS = {"MemoryS13": 96, "MemoryRecallS13": 96, "MemoryVaried": 96, "MemoryVariedTyped": 96}
"""Step caps replacing minigrid's default (5 x 13^2 = 845 for MemoryS13; the expert needs at most ~40)."""

_DIRECTIONS = ("east", "south", "west", "north")
_OBJECTS = {"key", "ball", "box", "door", "goal", "lava"}
_DOOR_STATES = {0: "open", 1: "closed", 2: "locked"}
_VIEW = 7
_AGENT_X, _AGENT_Y = _VIEW // 2, _VIEW - 1  # the agent's cell in its own view, facing up (-y)


def level_id(level: str) -> str:
    """Map a short level name (or a full id) to the minigrid id: the named levels first, then any registered
    BabyAI level. Unknown or refused levels raise `UnknownLevelError` naming some available ones."""
    known = {**LEVELS, **MEMORY_LEVELS}
    if level in known:
        return known[level]
    if level in known.values():
        return level
    found = babyai_id(level)
    if found is None:
        raise unknown_level(level, list(known))
    return found



def episode_keys(level: str, seeds) -> list[str]:
    """The `BabyAITextEnv.episode_key` of each seed's episode of `level`, by resetting the env only (no model, no
    steps): how many distinct episodes a list of seeds gives is `len(set(episode_keys(level, seeds)))`."""
    env = BabyAITextEnv(level)
    keys = []
    for seed in seeds:
        env.reset(seed=seed)
        keys.append(env.episode_key)
    env.close()
    return keys


class ExpertLostError(RuntimeError):
    """The expert cannot act from the current state: minigrid's BabyAIBot gives up once the agent (not the bot) has
    done something its plan cannot follow, e.g. opened a box, which makes the box disappear. The episode itself
    goes on; only expert labels end there."""


def _offset(i: int, j: int) -> str:
    """Cell (i, j) of the view -> 'N ahead M left' relative to the agent."""
    ahead, right = _AGENT_Y - j, i - _AGENT_X
    parts = []
    if ahead:
        parts.append(f"{ahead} ahead")
    if right:
        parts.append(f"{abs(right)} {'right' if right > 0 else 'left'}")
    return " ".join(parts) or "here"


def unexpressed(env) -> str | None:
    """What the text rendering cannot say about this (reset) minigrid env, or None: a view other than 7x7, an
    object type outside its vocabulary, or a box with something inside (the view shows only the box)."""
    if env.agent_view_size != _VIEW:
        return f"its agent view is {env.agent_view_size}x{env.agent_view_size}; the rendering reads a 7x7 view"
    for cell in env.grid.grid:
        if cell is None or cell.type == "wall":
            continue
        if cell.type not in _OBJECTS:
            return f"it contains a {cell.type!r}, which the rendering has no words for"
        if cell.type == "box" and cell.contains is not None:
            return f"a box holds a {cell.contains.color} {cell.contains.type}, which the view never shows"
    return None


def render_observation(image: np.ndarray, direction: int) -> str:
    """Render minigrid's encoded view `image` (7, 7, 3) = (type, colour, state) and heading to one text line."""
    carried = IDX_TO_OBJECT[int(image[_AGENT_X, _AGENT_Y, 0])]
    if carried in _OBJECTS:
        carrying = f"carrying {IDX_TO_COLOR[int(image[_AGENT_X, _AGENT_Y, 1])]} {carried}"
    else:
        carrying = "carrying nothing"
    parts = [f"facing {_DIRECTIONS[direction]}", carrying]

    objects = []
    for i in range(_VIEW):
        for j in range(_VIEW):
            if (i, j) == (_AGENT_X, _AGENT_Y):
                continue
            kind = IDX_TO_OBJECT[int(image[i, j, 0])]
            if kind not in _OBJECTS:
                continue
            colour = IDX_TO_COLOR[int(image[i, j, 1])]
            name = f"{colour} {kind}"
            if kind == "door":
                name = f"{_DOOR_STATES[int(image[i, j, 2])]} {name}"
            dist = abs(_AGENT_Y - j) + abs(i - _AGENT_X)
            objects.append((dist, _AGENT_Y - j, i, f"{name} {_offset(i, j)}"))
    parts += [text for *_, text in sorted(objects)]

    # first wall along the rays ahead / left / right (stops at anything that is not empty floor)
    for name, (di, dj) in (("ahead", (0, -1)), ("left", (-1, 0)), ("right", (1, 0))):
        i, j, n = _AGENT_X + di, _AGENT_Y + dj, 1
        while 0 <= i < _VIEW and 0 <= j < _VIEW:
            kind = IDX_TO_OBJECT[int(image[i, j, 0])]
            if kind == "wall":
                parts.append(f"wall {n} {name}")
                break
            if kind != "empty":
                break
            i, j, n = i + di, j + dj, n + 1
    return "; ".join(parts)


class BabyAITextEnv(gym.Env):
    """A BabyAI level with text observations. `step` takes an action index (see `ACTIONS`)."""

    metadata = {"render_modes": []}

    def __init__(self, level: str, max_steps: int | None = None):
        self.level = level
        self.level_id = level_id(level)
        max_steps = max_steps or LEVEL_MAX_STEPS.get(level)
        kwargs = {"max_steps": max_steps} if max_steps else {}
        self._env = gym.make(self.level_id, **kwargs)
        self.action_space = spaces.Discrete(len(ACTIONS))
        self.observation_space = spaces.Text(max_length=2048)
        self._bot: BabyAIBot | None = None
        self.mission = ""
        self.episode_key: str | None = None

    @property
    def max_steps(self) -> int:
        return self._env.unwrapped.max_steps

    def reset(self, *, seed: int | None = None, options=None):
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints rejected samples during reset
            obs, info = self._env.reset(seed=seed)
        self.mission = obs["mission"]
        reason = unexpressed(self._env.unwrapped)
        if reason is not None:
            raise UnknownLevelError(f"level {self.level!r} cannot be played as text: {reason}")
        unwrapped = self._env.unwrapped
        # which episode this is: a hash of the level, initial grid, start pose and mission
        self.episode_key = episode_key(self.level_id, unwrapped.grid.encode(), tuple(unwrapped.agent_pos),
                                       int(unwrapped.agent_dir), self.mission)
        if isinstance(unwrapped, MemoryVariedEnv):
            self._bot = VariedMemoryExpert(unwrapped)
        elif self.level_id in MEMORY_LEVELS.values():
            self._bot = MemoryExpert(unwrapped)
        else:
            self._bot = BabyAIBot(unwrapped)
        self._expert_next: str | None = None
        self._expert_lost: str | None = None
        self._last_taken: int | None = None
        text = render_observation(obs["image"], int(obs["direction"]))
        return text, {**info, "mission": self.mission}

    def expert_action(self) -> str:
        """The expert's next action word for the current state (BabyAIBot)."""
        if self._bot is None:
            raise RuntimeError("call reset() before expert_action()")
        if self._expert_lost:
            raise ExpertLostError(f"the expert cannot act from this state ({self._expert_lost})")
        if self._expert_next is None:
            try:
                self._expert_next = ACTIONS[int(self._bot.replan(self._last_taken))]
            except Exception as e:  # the bot's own errors (DisappearedBoxError, assertions on its plan)
                self._expert_lost = f"{type(e).__name__}: {e}"
                raise ExpertLostError(f"the expert cannot act from this state ({self._expert_lost})") from e
        return self._expert_next

    def expert_needs_memory(self) -> bool:
        """Whether the expert's next action depends on something no longer in view (MemoryS13: the cue, at the
        junction); always False on the BabyAI levels, whose bot acts on the current state."""
        self.expert_action()
        return isinstance(self._bot, (MemoryExpert, VariedMemoryExpert)) and self._bot.needs_cue()

    def expert_has_seen_cue(self) -> bool:
        """Whether the Memory expert has seen the cue yet (at or before the current observation); always False on
        the BabyAI levels."""
        self.expert_action()
        return isinstance(self._bot, (MemoryExpert, VariedMemoryExpert)) and self._bot.cue_seen

    def goal_distance(self) -> int | None:
        """Steps of the shortest 4-connected path from the agent to a cell beside the object the mission's current
        stage names (GoTo and Pickup: the described object; PutNext: the object to move, then, once it is
        carried, the one to put it next to), through cells that are empty or open doors; orientation is ignored.
        None when the level's instruction is of another kind or no such cell is reachable. The potential of the
        planner RL's optional reward shaping (`thrifty.train.planner_rl`)."""
        from collections import deque

        u = self._env.unwrapped
        objs = self._mission_objects()
        if objs is None:
            return None
        targets = [tuple(int(c) for c in o.cur_pos) for o in objs]
        goals = {(x + dx, y + dy) for x, y in targets for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))}
        start = (int(u.agent_pos[0]), int(u.agent_pos[1]))

        def free(x: int, y: int) -> bool:
            if not (0 <= x < u.grid.width and 0 <= y < u.grid.height):
                return False
            cell = u.grid.get(x, y)
            return cell is None or (cell.type == "door" and cell.is_open) or (x, y) == start

        seen, frontier = {start}, deque([(start, 0)])
        while frontier:
            (x, y), d = frontier.popleft()
            if (x, y) in goals:
                return d
            for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if (nx, ny) not in seen and free(nx, ny):
                    seen.add((nx, ny))
                    frontier.append(((nx, ny), d + 1))
        return None

    def _mission_objects(self) -> list | None:
        """The objects the mission's current stage names (GoTo and Pickup: the described ones; PutNext: the one to
        move, then, once it is carried, the one to put it next to) that lie on the grid, or None when the level's
        instruction is of another kind. They are the objects the verifier matched at reset: find_matching_objs would
        recompute them from the agent's current pose, and it rewrites the description the expert reads."""
        u = self._env.unwrapped
        instr = getattr(u, "instrs", None)
        desc = getattr(instr, "desc", None)
        if desc is None and hasattr(instr, "desc_move"):
            desc = instr.desc_fixed if u.carrying is not None else instr.desc_move
        if desc is None:
            return None
        return [o for o in desc.obj_set if o.cur_pos is not None]

    def target_in_view(self, observation: str) -> tuple[int, int] | None:
        """(cells ahead, cells to the right) of the nearest object the mission's current stage names, when the
        text `observation` of the current state shows it there; None when it shows none of them (out of view,
        hidden, or a level of another kind). The training target of the planner's auxiliary loss
        (`PlannerRecipe.aux_weight`)."""
        u = self._env.unwrapped
        entries = {e.strip() for e in observation.split(";")}
        best = None
        for o in self._mission_objects() or []:
            vx, vy = u.get_view_coords(int(o.cur_pos[0]), int(o.cur_pos[1]))
            if not (0 <= vx < _VIEW and 0 <= vy < _VIEW):
                continue
            ahead, right = int(_AGENT_Y - vy), int(vx - _AGENT_X)
            if f"{o.color} {o.type} {_offset(vx, vy)}" in entries and (best is None or
                                                                       ahead + abs(right) < sum(map(abs, best))):
                best = (ahead, right)
        return best

    def step(self, action: int):
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action must be an index in [0, {len(ACTIONS)}), got {action!r}")
        if self._bot is not None and self._expert_next is None and not self._expert_lost:
            with contextlib.suppress(ExpertLostError):  # a lost expert does not end the episode
                self.expert_action()  # keep the bot's internal plan in step with the world
        obs, reward, terminated, truncated, info = self._env.step(int(action))
        self._last_taken = int(action)
        self._expert_next = None
        text = render_observation(obs["image"], int(obs["direction"]))
        return text, float(reward), bool(terminated), bool(truncated), {**info, "mission": self.mission}

    def close(self):
        self._env.close()
