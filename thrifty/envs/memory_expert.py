"""An expert for MiniGrid's Memory levels that acts only on what the agent has seen.

MiniGrid-Memory (`minigrid.envs.MemoryEnv`): the agent starts in a hallway facing east; a green key or ball (the
cue) lies in the start room to the west; at the east end of the hallway a key and a ball lie one north and one
south of a junction. Reaching the cell next to the object that matches the cue succeeds, the other one ends the
episode with no reward. The cue is behind the agent at the start and out of view at the junction, so the decision
there needs what was seen many steps earlier: a test of whether context pruning keeps the right old tokens.

The expert first turns west and walks until the cue is in view, then takes the shortest path (left / right /
forward, never through the failure cell) to the success cell. Its choice at the junction follows from the cue it
saw, so its actions are learnable from the text observations.
"""

from __future__ import annotations

from collections import deque

_STEP = {0: (1, 0), 1: (0, 1), 2: (-1, 0), 3: (0, -1)}  # minigrid direction -> (dx, dy): east, south, west, north
LEFT, RIGHT, FORWARD = 0, 1, 2  # minigrid action indices
WEST = 2


class MemoryExpert:
    """`replan(last_taken) -> action index` over an unwrapped `MemoryEnv` (the interface of minigrid's BabyAIBot)."""

    def __init__(self, env):
        self.env = env
        h = env.height
        self.cue_pos = (1, h // 2 - 1)
        self.cue_seen = False

    def replan(self, last_taken: int | None = None) -> int:
        env = self.env
        if not self.cue_seen and env.agent_sees(*self.cue_pos):
            self.cue_seen = True
        if not self.cue_seen:
            if env.agent_dir != WEST:
                return LEFT
            fx, fy = env.front_pos
            cell = env.grid.get(int(fx), int(fy))
            return FORWARD if cell is None or cell.can_overlap() else RIGHT
        return self._path_to(tuple(env.success_pos))

    def needs_cue(self) -> bool:
        """Whether the next action depends on the cue: after the cue is seen, the first step toward the success cell
        differs from the first step toward the failure cell (at the junction). These are the decisions only a
        planner that remembers the cue gets right."""
        env = self.env
        if not self.cue_seen:
            return False
        success, failure = tuple(env.success_pos), tuple(env.failure_pos)
        return self._path_to(success, avoid=failure) != self._path_to(failure, avoid=success)

    def _path_to(self, goal: tuple[int, int], avoid: tuple[int, int] | None = None) -> int:
        """First action of a shortest left/right/forward path from the agent's pose to `goal` (any heading), never
        through `avoid` (default: the failure cell)."""
        env = self.env
        start = (int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir))
        blocked = {tuple(env.failure_pos) if avoid is None else avoid}
        first: dict[tuple[int, int, int], int | None] = {start: None}
        queue = deque([start])
        while queue:
            x, y, d = state = queue.popleft()
            if (x, y) == goal:
                return first[state] if first[state] is not None else FORWARD
            dx, dy = _STEP[d]
            moves = [(LEFT, (x, y, (d - 1) % 4)), (RIGHT, (x, y, (d + 1) % 4))]
            cell = env.grid.get(x + dx, y + dy)
            if (x + dx, y + dy) not in blocked and (cell is None or cell.can_overlap()):
                moves.append((FORWARD, (x + dx, y + dy, d)))
            for action, nxt in moves:
                if nxt not in first:
                    first[nxt] = action if first[state] is None else first[state]
                    queue.append(nxt)
        raise RuntimeError(f"no path from {start} to {goal} in the Memory grid")


NORTH, EAST, SOUTH = 3, 0, 1


