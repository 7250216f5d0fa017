"""The Darkroom family: in-context RL test beds, numpy, vectorised over environments (gymnasium's vector API).

The agent sees only its own cell (x, y), never the goal: it must find the goal by exploring and then remember
it from its context. A *trial* is a run of consecutive episodes with the same task (goal, or key and door);
within a trial every episode restarts from the variant's start, so what a policy learned in context about the
task pays off in later episodes (ReLIC, Elawady et al. 2024; Algorithm Distillation, Laskin et al. 2022).

| variant | grid | horizon | start | reward | tasks | from |
|---|---|---|---|---|---|---|
| `darkroom` | 10x10 | 100 | (0, 0) | 1 on every step on the goal | 100 goals | DPT (Lee et al. 2023), ReLIC |
| `darkroom-ad` | 9x9 | 20 | centre (4, 4) | 1 on every step on the goal | 81 goals | AD "Dark Room" |
| `darkroom-hard` | 17x17 | 20 | centre (8, 8) | 1 on the first visit of the goal only | 289 goals | AD "Dark Room Hard" |
| `key-to-door` | 9x9 | 50 | random cell | 1 on the first visit of the key, then 1 on reaching the door with the key | 81 x 80 (key, door) pairs | AD "Dark Key-to-Door" |

Actions (all variants, DPT's order): 0 +x, 1 -x, 2 +y, 3 -y, 4 stay; moves are clipped to the grid. The reward is
read on the cell after the move. Episodes never terminate early: each lasts exactly `horizon` steps and ends by
truncation (toymeta's Hard variant ends on the goal and its key-to-door on the door; with once-only rewards the
returns are the same). Autoreset is gymnasium's SAME_STEP: the step that ends an episode returns the first
observation of the next episode of the same trial, and the last one in `info["final_obs"]`.

Tasks are split once by a seeded shuffle (`task_split`): the first 80% train, the rest are held out (ReLIC and DPT
use seed 0 over Darkroom's 100 goals: 80 train, 20 held out). `reset(options={"tasks": ...})` starts new trials
with the given task indices; `reset()` alone draws them from the `split` given at construction.

Example:
    >>> import numpy as np
    >>> envs = DarkroomVectorEnv("darkroom-ad", num_envs=2, split="heldout")
    >>> obs, info = envs.reset(seed=0)
    >>> obs.tolist(), info["episode_index"].tolist()
    ([[4, 4], [4, 4]], [0, 0])
    >>> obs, reward, terminated, truncated, info = envs.step(np.array([0, 4]))
    >>> obs.tolist(), bool(terminated.any())
    ([[5, 4], [4, 4]], False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

MOVES = np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [0, 0]], dtype=np.int64)
"""Action -> (dx, dy): +x, -x, +y, -y, stay."""
N_ACTIONS = len(MOVES)


def greedy_action(pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The expert's move from cells pos [n, 2] towards target [n, 2]: along x first, then y, then stay -> [n]."""
    dx, dy = target[:, 0] - pos[:, 0], target[:, 1] - pos[:, 1]
    return np.where(dx > 0, 0, np.where(dx < 0, 1, np.where(dy > 0, 2, np.where(dy < 0, 3, 4))))


