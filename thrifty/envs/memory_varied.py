"""MemoryVaried: MiniGrid's Memory task with real variety between episodes (issue 23).

`MemoryRecallS13` (`thrifty.envs.babyai_text._MemoryRecallEnv`) fixes the walls, the start and the junction, so its
seeds give two episodes (key cue or ball cue). Here every seed draws:

- the hallway length: the layout of one of MiniGrid's Memory sizes (`MEMORY_SIZES`: MemoryS9, S11, S13, S17, with
  1, 3, 5 and 9 hallway cells), drawn inside a canvas of the largest size asked for (walls everywhere else);
- the cue: an object of any type (key, ball, box) and colour (minigrid's six), on any cell of the 3x3 start room
  except the one before the room's exit;
- the start: any cell and heading of the start room from which the cue, and no other object, is in view, so the
  cue is the one object named in the first observation; on the way east it is out of view as soon as the agent
  heads into the hallway (walled on both sides, the room's one exit behind it); only turning back shows it again;
- distractors: 0 to 3 objects in niches along the hallway walls, seen on the way (they compete with the cue for
  the kept tokens), never with the name of either junction object;
- the junction layout: a corridor across the end of the hallway with one object at the end of each arm, each arm
  1 to 3 cells long (drawn independently), the object matching the cue north or south.

Success and failure are MiniGrid's: reaching the corridor cell next to the object with the cue's type and colour
succeeds, reaching the one next to the other object ends the episode with no reward. The mission is MiniGrid's
constant "go to the matching object at the end of the hallway".

**The planner must bind the cue to what it sees at the junction, and the cue is necessary and sufficient.** The two
junction objects are drawn first (two different names), then the cue is one of them with probability 1/2, and the
north/south order is drawn independently; everything else (size, start, cue cell, arms, distractors) is drawn
independently of which one is the cue. So given everything the agent observes except the cue, the matching arm
is north or south with probability 1/2 each: a cue-blind policy succeeds at chance, 1/2 (`blind=True` of
`VariedMemoryExpert` measures it). With the cue, exactly one junction object carries its name: the cue suffices.
`thrifty memory-level` measures both, and how many evaluation seeds give distinct episodes (docs/memory_level.md).

**MemoryVariedTyped (`junction="typed"`): the cue is necessary and sufficient without a binding.** A 2.5M-parameter
planner trained on MemoryVaried took the junction turn at chance even on its own training episodes, and even with
the hallway cut out (docs/memory_level.md): comparing two names at the junction with one seen a hallway earlier is
not learnt at that size. The typed junction is MiniGrid's own (a key and a ball of one colour), with the key always
north and the ball south, like MemoryRecallS13; the cue is that colour's key or ball (1/2 each), so the matching
arm follows from the cue's type alone, and the junction, which always shows the same two types, says nothing about
it: a cue-blind policy is still at chance. Everything else varies as above: size, start, cue cell, the colour (6),
arms, and distractors, which may be keys and balls of other colours (a planner that takes the last key or ball it
saw, not the start room's, fails).

Example:
    >>> import gymnasium as gym
    >>> env = gym.make("thrifty/MemoryVaried-v0").unwrapped
    >>> _ = env.reset(seed=1_000_000_000)
    >>> env.size in MEMORY_SIZES and env.grid.get(*env.cue_pos).type in OBJECT_TYPES
    True
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from minigrid.core.constants import COLOR_NAMES
from minigrid.core.grid import Grid
from minigrid.core.world_object import Ball, Box, Key, Wall
from minigrid.envs.memory import MemoryEnv

MEMORY_SIZES = (9, 11, 13, 17)
"""MiniGrid's registered Memory sizes with a hallway (MiniGrid-MemoryS9/S11/S13/S17; S7 has none): grid SxS,
hallway S - 8 cells long, junction at column S - 2."""
OBJECT_TYPES = ("key", "ball", "box")
COLOURS = tuple(COLOR_NAMES)
MAX_DISTRACTORS = 3
MAX_ARM = 3
"""Longest junction arm (cells from the junction to the cell next to the object)."""
JUNCTIONS = ("match", "typed")
"""`match`: two different objects of any names, the cue's north or south at random (MemoryVaried); `typed`: a key
north and a ball south of one colour (MemoryVariedTyped; module doc)."""
_CLASSES = {"key": Key, "ball": Ball, "box": Box}
_NAMES = tuple((t, c) for t in OBJECT_TYPES for c in COLOURS)


class UnknownMemorySizeError(ValueError):
    """A Memory size that is not one of `MEMORY_SIZES`."""


def check_sizes(sizes) -> tuple[int, ...]:
    """`sizes` as a sorted tuple of distinct Memory sizes; `UnknownMemorySizeError` naming the valid ones."""
    sizes = tuple(sizes)
    if not sizes:
        raise UnknownMemorySizeError(f"give at least one Memory size, from {', '.join(map(str, MEMORY_SIZES))}")
    bad = [s for s in sizes if isinstance(s, bool) or s not in MEMORY_SIZES]
    if bad:
        raise UnknownMemorySizeError(
            f"unknown Memory size(s) {bad}: MemoryVaried draws MiniGrid's Memory layouts with a hallway, sizes "
            f"{', '.join(map(str, MEMORY_SIZES))} (MiniGrid-MemoryS9 ... S17)")
    return tuple(sorted(set(sizes)))


class MemoryVariedEnv(MemoryEnv):
    """The Memory task with the size, start, cue, distractors and junction drawn per seed (module doc).

    After `reset`: `size` (the episode's Memory size), `hallway_row` (the row of the start room's exit, the
    hallway and the junction), `junction` (the junction cell), `cue_pos`, `cue` ((type, colour)), `objects_at`
    (the two junction objects' cells, north first), `distractors` (cells), `success_pos`, `failure_pos`."""

    def __init__(self, sizes=MEMORY_SIZES, max_steps: int | None = None, junction: str = "match", **kwargs):
        self.sizes = check_sizes(sizes)
        if junction not in JUNCTIONS:
            raise ValueError(f"unknown junction {junction!r}: one of {', '.join(JUNCTIONS)} (module doc)")
        self.junction_kind = junction
        super().__init__(size=max(self.sizes), random_length=False, max_steps=max_steps, **kwargs)

    def _gen_grid(self, width, height):
        rng = self.np_random
        size = self.sizes[int(rng.integers(len(self.sizes)))]
        c = size // 2
        xj = size - 2  # the junction's column; the hallway is x = 5 .. xj - 1 on row c
        self.size, self.hallway_row, self.junction = size, c, (xj, c)
        grid = Grid(width, height)
        for x in range(width):
            for y in range(height):
                grid.set(x, y, Wall())
        room = [(x, y) for x in (1, 2, 3) for y in (c - 1, c, c + 1)]
        for cell in room + [(x, c) for x in range(4, xj + 1)]:
            grid.set(*cell, None)

        # junction: two different objects, the cue one of them, arms of 1..3 cells
        if self.junction_kind == "typed":  # that colour's key north, its ball south; the cue one of them
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            names = [("key", colour), ("ball", colour)]
            self.cue = names[int(rng.integers(2))]
        else:
            first, second = rng.choice(len(_NAMES), size=2, replace=False)
            names = [_NAMES[int(first)], _NAMES[int(second)]]
            self.cue = names[int(rng.integers(2))]
            if rng.integers(2):
                names.reverse()  # names[0] goes north
        longest = min(MAX_ARM, c - 2)
        arms = [int(rng.integers(1, longest + 1)) for _ in range(2)]
        self.objects_at = ((xj, c - arms[0] - 1), (xj, c + arms[1] + 1))
        ends = ((xj, c - arms[0]), (xj, c + arms[1]))  # the cells next to the objects
        for y in range(c - arms[0], c + arms[1] + 1):
            grid.set(xj, y, None)
        for (kind, colour), pos in zip(names, self.objects_at):
            grid.set(*pos, _CLASSES[kind](colour))
        match = names.index(self.cue)
        self.success_pos, self.failure_pos = ends[match], ends[1 - match]

        # distractors in niches of the hallway's walls, never named like a junction object
        niches = [(x, y) for x in range(5, xj) for y in (c - 1, c + 1)]
        others = [n for n in _NAMES if n not in names]
        count = int(rng.integers(0, min(MAX_DISTRACTORS, len(niches)) + 1))
        self.distractors = [niches[int(i)] for i in rng.choice(len(niches), size=count, replace=False)]
        for cell in self.distractors:
            kind, colour = others[int(rng.integers(len(others)))]
            grid.set(*cell, _CLASSES[kind](colour))

        # the cue, anywhere in the start room but before its exit; a start pose that sees it
        cue_cells = [cell for cell in room if cell != (3, c)]
        self.cue_pos = cue_cells[int(rng.integers(len(cue_cells)))]
        grid.set(*self.cue_pos, _CLASSES[self.cue[0]](self.cue[1]))
        self.grid = grid
        self.carrying = None
        views = {(cell, d): self._objects_in_view(cell, d) for cell in room if cell != self.cue_pos for d in range(4)}
        poses = [pose for pose, seen in views.items() if seen == [self.cue_pos]]
        cell, self.agent_dir = poses[int(rng.integers(len(poses)))]
        self.agent_pos = np.array(cell)
        self.mission = "go to the matching object at the end of the hallway"

    def _objects_in_view(self, cell: tuple[int, int], direction: int) -> list[tuple[int, int]]:
        """The cells of the objects the agent at `cell` heading `direction` has in its (occluded) view."""
        self.agent_pos, self.agent_dir = np.array(cell), direction
        _, vis = self.gen_obs_grid()
        seen = []
        for pos in (self.cue_pos, *self.objects_at, *self.distractors):
            rel = self.relative_coords(*pos)
            if rel is not None and vis[rel[0], rel[1]]:
                seen.append(pos)
        return seen


gym.register("thrifty/MemoryVaried-v0", entry_point=MemoryVariedEnv)
gym.register("thrifty/MemoryVariedTyped-v0", entry_point=MemoryVariedEnv, kwargs={"junction": "typed"})
