"""Suites: named sets of configurations x levels x evaluation seeds, and the episode function that runs one job.

A configuration names a technique from the registry, its settings, and the replanning trigger. Later techniques
add their configurations here; `demo` is what `make demo` runs.

Every suite states how many distinct episodes its seeds must give per level (`Suite.min_distinct`, issue 23):
seeds can collapse onto the same episode (MemoryRecallS13's 40 give 2), and a figure over 40 seeds is then a
figure over 2 episodes. `Suite.check_distinct` resets the levels' envs on the suite's seeds (no model, fast) and
refuses a suite below its floor; tests/test_distinct_episodes.py runs it on every shipped suite and `thrifty bench`
before running one. Results count each distinct episode once (`thrifty.bench.report`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from thrifty.bench.results import Job
from thrifty.envs.babyai_text import LEVELS, episode_keys, eval_seed, level_id

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_PLANNER = ASSETS / "planner"
MEMORY_PLANNER = ASSETS / "memory_typed_planner"
"""The planner trained on MemoryVariedTyped (`thrifty train planner --levels MemoryVariedTyped`, see its card)."""
MEMORY_PRUNER = ASSETS / "memory_typed_pruner" / "model.safetensors"
RECALL_PLANNER = ASSETS / "memory_planner"
"""The planner trained on MemoryRecallS13, whose seeds are 2 episodes (kept for reference: `memory-recall`, `sched`)."""
RECALL_PRUNER = ASSETS / "memory_pruner" / "model.safetensors"
MEMORY_PRUNE_LAYERS = (0, 1, 2)
"""The memory suites' prune layers, those `MEMORY_PRUNER` and `RECALL_PRUNER` were trained for (see `memory`)."""


@dataclass(frozen=True)
class BenchConfig:
    name: str
    technique: str = "full"
    settings: dict[str, Any] = field(default_factory=dict)
    replan: str = "every_step"

    def as_dict(self) -> dict:
        return {"name": self.name, "technique": self.technique, "settings": dict(self.settings),
                "replan": self.replan}


class SeedsCollapseError(ValueError):
    """A suite's seeds give fewer distinct episodes on a level than the floor its definition states."""


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    configs: tuple[BenchConfig, ...]
    levels: tuple[str, ...] = tuple(LEVELS)
    episodes: int = 10
    """episodes per (config, level), on evaluation seeds eval_seed(0..episodes-1)"""
    max_steps: int | None = None
    """cap on environment steps per episode (None: each level's own limit)"""
    model: Path | None = None
    """the planner this suite runs by default (None: the shipped BabyAI planner); `--model` overrides it"""
    min_distinct: int | None = None
    """floor on the distinct episodes (`BabyAITextEnv.episode_key`) the suite's seeds give on each of its levels
    (None: every seed a distinct episode); `check_distinct` refuses a suite below it"""
    reference: str = "full"
    """the config every other one is paired with (success differences on the same episodes)"""

    def __post_init__(self):
        if self.episodes < 1:
            raise ValueError(f"suite {self.name!r}: episodes must be >= 1, got {self.episodes}")
        if self.min_distinct is not None and not 1 <= self.min_distinct <= self.episodes:
            raise ValueError(f"suite {self.name!r}: min_distinct must be in 1..{self.episodes} (its episodes per "
                             f"level), got {self.min_distinct}")

    @property
    def distinct_floor(self) -> int:
        """The distinct episodes per level this suite's seeds must give (`min_distinct`, default all of them)."""
        return self.episodes if self.min_distinct is None else self.min_distinct

    def distinct_episodes(self, levels: tuple[str, ...] | None = None) -> dict[str, int]:
        """Level -> how many distinct episodes the suite's seeds eval_seed(0..episodes-1) give there (by resetting
        the env only)."""
        seeds = [eval_seed(i) for i in range(self.episodes)]
        return {lv: len(set(episode_keys(lv, seeds))) for lv in (levels or self.levels)}

    def check_distinct(self, levels: tuple[str, ...] | None = None) -> dict[str, int]:
        """`distinct_episodes`, or `SeedsCollapseError` naming every level below `distinct_floor`."""
        counts = self.distinct_episodes(levels)
        low = {lv: n for lv, n in counts.items() if n < self.distinct_floor}
        if low:
            where = ", ".join(f"{n} on {lv}" for lv, n in low.items())
            raise SeedsCollapseError(
                f"suite {self.name!r}: its {self.episodes} seeds per level give only {where} distinct episodes, "
                f"below its floor of {self.distinct_floor} (Suite.min_distinct); its results would count the same "
                "episodes again and again. Use a level whose seeds vary, or state the honest floor with the reason")
        return counts

    def jobs(self, episodes: int | None = None, levels: tuple[str, ...] | None = None) -> list[Job]:
        n = self.episodes if episodes is None else episodes
        return [Job(self.name, c.name, lv, eval_seed(i), i)
                for c in self.configs for lv in (levels or self.levels) for i in range(n)]


