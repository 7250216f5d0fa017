"""BabyAI with grid observations and discrete actions: the action models' second domain (LRAM trains one model
over several domains by padding states and actions; docs/lram.md).

A task is named `babyai-<Level>` (for example `babyai-GoToRedBallGrey`), any level `thrifty.envs.babyai_text`
accepts. The observation is minigrid's own 7x7 egocentric view, flattened and scaled, plus the heading:

    state (151,) float32 = image (7, 7, 3) / (10, 5, 2)   object index, colour index, door state, each in [0, 1]
                           ++ one-hot heading (4,)          east, south, west, north

Missions are not encoded, so the levels to use are those whose mission is fixed (GoToRedBallGrey: "go to the red
ball", grey distractors); a level whose mission varies is refused at reset with the reason. Actions are the 7
minigrid actions (indices into `ACTIONS`). Rewards are minigrid's (1 - 0.9 steps / max_steps on success, else 0);
an episode ends at success or at the level's step cap. The expert is minigrid's `BabyAIBot`, replanned after every
step with the action actually taken; its next action is in every observation (`expert_action`), so the bench's
expert can act through the same policy protocol as the learned policies.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import gymnasium as gym
import numpy as np

from thrifty.envs.seeds import episode_key, train_seed

PREFIX = "babyai-"
STATE_DIM = 7 * 7 * 3 + 4
N_ACTIONS = 7
_SCALE = np.array([10.0, 5.0, 2.0], np.float32)


def is_babyai_task(task: str) -> bool:
    return task.startswith(PREFIX)


def encode_observation(image: np.ndarray, direction: int) -> np.ndarray:
    """minigrid's (7, 7, 3) view and heading -> the (151,) state vector."""
    heading = np.zeros(4, np.float32)
    heading[int(direction)] = 1.0
    return np.concatenate([(np.asarray(image, np.float32) / _SCALE).reshape(-1), heading])


class BabyAIGridEnv(gym.Env):
    """One BabyAI level (`babyai-<Level>`) with state-vector observations; `reset(seed=s)` plays episode s."""

    def __init__(self, task: str, max_steps: int | None = None) -> None:
        from thrifty.envs.babyai_text import LEVEL_MAX_STEPS, level_id

        if not is_babyai_task(task):
            raise ValueError(f"a BabyAI grid task is named {PREFIX}<Level> (for example {PREFIX}GoToRedBallGrey), "
                             f"got {task!r}")
        self.task, self.level = task, task[len(PREFIX):]
        self.level_id = level_id(self.level)
        cap = max_steps or LEVEL_MAX_STEPS.get(self.level)
        self._env = gym.make(self.level_id, **({"max_steps": cap} if cap else {}))
        self.observation_space = gym.spaces.Dict({"state": gym.spaces.Box(0.0, 1.0, (STATE_DIM,), np.float32)})
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self.instruction = ""
        self.episode_key: str | None = None
        """the current episode's `thrifty.envs.seeds.episode_key` (the whole initial grid, start pose, mission)"""
        self._mission: str | None = None
        self._bot = None
        self._done = True
        for i in range(4):  # refuse a level whose mission varies now, not halfway through a collection
            self.reset(seed=train_seed(i))
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        if seed is None:
            raise ValueError("BabyAIGridEnv.reset needs a seed (train_seed(i) or eval_seed(i))")
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints rejected samples during reset
            obs, _ = self._env.reset(seed=int(seed))
        if self._mission is not None and obs["mission"] != self._mission:
            raise ValueError(f"{self.task}: its mission varies between episodes ({self._mission!r}, then "
                             f"{obs['mission']!r}), and grid states do not encode missions; use a level with a "
                             "fixed mission, such as GoToRedBallGrey")
        self._mission = self.instruction = obs["mission"]
        u = self._env.unwrapped
        self.episode_key = episode_key(self.level_id, u.grid.encode(), tuple(u.agent_pos), int(u.agent_dir),
                                       obs["mission"])
        self._bot = BabyAIBot(u)
        self._done = False
        return self._obs(obs), {"task": self.task, "seed": int(seed), "success": False, "mission": obs["mission"]}

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        if self._done:
            raise RuntimeError(f"{self.task}: the episode is over; call reset(seed=...) before stepping again")
        a = np.asarray(action).reshape(-1)
        if a.size != 1 or not float(a[0]).is_integer() or not 0 <= int(a[0]) < N_ACTIONS:
            raise ValueError(f"{self.task}: an action is one index in [0, {N_ACTIONS}), got {action!r}")
        obs, reward, terminated, truncated, _ = self._env.step(int(a[0]))
        self._last = int(a[0])
        self._done = bool(terminated or truncated)
        success = bool(terminated and reward > 0)
        return self._obs(obs, self._last), float(reward), bool(terminated), bool(truncated), {"success": success}

    @staticmethod
    def sanitize_action(action: Any) -> tuple[np.ndarray, bool]:
        """(a valid action index as a (1,) array, whether it had to be changed): a non-finite, non-integer or
        out-of-range request becomes the nearest valid index (NaN: 0)."""
        try:
            a = np.asarray(action, np.float64).reshape(-1)
        except (TypeError, ValueError):
            return np.zeros(1, np.float32), True
        x = float(a[0]) if a.size else 0.0
        fixed = 0.0 if not np.isfinite(x) else float(np.clip(round(x), 0, N_ACTIONS - 1))
        return np.array([fixed], np.float32), a.size != 1 or fixed != x

    def close(self) -> None:
        self._env.close()

    def _obs(self, obs: dict, taken: int | None = None) -> dict:
        expert = None
        if not self._done:
            expert = int(self._bot.replan(taken))
        return {"state": encode_observation(obs["image"], obs["direction"]), "expert_action": expert,
                "instruction": self.instruction}
