"""Policies in closed loop: one small protocol, and the episode loop that costs every step.

A policy acts at every control step: `reset(task, instruction)` at the start of an episode, then
`act(observation) -> PolicyStep` (the action and the `CostRecord` of that step). The scripted expert, the BC
baseline and the sequence-model policies of later modules all implement it, so one bench compares them.

`run_policy_episode` never crashes on a bad action: a NaN/inf entry becomes 0, an out-of-range one is clipped to
[-1, 1], a wrong shape is padded or cut, and each such step is counted in `invalid_actions`.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from thrifty.cost import CostRecord, PeakRSS, Stopwatch

WARMUP_STEPS = 3
"""Steps at the start of every episode left out of the latency quantiles (first calls, allocator warm-up)."""


@dataclass
class PolicyStep:
    action: np.ndarray
    """(4,) float32, what the policy asks for (the loop sanitises it)"""
    cost: CostRecord


class Policy(Protocol):
    name: str

    def reset(self, task: str, instruction: str) -> None: ...

    def act(self, observation: dict[str, Any]) -> PolicyStep: ...

    # optional: `observe_reward(reward)` after each step, for policies conditioned on returns (LRAM)


class ExpertPolicy:
    """The experts behind the policy protocol (hand-written rules: no FLOPs are counted): Meta-World's scripted
    expert per task; on BabyAI grid tasks minigrid's bot, whose action the environment puts in each observation."""

    name = "expert"

    def __init__(self) -> None:
        self._experts: dict[str, Any] = {}
        self._act = None

    def reset(self, task: str, instruction: str) -> None:
        from thrifty.envs.babyai_grid import is_babyai_task
        from thrifty.envs.metaworld import scripted_expert

        if is_babyai_task(task):
            self._act = None  # the bot's action arrives in each observation
            return
        if task not in self._experts:
            self._experts[task] = scripted_expert(task)
        self._act = self._experts[task]

    def act(self, observation: dict[str, Any]) -> PolicyStep:
        if "expert_action" in observation:  # BabyAI grid: the bot has planned this step already
            return PolicyStep(np.array([observation["expert_action"]], np.float32), CostRecord())
        if self._act is None:
            raise RuntimeError("ExpertPolicy.act before reset(task, instruction)")
        with Stopwatch() as sw:
            a = self._act(observation["state"])
        return PolicyStep(a, CostRecord(wall_s=sw.seconds))


def sanitize_action(action: Any, dim: int = 4) -> tuple[np.ndarray, bool]:
    """(the action made valid, whether it had to be changed): NaN/inf -> 0, clipped to [-1, 1], shape (dim,)."""
    try:
        a = np.asarray(action, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        return np.zeros(dim, np.float32), True
    bad = a.shape != (dim,)
    if bad:
        a = np.concatenate([a, np.zeros(max(0, dim - a.size), np.float32)])[:dim]
    finite = np.isfinite(a)
    bad |= not finite.all()
    a = np.where(finite, a, 0.0).astype(np.float32)
    bad |= bool(np.any(np.abs(a) > 1.0))
    return np.clip(a, -1.0, 1.0), bool(bad)


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return float(np.quantile(np.asarray(xs), q))


def make_env(task: str, max_steps: int = 200):
    """The environment of a policy task: `babyai-<Level>` (grid observations, discrete actions, the level's own
    step cap) or a Meta-World task (capped at `max_steps`)."""
    from thrifty.envs.babyai_grid import BabyAIGridEnv, is_babyai_task
    from thrifty.envs.metaworld import MetaWorldEnv

    return BabyAIGridEnv(task) if is_babyai_task(task) else MetaWorldEnv(task, max_steps=max_steps)


def run_policy_episode(policy: Policy, task: str, seed: int, max_steps: int = 200, env=None) -> dict[str, Any]:
    """Play one episode of `task` on layout `seed`; the result dict the bench writes as one JSON line.

    Fields: success, steps, decisions (= steps), flops_total, flops_per_step, wall_median_s and wall_p90_s (the
    policy's act() per step, the first WARMUP_STEPS steps left out), peak_rss_bytes (the process's resident peak
    during the episode), kv_bytes_max (the largest state or KV cache the policy carried), exit_layer_mean,
    invalid_actions, actions_sha (a digest of the executed actions: same seed, same digest), episode_key (the env's
    `thrifty.envs.seeds.episode_key` of the initial state: seeds that give the same episode share it).
    A policy with an `episode_report()` method adds its fields (DeeR: backbone and head FLOPs apart, loaded bytes).
    """
    env = env or make_env(task, max_steps=max_steps)
    sanitize = getattr(env, "sanitize_action", sanitize_action)
    obs, _ = env.reset(seed=seed)
    key = getattr(env, "episode_key", None)  # None: the report counts the episode as its own
    policy.reset(env.task, env.instruction)
    walls, flops, kv, exits, invalid, steps, success = [], 0, 0, [], 0, 0, False
    digest = hashlib.sha256()
    labelled = isinstance(policy, ExpertPolicy)  # only the expert may read the bot's action (BabyAI grid tasks)
    with PeakRSS() as rss:
        while True:
            if not labelled and "expert_action" in obs:
                obs = {k: v for k, v in obs.items() if k != "expert_action"}
            step = policy.act(obs)
            action, changed = sanitize(step.action)
            invalid += changed
            walls.append(step.cost.wall_s)
            flops += step.cost.flops
            kv = max(kv, step.cost.kv_bytes)
            if step.cost.exit_layer:
                exits.append(step.cost.exit_layer)
            digest.update(action.tobytes())
            obs, reward, terminated, truncated, info = env.step(action)
            if hasattr(policy, "observe_reward"):  # return-conditioned policies (LRAM) read the reward
                policy.observe_reward(reward)
            steps += 1
            if terminated or truncated:
                success = bool(info["success"])
                break
    timed = walls[WARMUP_STEPS:] or walls
    extras = policy.episode_report() if hasattr(policy, "episode_report") else {}  # e.g. DeeR's FLOPs apart
    return {**extras, "task": env.task, "success": success, "steps": steps, "decisions": steps, "flops_total": int(flops),
            "flops_per_step": flops / steps, "wall_median_s": statistics.median(timed),
            "wall_p90_s": _quantile(timed, 0.9), "peak_rss_bytes": rss.peak_bytes, "kv_bytes_max": kv,
            "exit_layer_mean": statistics.fmean(exits) if exits else None, "invalid_actions": invalid,
            "actions_sha": digest.hexdigest()[:16], "episode_key": key, "policy": policy.name}