def _reuse_with(pruning: str, keep_ratio: float) -> BenchConfig:
    """Prefix reuse composed with a pruning technique (pruned history leaves the deep-layer caches once)."""
    return BenchConfig(f"reuse+{pruning}", "composed", {"techniques": ["prefix_reuse", pruning],
                                                        "part_settings": {pruning: {"keep_ratio": keep_ratio}}})


REUSE = BenchConfig("prefix_reuse", "prefix_reuse")


def _reuse_exit(name: str, **exit_settings) -> BenchConfig:
    """Prefix reuse composed with early exit (DeeR-VLA) on the shipped planner's exit head."""
    return BenchConfig(name, "composed", {"techniques": ["prefix_reuse", "early_exit"],
                                          "part_settings": {"early_exit": exit_settings}})


EXIT_RATIO = 0.3
"""An aggressive early-exit budget (DeeR's exit ratio: a geometric target over the exits at layers 2..6)."""
DEMO_EXIT = {"exit_ratio": 1.0, "deep_kv": "propagate"}
"""The demo's early exit: a uniform target over layers 2..6 with state propagation, 4.1 layers per decision and
success within its interval of the full planner's in the `exits` suite (docs/planner_exits.md)."""

RANDOM_EXIT_DEPTHS = (2.52, 4.07, 5.47)
"""Mean layers per decision that r=0.3, r=1 and r=3 with propagation realised in the `exits` suite
(docs/planner_exits.md): the random-exit baseline is drawn at the same depths."""

PRUNING_KEEP = 0.6
"""The demo's keep setting: E-RECAP's compounding keep ratio at which the shipped planner's prefill does ~61% of the
full model's FLOPs (held-out contexts, `thrifty pruning-quality`), i.e. saves more than 30%."""
PRUNING_TECHNIQUES = ("token_pruning", "random_pruning", "recency_pruning", "sink_window")
"""The learned pruner and its three token-count-matched baselines (same kept count at every layer)."""


def _pruned(technique: str, keep_ratio: float, layers: tuple[int, ...] | None = None) -> BenchConfig:
    settings = {"keep_ratio": keep_ratio, **({"layers": list(layers)} if layers else {})}
    return BenchConfig(f"{technique}@{keep_ratio:g}", technique, settings)


def with_part_setting(configs: tuple[BenchConfig, ...], technique: str, key: str,
                      value: str | None) -> tuple[BenchConfig, ...]:
    """The configs with settings[key] = value for every `technique` part (alone or inside `composed`); unchanged
    when value is None. How --pruner and --exit-head point a suite at checkpoints made for another planner."""
    if not value:
        return configs
    out = []
    for c in configs:
        settings = json.loads(json.dumps(c.settings))
        if c.technique == technique:
            settings[key] = str(value)
        elif c.technique == "composed" and technique in settings.get("techniques", []):
            settings.setdefault("part_settings", {}).setdefault(technique, {})[key] = str(value)
        out.append(BenchConfig(c.name, c.technique, settings, c.replan))
    return tuple(out)


def with_pruner(configs: tuple[BenchConfig, ...], pruner: str | None) -> tuple[BenchConfig, ...]:
    """The configs with `pruner` (a checkpoint path) given to every token_pruning part; unchanged when None."""
    return with_part_setting(configs, "token_pruning", "pruner", pruner)


def uses_technique(configs: tuple[BenchConfig, ...], technique: str) -> bool:
    return any(c.technique == technique or technique in c.settings.get("techniques", []) for c in configs)


