"""Meta-World manipulation as a gymnasium environment with a task instruction and a scripted expert.

Meta-World 3.x (Yu et al., 2019): a Sawyer arm, 50 tasks, continuous actions (xyz delta + gripper), a success
flag and a scripted expert per task. One episode = one task, one *layout* (the object and goal positions Meta-World
draws in `MT1(task, seed)`) and one instruction sentence per task (`INSTRUCTIONS`).

Layouts by seed: seed s is layout `s % 50` of `MT1(task, seed=s // 50)`, so each block of 50 consecutive seeds
costs one MT1 build (~1 s, cached per process). Training seeds are below `EVAL_SEED_BASE` (10^9) and evaluation
seeds are `EVAL_SEED_BASE + i`, so their MT1 blocks never coincide: disjoint by construction (and tested on the
layout vectors). `reset(seed=)` of Meta-World itself is ignored; here the seed *is* the layout.

Observation (a dict): "state" (39,) float32 = hand xyz [0:3], gripper opening [3], object poses [4:18], the previous
step's [0:18] at [18:36], goal xyz [36:39]; "instruction" (the task's sentence); "task_id" (index in `TASKS`);
"frame" (H, W, 3) uint8 when rendering is on. Action: (4,) float in [-1, 1]. An episode ends at success
(terminated) or at `max_steps` (truncated; Meta-World's own cap is 500).

Example:
    >>> env = MetaWorldEnv("reach-v3")
    >>> obs, info = env.reset(seed=eval_seed(0))
    >>> expert = scripted_expert("reach-v3")
    >>> obs, reward, terminated, truncated, info = env.step(expert(obs["state"]))
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import gymnasium as gym
import numpy as np

from thrifty.envs.seeds import EVAL_SEED_BASE, eval_seed, train_seed

__all__ = ["INSTRUCTIONS", "TASKS", "TASK_SETS", "MetaWorldEnv", "UnknownTaskError", "InvalidActionError",
           "resolve_tasks", "scripted_expert", "layout_vector", "eval_seed", "train_seed", "EVAL_SEED_BASE",
           "STATE_DIM", "ACTION_DIM", "CAMERAS"]

STATE_DIM = 39
ACTION_DIM = 4
LAYOUTS_PER_BLOCK = 50
"""Layouts Meta-World draws per `MT1(task, seed)`."""
MAX_PATH_LENGTH = 500
"""Meta-World's own step cap: stepping past it raises inside Meta-World."""
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
_FLIPPED = {"corner", "corner2", "corner3", "corner4"}  # their up-vector points down: rendered upside down

# One fixed sentence per task (what a language-conditioned policy is told).
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "put the ball into the basket",
    "bin-picking-v3": "move the block from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button of the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door",
    "hand-insert-v3": "put the hand into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate into the cabinet from the side",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate out of the cabinet from the side",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "push the thermos with the stick",
    "stick-pull-v3": "pull the thermos with the stick",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal behind the wall",
    "push-back-v3": "push the puck back to the goal",
    "reach-v3": "reach the goal",
    "reach-wall-v3": "reach the goal behind the wall",
    "shelf-place-v3": "place the puck on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
}
TASKS: tuple[str, ...] = tuple(INSTRUCTIONS)
"""All 50 Meta-World v3 tasks; a task's id is its index here."""

TASK_SETS: dict[str, tuple[str, ...]] = {
    # Meta-World's own MT10 list (metaworld.env_dict.MT10_V3), in its order
    "MT10": ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
             "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"),
    "MT50": TASKS,
}


class UnknownTaskError(ValueError):
    """A task or task-set name Meta-World does not have."""


class InvalidActionError(ValueError):
    """An action of the wrong shape, or with NaN/inf entries."""