@dataclass(frozen=True)
class DarkroomSpec:
    """One variant of the family."""

    size: int
    """the grid is size x size cells"""
    horizon: int
    """steps per episode"""
    start: Literal["corner", "centre", "random"]
    """(0, 0); (size // 2, size // 2); or a uniform cell drawn per episode"""
    reward: Literal["every_step", "first_visit", "key_door"]
    """1 on every step on the goal; 1 on the first visit only; key then door, each once"""
    train_fraction: float = 0.8
    """share of the tasks in the training split (the rest is held out)"""

    @property
    def n_tasks(self) -> int:
        cells = self.size * self.size
        return cells * (cells - 1) if self.reward == "key_door" else cells

    def task_cells(self, task: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Task indices [n] -> goal cells [n, 2] (key cells for key-to-door), and door cells [n, 2] or None.

        Key-to-door task t = key_cell * (cells - 1) + j, with the door the j-th cell other than the key."""
        task = np.asarray(task, dtype=np.int64)
        if np.any((task < 0) | (task >= self.n_tasks)):
            raise ValueError(f"task indices must lie in [0, {self.n_tasks}), got {task.tolist()}")
        if self.reward != "key_door":
            return np.stack(np.divmod(task, self.size), -1), None
        cells = self.size * self.size
        key, j = np.divmod(task, cells - 1)
        door = j + (j >= key)  # skip the key's own cell
        return np.stack(np.divmod(key, self.size), -1), np.stack(np.divmod(door, self.size), -1)


VARIANTS: dict[str, DarkroomSpec] = {
    "darkroom": DarkroomSpec(size=10, horizon=100, start="corner", reward="every_step"),
    "darkroom-ad": DarkroomSpec(size=9, horizon=20, start="centre", reward="every_step"),
    "darkroom-hard": DarkroomSpec(size=17, horizon=20, start="centre", reward="first_visit"),
    "key-to-door": DarkroomSpec(size=9, horizon=50, start="random", reward="key_door"),
}


class UnknownDarkroomVariantError(ValueError):
    """A variant name that is not in `VARIANTS`."""


def get_spec(variant: str) -> DarkroomSpec:
    if variant not in VARIANTS:
        raise UnknownDarkroomVariantError(f"unknown Darkroom variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def task_split(variant: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train task indices, held-out task indices): all tasks shuffled with `seed`, the first
    `train_fraction` of them for training. Darkroom, seed 0: 80 and 20 goals, disjoint, covering all 100 cells.

    The shuffle is numpy's legacy `RandomState(seed)` over tasks in x * size + y order, the generator and order
    DPT's code shuffles its goals with, so seed 0 gives DPT's (and ReLIC's) train/held-out goals."""
    spec = get_spec(variant)
    order = np.random.RandomState(seed).permutation(spec.n_tasks)
    n_train = int(round(spec.train_fraction * spec.n_tasks))
    return order[:n_train], order[n_train:]


def optimal_return(variant: str, task: int, start: tuple[int, int] | None = None) -> float:
    """The best return of one episode of `task` (from `start`, required for key-to-door's random start).

    The reward is read after each move, so a goal d >= 1 moves away is first scored at step d, and a goal on the
    start cell at step 1 (by staying): every-step rewards give horizon - max(d, 1) + 1."""
    spec = get_spec(variant)
    goal, door = spec.task_cells(np.array([task]))
    if start is None:
        if spec.start == "random":
            raise ValueError("key-to-door starts on a random cell: pass start=(x, y)")
        start = (0, 0) if spec.start == "corner" else (spec.size // 2, spec.size // 2)
    first = max(int(np.abs(goal[0] - np.asarray(start)).sum()), 1)  # step at which the goal (key) is first scored
    if first > spec.horizon:
        return 0.0
    if spec.reward == "every_step":
        return float(spec.horizon - first + 1)
    if spec.reward == "first_visit":
        return 1.0
    return 2.0 if first + int(np.abs(door[0] - goal[0]).sum()) <= spec.horizon else 1.0


class DarkroomVectorEnv(VectorEnv):
    """`num_envs` Darkroom environments of one variant, stepped together in numpy.

    Observations: int64 [num_envs, 2], each agent's (x, y). Actions: int [num_envs] in 0..4 (`MOVES`).
    Info (every reset and step): "episode_index" [num_envs], the episode's index in its trial (0 at a new trial);
    "step" [num_envs], steps taken in the current episode (0 right after a reset); "task" [num_envs]; on a step
    that ends episodes, "final_obs" [num_envs, 2] (the last cell of the ended episode; rows of the others repeat
    their observation) and "_final_obs" [num_envs] bool.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, variant: str = "darkroom", num_envs: int = 1, split: Literal["train", "heldout"] = "train",
                 split_seed: int = 0) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.variant = variant
        self.spec_ = get_spec(variant)
        self.num_envs = num_envs
        self.split = split
        train, heldout = task_split(variant, split_seed)
        self.split_tasks = train if split == "train" else heldout
        s = self.spec_.size
        self.single_observation_space = gym.spaces.Box(0, s - 1, shape=(2,), dtype=np.int64)
        self.single_action_space = gym.spaces.Discrete(N_ACTIONS)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rng = np.random.default_rng()
        self.tasks = np.zeros(num_envs, dtype=np.int64)
        self.pos = np.zeros((num_envs, 2), dtype=np.int64)
        self.step_in_episode = np.zeros(num_envs, dtype=np.int64)
        self.episode_index = np.zeros(num_envs, dtype=np.int64)
        self._goal = np.zeros((num_envs, 2), dtype=np.int64)
        self._door: np.ndarray | None = None
        self._visited = np.zeros(num_envs, dtype=bool)  # first_visit: goal seen; key_door: key held
        self._opened = np.zeros(num_envs, dtype=bool)   # key_door: door reached with the key

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start a new trial in every environment. options["tasks"]: task indices [num_envs] (any task of the
        variant, e.g. from `task_split`); otherwise drawn uniformly from this env's split."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        tasks = None if options is None else options.get("tasks")
        if tasks is None:
            tasks = self._rng.choice(self.split_tasks, size=self.num_envs)
        tasks = np.asarray(tasks, dtype=np.int64).reshape(-1)
        if tasks.shape != (self.num_envs,):
            raise ValueError(f"options['tasks'] must hold {self.num_envs} task indices, got {tasks.shape[0]}")
        self.tasks = tasks.copy()
        self._goal, self._door = self.spec_.task_cells(self.tasks)
        self.episode_index[:] = 0
        self._start_episodes(np.ones(self.num_envs, dtype=bool))
        return self.pos.copy(), self._info()

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.int64).reshape(-1)
        if actions.shape != (self.num_envs,) or np.any((actions < 0) | (actions >= N_ACTIONS)):
            raise ValueError(f"actions must be {self.num_envs} integers in [0, {N_ACTIONS}), got {actions.tolist()}")
        s = self.spec_
        self.pos = np.clip(self.pos + MOVES[actions], 0, s.size - 1)
        on_goal = np.all(self.pos == self._goal, axis=1)
        if s.reward == "every_step":
            reward = on_goal.astype(np.float32)
        elif s.reward == "first_visit":
            reward = (on_goal & ~self._visited).astype(np.float32)
            self._visited |= on_goal
        else:  # key_door: the key (goal cell) once, then the door once while holding the key
            got_key = on_goal & ~self._visited
            self._visited |= got_key
            at_door = np.all(self.pos == self._door, axis=1) & self._visited & ~self._opened
            self._opened |= at_door
            reward = (got_key | at_door).astype(np.float32)
        self.step_in_episode += 1
        truncated = self.step_in_episode >= s.horizon
        terminated = np.zeros(self.num_envs, dtype=bool)
        final_obs = self.pos.copy()
        if truncated.any():
            self.episode_index[truncated] += 1
            self._start_episodes(truncated)
        info = self._info()
        if truncated.any():
            info["final_obs"] = final_obs
            info["_final_obs"] = truncated.copy()
        return self.pos.copy(), reward, terminated, truncated, info

    # ------------------------------------------------------------------ helpers
    def _start_episodes(self, which: np.ndarray) -> None:
        """Put the agents of `which` [num_envs] bool on the start cell of a new episode of their trial."""
        s, n = self.spec_, int(which.sum())
        if s.start == "corner":
            start = np.zeros((n, 2), dtype=np.int64)
        elif s.start == "centre":
            start = np.full((n, 2), s.size // 2, dtype=np.int64)
        else:
            start = self._rng.integers(0, s.size, size=(n, 2))
        self.pos[which] = start
        self.step_in_episode[which] = 0
        self._visited[which] = False
        self._opened[which] = False

    def _info(self) -> dict[str, np.ndarray]:
        return {"episode_index": self.episode_index.copy(), "step": self.step_in_episode.copy(),
                "task": self.tasks.copy()}

    def __repr__(self) -> str:
        return f"DarkroomVectorEnv({self.variant!r}, num_envs={self.num_envs}, split={self.split!r})"