SUITES: dict[str, Suite] = {
    "demo": Suite("demo", "the shipped planner on BabyAI-Text: full model, prefix reuse, learned token pruning and "
                  "its count-matched baselines, reuse + token pruning, reuse + early exit",
                  (BenchConfig("full"), REUSE, *(_pruned(t, PRUNING_KEEP) for t in PRUNING_TECHNIQUES),
                   _reuse_with("token_pruning", PRUNING_KEEP), _reuse_exit("reuse+early_exit", **DEMO_EXIT)),
                  levels=("GoToLocal", "PickupLoc", "GoToObjMazeS4"), episodes=2, max_steps=48, min_distinct=2),
    # demo: 5 of its 7 configs recompute the context at every step, so it is kept to a few minutes on 2 cores by
    # 2 episodes per level, a 48-step cap (the expert needs at most ~50 steps on these levels) and no
    # PutNextLocal (the shipped planner solves none of it); the `pruning` suite runs all levels.
    "pruning": Suite("pruning", "E-RECAP token pruning swept over keep ratios, against random, recency and "
                     "sink+window pruning at the same token counts",
                     (BenchConfig("full"), *(_pruned("token_pruning", k) for k in (0.9, 0.8, 0.7, PRUNING_KEEP)),
                      *(_pruned(t, PRUNING_KEEP) for t in PRUNING_TECHNIQUES[1:])),
                     levels=("GoToLocal", "PickupLoc", "GoToObjMazeS4"), episodes=20, max_steps=64,
                     min_distinct=20),
    # pruning: PutNextLocal is left out because the shipped planner solves none of it (nothing to lose)
    # measured through prefix reuse: exact (same logits as full recompute, tests/test_prefix_reuse.py), 15x faster
    # exits (issue 16): DeeR-VLA's early exit on the planner, over exact prefix reuse (the full model's decisions at
    # reuse's cost) so that the difference is the exit alone; paired with prefix_reuse on the same episodes.
    "exits": Suite("exits", "DeeR-VLA early exit on the planner: exit ratios (average-compute budgets) and a "
                   "maximum layer (peak budget), against the full-depth planner, all over exact prefix reuse",
                   (REUSE, *(_reuse_exit(f"reuse+exit r={r:g}", exit_ratio=r) for r in (0.1, EXIT_RATIO, 1.0)),
                    _reuse_exit("reuse+exit max4", exit_ratio=None, max_layer=4),
                    _reuse_exit("reuse+exit max4 r=0.3", exit_ratio=EXIT_RATIO, max_layer=4),
                    *(_reuse_exit(f"reuse+exit r={r:g} propagate", exit_ratio=r, deep_kv="propagate")
                      for r in (EXIT_RATIO, 1.0, 3.0)),
                    _reuse_exit("reuse+exit r=3", exit_ratio=3.0),
                    # the random baseline at the depths the consistency criterion realised in closed loop
                    *(_reuse_exit(f"reuse+random exit {m:g} layers propagate", exit_ratio=None, mean_layers=m,
                                  criterion="random", deep_kv="propagate") for m in RANDOM_EXIT_DEPTHS)),
                   levels=("GoToLocal", "PickupLoc", "GoToObjMazeS4"), episodes=30, max_steps=64, min_distinct=30,
                   reference="prefix_reuse"),
    "planner": Suite("planner", "the shipped planner's success per level (README and card figures), measured "
                     "through exact prefix reuse", (REUSE,), episodes=30, min_distinct=30),
    "reuse": Suite("reuse", "prefix reuse: kept session, reuse + pruning, and the cross-episode store's byte budget",
                   (BenchConfig("full"), REUSE, _reuse_with("random_pruning", 0.7),
                    BenchConfig("random_pruning", "random_pruning", {"keep_ratio": 0.7}),
                    *(BenchConfig(f"store-only-{b // 2**10}KiB", "prefix_reuse",
                                  {"keep_session": False, "store_bytes": b}) for b in (2**18, 2**20, 2**22, 2**26))),
                   episodes=10, min_distinct=10),
    # memory: the level where old context decides the outcome (the cue, seen only in the start room, decides the
    # turn at the junction), with the planner and pruner trained for it; the BabyAI levels above need little beyond
    # the newest observations. MemoryVariedTyped's seeds are distinct episodes (100 of 100; docs/memory_level.md).
    # Prune layers 0, 1, 2 (not the depth default 1, 2, 3): layers 0-1 see the whole context and a planner can carry
    # the cue forward there, so pruning from layer 1 on can lose nothing whatever it keeps (docs/pruning_results.md).
    "memory": Suite("memory", "learned token pruning against random, recency and sink+window pruning at the same "
                    "token counts on MemoryVariedTyped, whose junction turn needs the start room's cue",
                    (BenchConfig("full"),
                     *with_pruner(tuple(_pruned(t, k, MEMORY_PRUNE_LAYERS)
                                        for k in (PRUNING_KEEP, 0.4, 0.2) for t in PRUNING_TECHNIQUES),
                                  str(MEMORY_PRUNER))),
                    levels=("MemoryVariedTyped",), episodes=100, model=MEMORY_PLANNER, min_distinct=95),
    # memory-recall: the suite's first level, kept for reference. MemoryRecallS13 fixes walls, start and junction,
    # so its 40 seeds are 2 episodes (key cue, ball cue): min_distinct=2, the honest floor, and the tables say so.
    "memory-recall": Suite("memory-recall", "the memory suite on MemoryRecallS13, its planner and pruner (its 40 "
                           "seeds are 2 distinct episodes)",
                           (BenchConfig("full"),
                            *with_pruner(tuple(_pruned(t, k, MEMORY_PRUNE_LAYERS)
                                               for k in (PRUNING_KEEP, 0.4, 0.2) for t in PRUNING_TECHNIQUES),
                                         str(RECALL_PRUNER))),
                           levels=("MemoryRecallS13",), episodes=40, model=RECALL_PLANNER, min_distinct=2),
    # sched (issue 20): episodes that share prefixes, for the scheduled Ray run (`--ray --schedule`): one mission,
    # MemoryS13's seeds repeat starts and episodes (39 distinct in 120) and MemoryRecallS13's 2 episodes repeat
    # throughout, so a worker that played an episode holds most of the next one's contexts (docs/scheduling.md).
    "sched": Suite("sched", "prefix reuse on seeds of one mission whose episodes share prefixes (MemoryS13, "
                   "MemoryRecallS13): what cache-affine scheduling across workers can keep",
                   (REUSE,), levels=("MemoryS13", "MemoryRecallS13"), episodes=60, model=RECALL_PLANNER,
                   max_steps=48, min_distinct=2),
    "replan": Suite("replan", "replanning at every step vs only when the observation changed",
                    (BenchConfig("full"), BenchConfig("full-on-change", replan="on_change")), episodes=20,
                    min_distinct=20),
}


