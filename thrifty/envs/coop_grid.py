"""CoopGrid: K robots search a multi-room minigrid world for the 1-4 objects named in the mission (PettingZoo).

The world is a `rows x cols` layout of rooms (default 3x3, ids 0..8 row by row from the north-west), each a
`room_size`-cell square sharing its walls with its neighbours; every pair of adjacent rooms is joined by an open
door. Targets and distractors are balls, keys and boxes with distinct (colour, type) names. The episode
terminates with success when every target has been *reached*: some robot stands next to it, facing it.

Each low-level step moves every robot at once (PettingZoo Parallel API). A robot sees minigrid's egocentric 7x7
view (minigrid's own `Grid.slice / rotate_left / process_vis`, so walls and closed doors occlude) rendered as the
single-agent BabyAI-Text line with the robot's room in front:

    room 4; facing east; carrying nothing; red ball 2 ahead 1 left; open blue door 3 ahead 2 right; wall 3 ahead

Robots never block each other (they may share a cell); walls and objects block them.

High-level sub-goals (`Subgoal`: `goto <colour> <type>`, `explore <room>`, `wait`) are executed by
`low_level_action`, a deterministic controller that plans by BFS over the *team's* map (cells some robot has
seen; unseen cells are assumed free, but the robot always looks into an unseen cell before stepping into it), so
it never reads the hidden map. A room is *explored* once the team has seen all its interior cells.

Example:
    >>> env = CoopGridEnv(n_robots=2)
    >>> obs, infos = env.reset(seed=3)
    >>> sorted(obs) == env.agents and infos["robot_0"]["mission"].startswith("find the")
    True
    >>> goals = {a: Subgoal("explore", 0) for a in env.agents}
    >>> obs, rewards, terms, truncs, infos = env.step({a: low_level_action(env, a, g) for a, g in goals.items()})
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

import numpy as np
from gymnasium import spaces
from minigrid.core.constants import COLOR_NAMES, DIR_TO_VEC
from minigrid.core.grid import Grid
from minigrid.core.world_object import Ball, Box, Door, Key
from pettingzoo import ParallelEnv

from thrifty.envs.babyai_text import render_observation
from thrifty.envs.seeds import episode_key

MIN_ROBOTS, MAX_ROBOTS = 2, 8
MIN_TARGETS, MAX_TARGETS = 1, 4
OBJECT_TYPES = ("ball", "key", "box")
COLOURS = tuple(COLOR_NAMES)
"""minigrid's six colours: blue, green, grey, purple, red, yellow"""
ACTIONS = ("stay", "east", "south", "west", "north", "look east", "look south", "look west", "look north")
"""Low-level actions: `east` etc. face that way and step forward if the cell is free; `look ...` only turn."""
HEADINGS = ("east", "south", "west", "north")  # minigrid's direction indices 0..3
SUBGOAL_KINDS = ("goto", "explore", "wait")
_VIEW = 7
_OBJ_CLASSES = {"ball": Ball, "key": Key, "box": Box}
_TEXT_CHARSET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ;,:|-_=()/.")


class CoopGridError(ValueError):
    """Bad settings or input for the cooperative grid (robot count, target names, sub-goals)."""


def object_name(colour: str, kind: str) -> str:
    return f"{colour} {kind}"


def all_object_names() -> tuple[str, ...]:
    """Every object name the world can hold ("blue ball", ..., "yellow box"): 6 colours x 3 types."""
    return tuple(object_name(c, t) for t in OBJECT_TYPES for c in COLOURS)


def mission_text(targets: list[str]) -> str:
    """'find the red ball', 'find the red ball and the blue key', 'find the a, the b and the c'."""
    if not targets:
        raise CoopGridError("a mission needs at least one target")
    names = [f"the {t}" for t in targets]
    return "find " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])


def parse_mission(mission: str) -> list[str]:
    """Inverse of `mission_text`: the target names in mission order; unknown object names are refused."""
    if not isinstance(mission, str) or not mission.startswith("find the "):
        raise CoopGridError(f"a mission reads 'find the <colour> <type>[, the ...][ and the ...]', got {mission!r}")
    body = mission[len("find "):].replace(" and the ", ", the ")
    targets = [part.strip()[len("the "):] for part in body.split(",")]
    known = set(all_object_names())
    bad = [t for t in targets if t not in known]
    if bad:
        raise CoopGridError(f"unknown target object(s) {bad}; objects are '<colour> <type>' with colour in "
                            f"{COLOURS} and type in {OBJECT_TYPES}")
    return targets