def _task_name(name: str) -> str:
    full = name if name.endswith("-v3") else f"{name}-v3"
    if full not in INSTRUCTIONS:
        close = [t for t in TASKS if name.split("-")[0] in t][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownTaskError(f"unknown Meta-World task {name!r}{hint}; task sets: {', '.join(TASK_SETS)}, "
                               f"or one of the 50 tasks, e.g. {', '.join(TASKS[:4])}")
    return full


def resolve_tasks(names: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Task-set names (`MT10`, `MT50`) and task names (`reach-v3` or `reach`) -> task names, in order, unique."""
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    if not names:
        raise UnknownTaskError(f"no task given; task sets: {', '.join(TASK_SETS)}, or task names")
    out: list[str] = []
    for n in names:
        for t in TASK_SETS.get(n, (None,)) if n in TASK_SETS else (_task_name(n),):
            if t not in out:
                out.append(t)
    return tuple(out)


def _import_metaworld():
    # mujoco renders offscreen through EGL (Mesa works on a CPU); must be set before mujoco is imported
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import metaworld
    except ImportError as e:  # metaworld needs `packaging` without declaring it
        raise ImportError(f"Meta-World could not be imported ({e}); install thrifty with its dependencies "
                          "(`pip install -e .`, which brings metaworld and packaging)") from e
    return metaworld


@functools.lru_cache(maxsize=64)
def _block(task: str, block: int) -> tuple:
    """The 50 layouts (metaworld Task objects) of `MT1(task, seed=block)`."""
    metaworld = _import_metaworld()
    return tuple(metaworld.MT1(task, seed=block).train_tasks)


def _layout(task: str, seed: int):
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"a layout seed must be an integer >= 0, got {seed!r} (use train_seed(i) or eval_seed(i))")
    return _block(task, int(seed) // LAYOUTS_PER_BLOCK)[int(seed) % LAYOUTS_PER_BLOCK]


def layout_vector(task: str, seed: int) -> np.ndarray:
    """The random vector (object and goal positions) Meta-World draws for this task and seed."""
    import pickle

    return np.asarray(pickle.loads(_layout(_task_name(task), seed).data)["rand_vec"], dtype=np.float64)


def scripted_expert(task: str):
    """Meta-World's scripted expert for `task`: a function state (39,) -> action (4,) float32 in [-1, 1]."""
    _import_metaworld()
    from metaworld.policies import ENV_POLICY_MAP

    policy = ENV_POLICY_MAP[_task_name(task)]()

    def act(state: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # "Constant(s) may be too high" on most steps
            warnings.simplefilter("ignore", UserWarning)
            a = policy.get_action(np.asarray(state, dtype=np.float64))
        return np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)

    return act


class MetaWorldEnv(gym.Env):
    """One Meta-World task; `reset(seed=s)` plays layout s (see the module docstring for the seed split)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str, *, max_steps: int = MAX_PATH_LENGTH, render: bool = False,
                 camera: str = "corner", size: int = 64) -> None:
        self.task = _task_name(task)
        if not 1 <= int(max_steps) <= MAX_PATH_LENGTH:
            raise ValueError(f"max_steps must be in [1, {MAX_PATH_LENGTH}] (Meta-World's own cap), got {max_steps}")
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera {camera!r}; Meta-World's cameras: {', '.join(CAMERAS)}")
        if render and not 8 <= int(size) <= 512:
            raise ValueError(f"frame size must be in [8, 512] pixels, got {size}")
        self.max_steps, self.render_frames, self.camera, self.size = int(max_steps), bool(render), camera, int(size)
        self.task_id = TASKS.index(self.task)
        self.instruction = INSTRUCTIONS[self.task]
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32),
                  "task_id": gym.spaces.Discrete(len(TASKS)), "instruction": gym.spaces.Text(200)}
        if self.render_frames:
            spaces["frame"] = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._env = None  # the Meta-World env, built on the first reset
        self.episode_key: str | None = None
        """the current episode's `thrifty.envs.seeds.episode_key` (task, layout vector, initial state), after reset"""
        self._steps = 0
        self._done = True
        self.seed_in_play: int | None = None

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is None:
            raise ValueError("MetaWorldEnv.reset needs a seed: it picks the layout (train_seed(i) or eval_seed(i))")
        import pickle

        from thrifty.envs.seeds import episode_key

        layout = _layout(self.task, seed)
        env = self._meta_env()
        env.set_task(layout)
        state, _ = env.reset()
        self._steps, self._done, self.seed_in_play = 0, False, int(seed)
        rand_vec = np.asarray(pickle.loads(layout.data)["rand_vec"], dtype=np.float64)
        self.episode_key = episode_key(self.task, rand_vec, np.asarray(state, np.float64), self.instruction)
        return self._obs(state), {"task": self.task, "seed": int(seed), "success": False}

    def step(self, action) -> tuple[dict, float, bool, bool, dict]:
        if self._done:
            raise RuntimeError(f"{self.task}: the episode is over (success or the {self.max_steps}-step cap); "
                               "call reset(seed=...) before stepping again")
        a = np.asarray(action, dtype=np.float32)
        if a.shape != (ACTION_DIM,):
            raise InvalidActionError(f"{self.task}: an action is {ACTION_DIM} numbers (dx, dy, dz, gripper) in "
                                     f"[-1, 1], got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise InvalidActionError(f"{self.task}: action {a.tolist()} has NaN or inf entries")
        state, reward, _, _, info = self._env.step(np.clip(a, -1.0, 1.0))
        self._steps += 1
        success = bool(info.get("success", 0.0) > 0.5)
        terminated, truncated = success, (not success and self._steps >= self.max_steps)
        self._done = terminated or truncated
        return (self._obs(state), float(reward), terminated, truncated,
                {"success": success, "steps": self._steps})

    def render(self) -> np.ndarray:
        if not self.render_frames:
            raise RuntimeError("this MetaWorldEnv was built with render=False; pass render=True for frames")
        img = self._env.render()
        return np.ascontiguousarray(img[::-1, ::-1] if self.camera in _FLIPPED else img)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    # ------------------------------------------------------------------ internals
    def _meta_env(self):
        if self._env is None:
            _import_metaworld()
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS

            env_cls = ALL_V3_ENVIRONMENTS[self.task]
            kwargs: dict[str, Any] = {}
            if self.render_frames:
                kwargs = dict(render_mode="rgb_array", camera_name=self.camera, width=self.size, height=self.size)
            env = env_cls(**kwargs)
            if self.render_frames:
                env.model.vis.quality.offsamples = 0  # no anti-aliasing: ~10x cheaper frames
            self._env = env
        return self._env

    def _obs(self, state: np.ndarray) -> dict:
        obs = {"state": np.asarray(state, dtype=np.float32), "task_id": self.task_id,
               "instruction": self.instruction}
        if self.render_frames:
            if self._env.mujoco_renderer.viewer is None:
                self._env.render()  # builds the viewer; then drop shadows and reflections
                import mujoco

                scn = self._env.mujoco_renderer.viewer.scn
                scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
                scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            obs["frame"] = self.render()
        return obs