class VariedMemoryExpert:
    """`replan(last_taken) -> action index` over an unwrapped `MemoryVariedEnv`, acting only on what it has seen.

    It keeps a map of every cell the agent has had in view (minigrid's occluded view, `gen_obs_grid`) and plans
    shortest left/right/forward paths over it, unseen cells assumed free (so it recovers from any state other
    agents' actions leave it in). What it knows of the level family is its structure: a start room whose exit is
    on `hallway_row`, a hallway east along that row, a corridor across its end with one object per arm, the
    success cell next to the matching object. The episode itself (hallway length, arms, the objects and where they
    lie) is only what it has seen:

    1. the cue is the object it sees in the start room (x <= 3); with `blind=True` it never records its name;
    2. once it has seen a junction object with the cue's name, it goes to the cell next to it, never through the
       cell next to the other one (cue-blind: to the first junction object it saw, whatever its name);
    3. otherwise it walks east along the hallway until the wall at its end is in view, goes to the junction and
       looks up the arm it has not seen yet (north first, then south).
    """

    def __init__(self, env, blind: bool = False):
        self.env = env
        self.blind = blind
        self.row = env.hallway_row
        self.known: dict[tuple[int, int], object] = {}  # seen cells -> the world object there (None: empty floor)
        self.junction_objects: list[tuple[int, int]] = []  # in the order first seen
        self.cue: tuple[str, str] | None = None
        self.cue_seen = False

    def replan(self, last_taken: int | None = None) -> int:
        self._observe()
        return self._decide(self.cue)

    def needs_cue(self) -> bool:
        """Whether the next action depends on the cue: it differs from what this expert, with the same map, would do
        if the cue were the other junction object. These are the decisions only a planner that remembers the cue
        gets right (the turn into the matching arm, or past the other one)."""
        self._observe()
        if self.blind or self.cue is None:
            return False
        names = [(o.type, o.color) for o in (self.env.grid.get(*p) for p in self.env.objects_at)]
        other = names[1] if names[0] == self.cue else names[0]
        return self._decide(self.cue) != self._decide(other)

    def _observe(self) -> None:
        env = self.env
        _, vis = env.gen_obs_grid()
        top_x, top_y, bot_x, bot_y = env.get_view_exts()
        for x in range(max(0, top_x), min(env.width, bot_x)):
            for y in range(max(0, top_y), min(env.height, bot_y)):
                rel = env.relative_coords(x, y)
                if rel is None or not vis[rel[0], rel[1]]:
                    continue
                cell = env.grid.get(x, y)
                self.known[(x, y)] = cell
                if cell is None or cell.type == "wall":
                    continue
                if x <= 3 and not self.cue_seen:  # the start room holds the cue and nothing else
                    self.cue_seen = True
                    self.cue = None if self.blind else (cell.type, cell.color)
                elif x >= 5 and abs(y - self.row) >= 2 and (x, y) not in self.junction_objects:
                    self.junction_objects.append((x, y))

    def _end(self, obj: tuple[int, int]) -> tuple[int, int]:
        """The corridor cell next to a junction object (toward the hallway): success or failure."""
        x, y = obj
        return (x, y + 1) if y < self.row else (x, y - 1)

    def _decide(self, cue: tuple[str, str] | None) -> int:
        seen = self.junction_objects
        if cue is not None:
            match = [p for p in seen if (self.known[p].type, self.known[p].color) == cue]
        else:
            match = seen[:1] if self.blind else []
        if match:
            goal = self._end(match[0])
            avoid = {self._end(p) for p in seen if p != match[0]}
            return self._first_action(lambda x, y, d: (x, y) == goal, avoid)
        avoid = {self._end(p) for p in seen}
        if not self.cue_seen:  # (the start pose has the cue in view; only after others' turns could it be missed)
            return LEFT
        junction = self._junction()
        if junction is None:  # down the hallway, to the furthest cell of its row seen open, facing east
            x = 4
            while (x + 1, self.row) in self.known and self.known[(x + 1, self.row)] is None:
                x += 1
            goal_x = x
            return self._first_action(lambda x, y, d: (x, y, d) == (goal_x, self.row, EAST), avoid, at_goal=FORWARD)
        face = NORTH if not any(p[1] < self.row for p in seen) else SOUTH
        return self._first_action(lambda x, y, d: (x, y, d) == (*junction, face), avoid, at_goal=LEFT)

    def _junction(self) -> tuple[int, int] | None:
        """The junction cell, once the wall closing the hallway's row is in the map."""
        walls = [x for (x, y), cell in self.known.items()
                 if y == self.row and x >= 5 and cell is not None and cell.type == "wall"]
        return (min(walls) - 1, self.row) if walls else None

    def _first_action(self, is_goal, avoid: set[tuple[int, int]], at_goal: int = FORWARD) -> int:
        """First action of a shortest left/right/forward path to a pose `is_goal(x, y, d)` over the map (unseen
        cells free), never through `avoid`; `at_goal` when the agent is there already."""
        env = self.env
        start = (int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir))
        if is_goal(*start):
            return at_goal
        first: dict[tuple[int, int, int], int | None] = {start: None}
        queue = deque([start])
        while queue:
            x, y, d = state = queue.popleft()
            dx, dy = _STEP[d]
            moves = [(LEFT, (x, y, (d - 1) % 4)), (RIGHT, (x, y, (d + 1) % 4))]
            nx, ny = x + dx, y + dy
            if 0 <= nx < env.width and 0 <= ny < env.height and (nx, ny) not in avoid \
                    and self.known.get((nx, ny)) is None:  # seen empty, or not seen yet
                moves.append((FORWARD, (nx, ny, d)))
            for action, nxt in moves:
                if nxt not in first:
                    first[nxt] = action if first[state] is None else first[state]
                    if is_goal(*nxt):
                        return first[nxt]
                    queue.append(nxt)
        raise RuntimeError(f"no path from {start} over the seen map of the MemoryVaried grid")
