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