class UnknownSuiteError(ValueError):
    pass


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        from thrifty.bench.policy_suites import POLICY_SUITES

        names = [*SUITES, "coop", *POLICY_SUITES]
        raise UnknownSuiteError(f"unknown suite {name!r}; available suites: {', '.join(names)}")
    return SUITES[name]


def check_configs(configs: tuple[BenchConfig, ...], model_dir: str | Path) -> None:
    """Build every config's technique and bind it to the model before any episode runs, so a pruner trained for
    another model (or bad settings) fails at once with its reason instead of midway through a suite."""
    from thrifty.backbones import HFDecoder
    from thrifty.techniques import build

    backbone = None
    for c in configs:
        technique = build(c.technique, **c.settings)
        for part in getattr(technique, "parts", (technique,)):
            if hasattr(part, "bind"):
                backbone = backbone or HFDecoder.load(model_dir)
                part.bind(backbone)


def check_levels(levels: list[str] | None) -> tuple[str, ...] | None:
    if not levels:
        return None
    for lv in levels:
        level_id(lv)  # raises UnknownLevelError naming the levels
    return tuple(levels)


# --- the episode function (top level and plain-data arguments, so Ray can ship it) --------------------------------

_PLANNERS: dict[tuple, Any] = {}


def _planner_for(model_dir: str, config: dict, level: str):
    """The planner of `config` in this process (loaded once) and the untimed warm-up decisions it made first."""
    from thrifty.agents.planner import TextPlanner, warm_up
    from thrifty.techniques import build

    key = (model_dir, config["technique"], json.dumps(config["settings"], sort_keys=True))
    if key not in _PLANNERS:
        technique = build(config["technique"], **config["settings"])
        planner = TextPlanner.load(model_dir, technique=technique)
        _PLANNERS[key] = planner, warm_up(planner, level)
    return _PLANNERS[key]


def run_job(job: Job, configs: dict[str, dict], model_dir: str, threads: int, max_steps: int | None = None) -> dict:
    """Play the episode `job` names with its configuration; returns the result dict. `warmup_decisions` says how
    many untimed decisions this configuration's planner made in this process before its first episode."""
    from thrifty.agents.planner import EpisodeConfig, run_episode

    torch.set_num_threads(threads)
    config = configs[job.config]
    planner, warmup = _planner_for(model_dir, config, job.level)
    result = run_episode(planner, job.level, job.seed, EpisodeConfig(replan=config["replan"], max_steps=max_steps))
    result["threads"] = threads
    result["warmup_decisions"] = warmup
    return result


def episode_fn(suite: Suite, model_dir: str | Path, threads: int | None = None, max_steps: int | None = None):
    """A picklable `job -> result` function for `run_jobs` (in-process or Ray)."""
    threads = threads or min(2, os.cpu_count() or 1)
    return partial(run_job, configs={c.name: c.as_dict() for c in suite.configs}, model_dir=str(model_dir),
                   threads=threads, max_steps=max_steps or suite.max_steps)
