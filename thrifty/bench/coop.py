"""`thrifty bench-coop`: the cooperative planner over K in {2, 4, 8} robots, full vs pruned shared context.

Configurations (`coop_configs`): the expert team (success reference, no model), the full planner, prefix reuse
alone (exact: same decisions as full, only the new tokens are computed), and learned token pruning with its two
count-matched baselines (random, recency) at one keep ratio; with `max_kept`, the three again under that token cap
(a budget: the deep layers' cost per call stops growing with the context); and the three composed with prefix
reuse (only each call's new tokens are computed; pruned history leaves the deep layers' caches once, so later
calls attend over fewer keys). Every pruning configuration protects the task, the calling robot's role line and
its own latest observation (`COOP_PROTECT`) and prunes after the same layers, so the three process the same
number of tokens in every layer of every call.

The planner decodes inside the decision language by default (`DECODINGS`, `--decoding`): only decisions the parser
accepts given the team's reports can be emitted; "free" is plain greedy decoding, malformed output becoming `wait`.

One job = one episode of (configuration, team size K, evaluation seed 1e9 + i); the level field of a results
line is "K<k>". Episodes stop after 20 rounds (`EVAL_CONFIG`, 1.5x the expert's longest). Jobs run episode index
first, so an interrupted run is balanced across configurations; rerunning resumes (`ResultsFile`, `run_jobs`).

Per (configuration, K) the table reports success with its 95% Wilson interval, context tokens per call, tokens
per round (the K calls of a round), FLOPs per call (and its ratio to the same configuration's at the smallest K:
how cost per call grows with K) and per round (analytic, prefill + decode), the largest KV cache of an episode
(mean over episodes), latency per call (median) and malformed outputs per call. The summary, the paired
comparison with full and the plots are in `thrifty.bench.coop_report`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from thrifty.agents.coop import CoopConfig, run_coop_episode
from thrifty.agents.coop_planner import (COOP_PROTECT, EVAL_CONFIG, SHIPPED_COOP_PLANNER, SHIPPED_COOP_PRUNER,
                                         CoopPlanner, run_coop_planner_episode)
from thrifty.bench.results import Job
from thrifty.envs.babyai_text import eval_seed

SUITE = "coop"
TEAM_SIZES = (2, 4, 8)
KEEP_RATIO = 0.6
PRUNING = ("token_pruning", "random_pruning", "recency_pruning")
"""The learned pruner and its two count-matched baselines (sink_window cannot run over a kept session)."""
DECODINGS = ("free", "constrained")
"""How the planner's decision is decoded: greedy argmax ("free"; malformed output becomes `wait`), or greedy among
the tokens that keep it a decision the parser accepts given the team's reports ("constrained",
`CoopPlanner(constrained=True)`)."""
EPISODES = 4
"""Default episodes per (configuration, K). With `--max-kept` that is 12 configurations x 3 team sizes x 4 = 144
episodes; docs/coop.md's 8-episode run (288, constrained decoding) took 12 min on one core with the shipped planner."""

MIN_DISTINCT = EPISODES
"""Floor on the distinct episodes (`CoopGridEnv.episode_key`) the default seeds give per team size: all of them
(`coop_distinct_episodes`; tests/test_distinct_episodes.py checks it). Results count each distinct episode once."""


def coop_distinct_episodes(episodes: int = EPISODES, team_sizes: Sequence[int] = TEAM_SIZES) -> dict[int, int]:
    """K -> how many distinct episodes eval_seed(0..episodes-1) give with K robots (by resetting the env only)."""
    counts = {}
    for k in team_sizes:
        env = eval_config().make_env(k)
        keys = set()
        for i in range(episodes):
            env.reset(seed=eval_seed(i))
            keys.add(env.episode_key())
        counts[k] = len(keys)
    return counts


@dataclass(frozen=True)
class CoopBenchConfig:
    name: str
    technique: str | None
    """a registered technique, or None for the expert team"""
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "technique": self.technique, "settings": dict(self.settings)}


