"""Rollout workers for the planner's RL (EchoRL's actors, issue 19, part 4): in-process by default, or Ray actors.

Each worker holds its own copy of the planner (and of the plan encoder, with latent plans) and plays the episodes
it is given through its own kept sessions (`thrifty.train.planner_policy.rollout`). Before each iteration the
learner's weights are broadcast to every worker. Every episode draws its actions from its own generator, seeded
from (run seed, episode index), so the episodes do not depend on which worker played them or in which order:
in-process and Ray rollouts are the same episodes (`tests/test_planner_rl.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class RolloutJob:
    index: int
    """the episode's index in the run (its seed and its generator's seed follow from it)"""
    level: str
    seed: int


def episode_generator(run_seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(run_seed * 1_000_003 + index)


def play(model, tokenizer, action_ids, recipe: dict, plans, jobs: list[RolloutJob]) -> list:
    """The jobs' episodes, each from its own generator (what makes the workers interchangeable)."""
    from thrifty.train.planner_policy import rollout

    model.eval()
    return [rollout(model, tokenizer, action_ids, j.level, j.seed, episode_generator(recipe["seed"], j.index),
                    recipe["max_steps"], recipe["temperature"], reuse=recipe["rollout_reuse"], plans=plans)
            for j in jobs]


class RolloutWorker:
    """One actor: a planner copy; `run(weights, jobs)` loads the broadcast weights and plays the jobs."""

    def __init__(self, model_dir: str, recipe: dict, threads: int = 1) -> None:
        from thrifty.train.latent_plan import PlanEncoder
        from thrifty.train.planner_policy import action_token_ids, load_planner_for_rl

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_planner_for_rl(model_dir)
        self.model.eval()
        self.action_ids = action_token_ids(self.tokenizer)
        self.recipe = recipe
        d = self.model.config.hidden_size
        self.plans = (PlanEncoder(d, recipe["plan_dim"], recipe["plan_window"]).eval()
                      if recipe.get("latent_plans") else None)

    def load(self, weights: dict[str, Any]) -> None:
        self.model.load_state_dict(weights["model"])
        if self.plans is not None:
            self.plans.load_state_dict(weights["plans"])

    def run(self, weights: dict[str, Any] | None, jobs: list[RolloutJob]) -> list:
        if weights is not None:
            self.load(weights)
        return play(self.model, self.tokenizer, self.action_ids, self.recipe, self.plans, jobs)


class InProcessRollouts:
    """The default: the learner's own model plays the episodes (no copy, no broadcast)."""

    def __init__(self, model, tokenizer, action_ids, recipe: dict, plans=None) -> None:
        self.model, self.tokenizer, self.action_ids, self.recipe, self.plans = (model, tokenizer, action_ids,
                                                                                  recipe, plans)

    def run(self, jobs: list[RolloutJob]) -> list:
        return play(self.model, self.tokenizer, self.action_ids, self.recipe, self.plans, jobs)

    def close(self) -> None:
        pass


class RayRollouts:
    """`n` Ray actors (one CPU each); each iteration the jobs are dealt round-robin and the weights broadcast once
    through the object store."""

    def __init__(self, n: int, model_dir: str | Path, recipe: dict, model, plans=None,
                 ray_address: str | None = None) -> None:
        import ray

        from thrifty.bench.runner import ensure_ray

        if n < 1:
            raise ValueError(f"need at least one rollout worker, got {n}")
        ensure_ray(ray_address)
        actor = ray.remote(num_cpus=1, max_restarts=0)(RolloutWorker)
        self.actors = [actor.remote(str(model_dir), recipe, 1) for _ in range(n)]
        self.model, self.plans = model, plans

    def run(self, jobs: list[RolloutJob]) -> list:
        import ray

        weights = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                   "plans": None if self.plans is None else self.plans.state_dict()}
        ref = ray.put(weights)
        parts = [jobs[i::len(self.actors)] for i in range(len(self.actors))]
        outs = ray.get([a.run.remote(ref, part) for a, part in zip(self.actors, parts) if part])
        by_index = {j.index: ep for part, out in zip([p for p in parts if p], outs) for j, ep in zip(part, out)}
        return [by_index[j.index] for j in jobs]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