@dataclass(frozen=True)
class Subgoal:
    """A robot's high-level sub-goal: ("goto", "red ball"), ("explore", 4) or ("wait", None)."""

    kind: str
    arg: str | int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SUBGOAL_KINDS:
            raise CoopGridError(f"sub-goal kind must be one of {SUBGOAL_KINDS}, got {self.kind!r}")
        if self.kind == "goto" and self.arg not in all_object_names():
            raise CoopGridError(f"goto needs an object name '<colour> <type>', got {self.arg!r}")
        if self.kind == "explore" and (isinstance(self.arg, bool) or not isinstance(self.arg, int) or self.arg < 0):
            raise CoopGridError(f"explore needs a room id >= 0, got {self.arg!r}")
        if self.kind == "wait" and self.arg is not None:
            raise CoopGridError(f"wait takes no argument, got {self.arg!r}")


@dataclass(frozen=True)
class WorldObject:
    name: str  # "red ball"
    pos: tuple[int, int]
    room: int


class CoopGridEnv(ParallelEnv):
    """K robots, one mission, text observations. Agents are "robot_0".."robot_{K-1}".

    Actions: indices into `ACTIONS` (Discrete(9)). Observations: one text line per robot (see module doc).
    Rewards: shared, +1 to every robot for each target newly reached. Infos per robot: mission, targets, room,
    pos, heading, `seen`: names of the objects in its view now, `reached`: targets it reached this step.
    """

    metadata = {"name": "coop_grid_v0", "render_modes": []}

    def __init__(self, n_robots: int = 4, rows: int = 3, cols: int = 3, room_size: int = 7,
                 n_targets: int | None = None, n_distractors: int = 3, max_steps: int | None = None):
        if isinstance(n_robots, bool) or not isinstance(n_robots, int) or not MIN_ROBOTS <= n_robots <= MAX_ROBOTS:
            raise CoopGridError(f"n_robots must be an integer in {MIN_ROBOTS}..{MAX_ROBOTS}, got {n_robots!r}")
        if n_targets is not None and not MIN_TARGETS <= n_targets <= MAX_TARGETS:
            raise CoopGridError(f"n_targets must be in {MIN_TARGETS}..{MAX_TARGETS} or None (sampled), "
                                f"got {n_targets!r}")
        if not (1 <= rows <= 3 and 1 <= cols <= 3 and rows * cols >= 2):
            raise CoopGridError(f"the room layout must be 1..3 x 1..3 with at least 2 rooms, got {rows}x{cols}")
        if room_size < 5:
            raise CoopGridError(f"room_size must be >= 5 (3x3 interior), got {room_size}")
        if n_distractors < 0 or n_distractors + MAX_TARGETS > len(all_object_names()):
            raise CoopGridError(f"n_distractors must be in 0..{len(all_object_names()) - MAX_TARGETS}")
        self.n_robots, self.rows, self.cols, self.room_size = n_robots, rows, cols, room_size
        self.n_rooms = rows * cols
        self.n_targets, self.n_distractors = n_targets, n_distractors
        self.width = cols * (room_size - 1) + 1
        self.height = rows * (room_size - 1) + 1
        self.max_steps = max_steps or 60 * self.n_rooms
        self.possible_agents = [f"robot_{i}" for i in range(n_robots)]
        self.agents: list[str] = []
        self._rng: np.random.Generator | None = None

    # ------------------------------------------------------------------ spaces
    @functools.lru_cache(maxsize=None)
    def observation_space(self, agent):
        return spaces.Text(max_length=1024, charset=_TEXT_CHARSET)

    @functools.lru_cache(maxsize=None)
    def action_space(self, agent):
        return spaces.Discrete(len(ACTIONS))

    # ------------------------------------------------------------------ geometry
    def room_of(self, x: int, y: int) -> int:
        """Room id of a cell; a door cell belongs to the room east/south of it."""
        s = self.room_size - 1
        return min(y // s, self.rows - 1) * self.cols + min(x // s, self.cols - 1)

    def room_cells(self, room: int) -> list[tuple[int, int]]:
        """Interior cells of `room` (row-major)."""
        if not 0 <= room < self.n_rooms:
            raise CoopGridError(f"room id must be in 0..{self.n_rooms - 1}, got {room!r}")
        s = self.room_size - 1
        r, c = divmod(room, self.cols)
        return [(c * s + i, r * s + j) for j in range(1, s) for i in range(1, s)]

    def room_distance(self, a: int, b: int) -> int:
        """Manhattan distance between two rooms in the layout (0 for the same room)."""
        (ra, ca), (rb, cb) = divmod(a, self.cols), divmod(b, self.cols)
        return abs(ra - rb) + abs(ca - cb)

    def layout_text(self) -> str:
        """'3x3' rooms, ids row by row: the layout the mission refers to."""
        return f"{self.rows}x{self.cols}"

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None or self._rng is None:
            self._rng = np.random.default_rng(seed)
        rng = self._rng
        self._build(rng)
        self.agents = list(self.possible_agents)
        self.steps = 0
        self.reached: dict[str, str] = {}  # target name -> agent that reached it
        self.seen = np.zeros((self.width, self.height), dtype=bool)
        self.explored: set[int] = set()
        obs, seen_now = {}, {}
        for a in self.agents:
            obs[a], seen_now[a] = self._observe(a)
        self._update_explored()
        infos = {a: self._info(a, seen_now[a], []) for a in self.agents}
        return obs, infos

    def episode_key(self) -> str:
        """Which episode this is (call right after `reset`): a hash of the layout, the grid, every robot's start pose
        and the mission (`thrifty.envs.seeds.episode_key`)."""
        poses = tuple((tuple(int(v) for v in self.pos[a]), int(self.dir[a])) for a in self.possible_agents)
        return episode_key("coop_grid", self.rows, self.cols, self.room_size, self.grid.encode(), poses, self.mission)

    def _build(self, rng: np.random.Generator) -> None:
        s = self.room_size - 1
        grid = Grid(self.width, self.height)
        for r in range(self.rows):
            for c in range(self.cols):
                grid.wall_rect(c * s, r * s, s + 1, s + 1)
        door_fronts = set()
        for r in range(self.rows):
            for c in range(self.cols):
                if c + 1 < self.cols:  # door in the wall east of room (r, c)
                    x, y = (c + 1) * s, r * s + int(rng.integers(1, s))
                    grid.set(x, y, Door(COLOURS[int(rng.integers(len(COLOURS)))], is_open=True))
                    door_fronts |= {(x - 1, y), (x + 1, y)}
                if r + 1 < self.rows:  # door in the wall south of room (r, c)
                    x, y = c * s + int(rng.integers(1, s)), (r + 1) * s
                    grid.set(x, y, Door(COLOURS[int(rng.integers(len(COLOURS)))], is_open=True))
                    door_fronts |= {(x, y - 1), (x, y + 1)}
        n_targets = self.n_targets or int(rng.integers(MIN_TARGETS, MAX_TARGETS + 1))
        names = all_object_names()
        picked = rng.choice(len(names), size=n_targets + self.n_distractors, replace=False)
        interior = [cell for room in range(self.n_rooms) for cell in self.room_cells(room) if cell not in door_fronts]
        while True:  # place objects so that every free cell stays reachable (objects block robots)
            cells = [interior[i] for i in rng.choice(len(interior), size=len(picked), replace=False)]
            if self._connected(grid, set(cells)):
                break
        self.objects: list[WorldObject] = []
        for i, (x, y) in zip(picked, cells):
            colour, kind = names[i].split()
            grid.set(x, y, _OBJ_CLASSES[kind](colour))
            self.objects.append(WorldObject(names[i], (x, y), self.room_of(x, y)))
        self.grid = grid
        self.targets = [o.name for o in self.objects[:n_targets]]
        self.mission = mission_text(self.targets)
        free = [cell for cell in interior if cell not in set(cells)]
        starts = rng.choice(len(free), size=self.n_robots, replace=False)
        self.pos = {a: free[int(i)] for a, i in zip(self.possible_agents, starts)}
        self.dir = {a: int(rng.integers(4)) for a in self.possible_agents}

    def _connected(self, grid: Grid, blocked: set[tuple[int, int]]) -> bool:
        free = [(x, y) for x in range(self.width) for y in range(self.height)
                if (x, y) not in blocked and (grid.get(x, y) is None or grid.get(x, y).can_overlap())]
        todo, seen = deque([free[0]]), {free[0]}
        while todo:
            x, y = todo.popleft()
            for dx, dy in DIR_TO_VEC:
                n = (x + int(dx), y + int(dy))
                if n not in seen and n not in blocked and 0 <= n[0] < self.width and 0 <= n[1] < self.height:
                    cell = grid.get(*n)
                    if cell is None or cell.can_overlap():
                        seen.add(n)
                        todo.append(n)
        return len(seen) == len(free)

    def _observe(self, agent: str) -> tuple[str, list[str]]:
        """The robot's egocentric text line; marks its visible cells as seen by the team; names it sees."""
        (x, y), d = self.pos[agent], self.dir[agent]
        fx, fy = (int(v) for v in DIR_TO_VEC[d])
        rx, ry = -fy, fx  # the robot's right-hand direction
        half = _VIEW // 2
        top = {0: (x, y - half), 1: (x - half, y), 2: (x - _VIEW + 1, y - half), 3: (x - half, y - _VIEW + 1)}[d]
        view = self.grid.slice(*top, _VIEW, _VIEW)
        for _ in range(d + 1):
            view = view.rotate_left()
        vis = view.process_vis(agent_pos=(half, _VIEW - 1))
        view.set(half, _VIEW - 1, None)
        image = view.encode(vis)
        names = []
        for i in range(_VIEW):
            for j in range(_VIEW):
                if not vis[i, j]:
                    continue
                ahead, right = _VIEW - 1 - j, i - half
                wx, wy = x + ahead * fx + right * rx, y + ahead * fy + right * ry
                if 0 <= wx < self.width and 0 <= wy < self.height:
                    self.seen[wx, wy] = True
                    obj = self.grid.get(wx, wy)
                    if obj is not None and obj.type in _OBJ_CLASSES:
                        names.append(object_name(obj.color, obj.type))
        text = f"room {self.room_of(x, y)}; " + render_observation(image, d)
        return text, sorted(set(names))

    def _update_explored(self) -> list[int]:
        new = [r for r in range(self.n_rooms) if r not in self.explored
               and all(self.seen[c] for c in self.room_cells(r))]
        self.explored.update(new)
        return new

    def _info(self, agent: str, seen_names: list[str], reached: list[str]) -> dict:
        x, y = self.pos[agent]
        return {"mission": self.mission, "targets": list(self.targets), "room": self.room_of(x, y),
                "pos": (x, y), "heading": HEADINGS[self.dir[agent]], "seen": seen_names, "reached": reached}

    def facing_object(self, agent: str) -> str | None:
        """Name of the object in the cell the robot faces (ball/key/box), or None."""
        (x, y), (dx, dy) = self.pos[agent], DIR_TO_VEC[self.dir[agent]]
        obj = self.grid.get(x + int(dx), y + int(dy))
        return object_name(obj.color, obj.type) if obj is not None and obj.type in _OBJ_CLASSES else None

    def step(self, actions: dict):
        if not self.agents:
            raise CoopGridError("the episode is over; call reset()")
        for a, act in actions.items():
            if a not in self.agents:
                raise CoopGridError(f"unknown or finished agent {a!r}; live agents: {self.agents}")
            if not self.action_space(a).contains(int(act)):
                raise CoopGridError(f"action must be an index in [0, {len(ACTIONS)}), got {act!r} for {a}")
        newly: dict[str, list[str]] = {a: [] for a in self.agents}
        for a in self.agents:  # robots move in id order; they never block each other
            act = int(actions.get(a, 0))
            if act == 0:
                continue
            self.dir[a] = (act - 1) % 4
            if act <= 4:
                (x, y), (dx, dy) = self.pos[a], DIR_TO_VEC[self.dir[a]]
                cell = self.grid.get(x + int(dx), y + int(dy))
                if cell is None or cell.can_overlap():
                    self.pos[a] = (x + int(dx), y + int(dy))
        self.steps += 1
        obs, seen_now = {}, {}
        for a in self.agents:
            obs[a], seen_now[a] = self._observe(a)
            name = self.facing_object(a)
            if name in self.targets and name not in self.reached:
                self.reached[name] = a
                newly[a].append(name)
        self._update_explored()
        n_new = sum(len(v) for v in newly.values())
        done = len(self.reached) == len(self.targets)
        truncated = not done and self.steps >= self.max_steps
        rewards = {a: float(n_new) for a in self.agents}
        terms = {a: done for a in self.agents}
        truncs = {a: truncated for a in self.agents}
        infos = {a: self._info(a, seen_now[a], newly[a]) for a in self.agents}
        if done or truncated:
            self.agents = []
        return obs, rewards, terms, truncs, infos

    @property
    def success(self) -> bool:
        return len(self.reached) == len(self.targets)

    def close(self):
        pass

    # ------------------------------------------------------------------ what the team knows
    def known_objects(self) -> dict[str, WorldObject]:
        """Objects in cells the team has seen, by name."""
        return {o.name: o for o in self.objects if self.seen[o.pos]}

    def team_blocked(self, x: int, y: int) -> bool | None:
        """True/False for a seen cell (wall or object / free or open door), None for a cell nobody has seen."""
        if not self.seen[x, y]:
            return None
        cell = self.grid.get(x, y)
        return cell is not None and not cell.can_overlap()


def _bfs_first_step(env: CoopGridEnv, start: tuple[int, int], goals: set[tuple[int, int]]) -> int | None:
    """Heading (0..3) of the first step of a shortest path from `start` to any goal cell over the team map
    (unseen cells count as free), or None when no goal is reachable. Ties: minigrid's heading order."""
    if start in goals:
        return None
    first = {start: None}
    todo = deque([start])
    while todo:
        x, y = todo.popleft()
        for d, (dx, dy) in enumerate(DIR_TO_VEC):
            n = (x + int(dx), y + int(dy))
            if n in first or not (0 <= n[0] < env.width and 0 <= n[1] < env.height) or env.team_blocked(*n):
                continue
            first[n] = d if first[(x, y)] is None else first[(x, y)]
            if n in goals:
                return first[n]
            todo.append(n)
    return None


def _move_or_look(env: CoopGridEnv, agent: str, d: int) -> int:
    """Step towards heading d, or only turn to look there first when the next cell is unseen."""
    (x, y), (dx, dy) = env.pos[agent], DIR_TO_VEC[d]
    if env.team_blocked(x + int(dx), y + int(dy)) is None:
        return 5 + d
    return 1 + d


def subgoal_done(env: CoopGridEnv, agent: str, goal: Subgoal) -> bool:
    """goto: the robot faces the object; explore: the room is explored; wait: always."""
    if goal.kind == "goto":
        return env.facing_object(agent) == goal.arg
    if goal.kind == "explore":
        return goal.arg in env.explored or goal.arg >= env.n_rooms
    return True


def low_level_action(env: CoopGridEnv, agent: str, goal: Subgoal) -> int:
    """The controller: index into `ACTIONS` that moves `agent` towards `goal` using only the team's map.

    goto X: go next to the known object X and face it (stay if X was never seen); explore R: go towards the
    nearest unseen interior cell of room R; wait, or a finished sub-goal: stay.
    """
    if subgoal_done(env, agent, goal):
        return 0
    pos = env.pos[agent]
    if goal.kind == "goto":
        obj = env.known_objects().get(goal.arg)
        if obj is None:
            return 0
        ox, oy = obj.pos
        for d, (dx, dy) in enumerate(DIR_TO_VEC):  # next to it: turn to face it
            if (pos[0] + int(dx), pos[1] + int(dy)) == (ox, oy):
                return 5 + d
        goals = {(ox + int(dx), oy + int(dy)) for dx, dy in DIR_TO_VEC}
        goals = {g for g in goals if env.team_blocked(*g) is not True}
    else:
        goals = {c for c in env.room_cells(goal.arg) if not env.seen[c]}
    d = _bfs_first_step(env, pos, goals)
    return 0 if d is None else _move_or_look(env, agent, d)