def coop_configs(keep_ratio: float = KEEP_RATIO, pruner: str | Path | None = None,
                 layers: Sequence[int] | None = None, max_kept: int | None = None) -> tuple[CoopBenchConfig, ...]:
    """expert, full, prefix_reuse, token_pruning / random_pruning / recency_pruning at `keep_ratio`; with
    `max_kept`, the three again with that token cap ("@0.6/cap256"), so cost per call stops growing with K;
    the three composed with prefix reuse ("reuse+token_pruning@0.6": only the new tokens are computed, and pruned
    history leaves the deep layers' caches).
    All three prune after `layers`, by default the layers the pruner was trained for (read from its checkpoint)."""
    from thrifty.techniques.token_pruning import TokenScorer

    pruner = str(pruner) if pruner else str(SHIPPED_COOP_PRUNER)
    if layers is None:
        layers = TokenScorer.load(pruner).layers
    pruning = {"keep_ratio": keep_ratio, "layers": sorted(int(x) for x in layers), "protect": list(COOP_PROTECT)}
    out = [CoopBenchConfig("expert", None), CoopBenchConfig("full", "full"),
           CoopBenchConfig("prefix_reuse", "prefix_reuse", {"store_bytes": 0})]
    for suffix, extra in [("", {})] + ([(f"/cap{max_kept}", {"max_kept": max_kept})] if max_kept is not None else []):
        settings = {**pruning, **extra}
        out += [CoopBenchConfig(f"{name}@{keep_ratio:g}{suffix}", name,
                                {**settings, **({"pruner": pruner} if name == "token_pruning" else {})})
                for name in PRUNING]
    for name in PRUNING:  # over a kept session: pruned history leaves the deep layers' caches once
        part = {**pruning, **({"pruner": pruner} if name == "token_pruning" else {})}
        out.append(CoopBenchConfig(f"reuse+{name}@{keep_ratio:g}", "composed", {
            "techniques": ["prefix_reuse", name], "part_settings": {"prefix_reuse": {"store_bytes": 0}, name: part}}))
    return tuple(out)


def check_decoding(decoding: str) -> str:
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    return decoding


def coop_jobs(configs: Sequence[CoopBenchConfig], episodes: int = EPISODES,
              team_sizes: Sequence[int] = TEAM_SIZES) -> list[Job]:
    return [Job(SUITE, c.name, f"K{k}", eval_seed(i), i)
            for i in range(episodes) for k in team_sizes for c in configs]


# --- the episode function (top level, plain-data arguments) ---------------------------------------------------------

def eval_config() -> CoopConfig:
    """The episode settings of every bench-coop job (`EVAL_CONFIG`: at most 20 rounds)."""
    return EVAL_CONFIG


_PLANNERS: dict[tuple, CoopPlanner] = {}


def _planner_for(model_dir: str, config: dict, decoding: str = "free") -> CoopPlanner:
    from thrifty.techniques import build

    key = (model_dir, config["technique"], json.dumps(config["settings"], sort_keys=True), decoding)
    if key not in _PLANNERS:
        planner = CoopPlanner.load(model_dir, build(config["technique"], **config["settings"]),
                                   constrained=check_decoding(decoding) == "constrained")
        for part in getattr(planner.technique, "parts", (planner.technique,)):
            if hasattr(part, "bind"):
                part.bind(planner.backbone)
        _PLANNERS[key] = planner
    return _PLANNERS[key]


def run_coop_job(job: Job, configs: dict[str, dict], model_dir: str, threads: int = 1,
                 decoding: str = "free") -> dict:
    """Play the episode `job` names: K from its level ("K4"), the configuration's technique (or the expert),
    the planner decoding greedily ("free") or inside the decision language ("constrained")."""
    from thrifty.agents.coop_expert import expert_decide

    torch.set_num_threads(threads)
    config = configs[job.config]
    n_robots = int(job.level[1:])
    if config["technique"] is None:
        result = run_coop_episode(expert_decide, n_robots, job.seed, eval_config())
        for key in ("final_context", "costs", "decisions"):
            result.pop(key, None)
    else:
        result = run_coop_planner_episode(_planner_for(model_dir, config, decoding), n_robots, job.seed,
                                          eval_config())
        result["decoding"] = decoding
    result["threads"] = threads
    return result


def coop_episode_fn(configs: Sequence[CoopBenchConfig], model_dir: str | Path = SHIPPED_COOP_PLANNER,
                    threads: int = 1, decoding: str = "free"):
    return partial(run_coop_job, configs={c.name: c.as_dict() for c in configs}, model_dir=str(model_dir),
                   threads=threads, decoding=check_decoding(decoding))
