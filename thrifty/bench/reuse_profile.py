"""Decision latency and FLOPs against the decision step: full recompute vs prefix reuse (vs reuse with pruning).

Protocol (DESIGN.md "Measuring"):
1. one forced-length trajectory: the expert (BabyAIBot) plays `level` from `seed` for exactly `steps` steps; an
   expert action that would end the episode is replaced by a seeded random move that does not (tried on a copy of
   the environment), so the context keeps growing for all `steps` decisions;
2. every arm replays the same trajectory: at each step the planner decides over the same context (its output is
   ignored; the trajectory's action is appended, as in a replanning agent whose action was overridden), so all
   arms see identical inputs and a stateful arm (reuse) pays its real rollbacks;
3. each arm plays the trajectory `warmup` times (discarded) then `repeats` times, each time with a fresh technique
   (no prefix store carried between repeats), arms interleaved replay by replay so that load on the machine hits
   them alike; per step the median wall time over the repeats is kept, with the analytic FLOPs (deterministic)
   and the tokens served from cache;
4. the torch thread count is fixed and recorded.

Output: a JSON file (per arm: per-step medians; summary at the report steps: latency, speedup vs "full", FLOPs,
hit rate) and a plot (latency and FLOPs against the decision step, one line per arm).

Example:
    profile_reuse(model_dir, out_dir="results/reuse_profile", steps=64, report_steps=(16, 32, 64),
                  arms=default_arms("random_pruning", keep_ratio=0.7))
"""

from __future__ import annotations

import copy
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv, eval_seed

DEFAULT_ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "prefix_reuse": ("prefix_reuse", {}),
}
"""arm name -> (technique name, settings); `default_arms(pruning)` adds a pruning technique alone and composed."""


@dataclass
class Trajectory:
    level: str
    seed: int
    mission: str
    observations: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    forced: int = 0
    """expert actions replaced because they would have ended the episode"""


def forced_trajectory(level: str, seed: int, steps: int, rng_seed: int = 0) -> Trajectory:
    """The expert's play of `level` from `seed` for exactly `steps` steps (never ending early; see module doc)."""
    env = BabyAITextEnv(level, max_steps=steps + 10)
    obs, info = env.reset(seed=seed)
    rng = random.Random(rng_seed)
    traj = Trajectory(level, seed, info["mission"])
    for _ in range(steps):
        traj.observations.append(obs)
        choices = [env.expert_action()] + rng.sample(["left", "right", "forward"], 3)
        for i, action in enumerate(choices):
            trial = copy.deepcopy(env)
            _, _, terminated, truncated, _ = trial.step(ACTIONS.index(action))
            trial.close()
            if not (terminated or truncated):
                break
        else:
            raise RuntimeError(f"every move ends {level} seed {seed} at step {len(traj.actions)}")
        traj.forced += i > 0
        obs, _, terminated, truncated, _ = env.step(ACTIONS.index(action))
        traj.actions.append(action)
    env.close()
    return traj


def _play(planner, traj: Trajectory) -> list[dict[str, Any]]:
    """One replay of the trajectory: per decision, wall time, FLOPs, context and reused tokens."""
    from thrifty.agents.planner import PlannerContext

    planner.reset()
    ctx = PlannerContext(planner.tokenizer)
    ctx.start(traj.mission)
    out = []
    for step, (obs, action) in enumerate(zip(traj.observations, traj.actions)):
        ctx.add_observation(obs)
        _, rec = planner.decide(ctx, seed=traj.seed * 1000 + step)
        out.append({"wall_s": rec.wall_s, "flops": rec.flops, "tokens_context": rec.tokens_context,
                    "prefix_tokens_reused": rec.prefix_tokens_reused, "kv_per_layer": rec.kv_per_layer})
        ctx.add_action(action)
    return out


def _arm_result(technique_name: str, settings: dict[str, Any], runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-step medians of one arm over its timed replays."""
    first = runs[0]
    return {
        "technique": technique_name,
        "settings": settings,
        "wall_median_s": [statistics.median(r[s]["wall_s"] for r in runs) for s in range(len(first))],
        "wall_all_s": [[round(r[s]["wall_s"], 6) for r in runs] for s in range(len(first))],
        "flops": [d["flops"] for d in first],
        "tokens_context": [d["tokens_context"] for d in first],
        "prefix_tokens_reused": [d["prefix_tokens_reused"] for d in first],
        "kv_per_layer": [d["kv_per_layer"] for d in first],
    }


def default_arms(pruning: str | None = "random_pruning", keep_ratio: float = 0.7) -> dict[str, tuple[str, dict]]:
    """`DEFAULT_ARMS`, plus `pruning` alone and composed with prefix reuse (history settling) when given."""
    arms = dict(DEFAULT_ARMS)
    if pruning:
        settings = {"keep_ratio": keep_ratio}
        arms[pruning] = (pruning, settings)
        arms[f"prefix_reuse+{pruning}"] = ("composed", {"techniques": ["prefix_reuse", pruning],
                                                         "part_settings": {pruning: settings}})
    return arms


def summarize_profile(arms: dict[str, dict[str, Any]], report_steps: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per (arm, report step): median latency, speedup and FLOPs ratio against "full", their quotient
    (`efficiency_vs_full`: speedup / (full's FLOPs / the arm's)), hit rate so far."""
    base = arms.get("full")
    rows = []
    for name, arm in arms.items():
        for step in report_steps:
            i = step - 1  # step k is the k-th decision
            if i >= len(arm["wall_median_s"]):
                continue
            ctx_sum = sum(arm["tokens_context"][: i + 1])
            row = {"arm": name, "step": step, "tokens_context": arm["tokens_context"][i],
                   "latency_median_s": arm["wall_median_s"][i], "flops": arm["flops"][i],
                   "prefix_hit_rate": sum(arm["prefix_tokens_reused"][: i + 1]) / ctx_sum if ctx_sum else 0.0}
            if base is not None:
                row["speedup_vs_full"] = base["wall_median_s"][i] / arm["wall_median_s"][i]
                row["flops_vs_full"] = arm["flops"][i] / base["flops"][i]
                # measured speedup over the FLOPs ratio: 1.0 when time falls as the work does (issue 22)
                row["efficiency_vs_full"] = row["speedup_vs_full"] * row["flops_vs_full"]
            rows.append(row)
    return rows


def plot_profile(arms: dict[str, dict[str, Any]], report_steps: tuple[int, ...], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4))
    for name, arm in arms.items():
        steps = list(range(1, len(arm["wall_median_s"]) + 1))
        ax_t.plot(steps, [w * 1e3 for w in arm["wall_median_s"]], label=name)
        ax_f.plot(steps, [f / 1e9 for f in arm["flops"]], label=name)
    for ax in (ax_t, ax_f):
        for s in report_steps:
            ax.axvline(s, color="0.85", lw=0.8, zorder=0)
        ax.set_xlabel("decision step")
        ax.set_yscale("log")
        ax.legend()
    ax_t.set_ylabel("decision latency, median (ms)")
    ax_f.set_ylabel("analytic GFLOPs per decision")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def profile_reuse(model_dir: str | Path, out_dir: str | Path = "results/reuse_profile", level: str = "GoToObjMazeS4",
                  seed_index: int = 0, steps: int = 64, report_steps: tuple[int, ...] = (16, 32, 64),
                  warmup: int = 1, repeats: int = 3, threads: int = 1,
                  arms: dict[str, tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Run the protocol for every arm; write `profile.json` and `profile.png` under out_dir; return the result."""
    from thrifty.agents.planner import TextPlanner
    from thrifty.techniques import build

    if max(report_steps) > steps:
        raise ValueError(f"report steps {report_steps} go beyond the {steps} steps played")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    torch.set_num_threads(threads)
    arms = dict(arms or DEFAULT_ARMS)
    traj = forced_trajectory(level, eval_seed(seed_index), steps)
    planner = TextPlanner.load(model_dir)
    t0 = time.perf_counter()
    runs: dict[str, list] = {name: [] for name in arms}
    for i in range(warmup + repeats):  # arms interleaved, so that load on the machine hits them alike
        for name, (tech, settings) in arms.items():
            planner.technique = build(tech, **settings)  # fresh: nothing cached from an earlier replay
            played = _play(planner, traj)
            if i >= warmup:
                runs[name].append(played)
    results = {name: _arm_result(tech, settings, runs[name]) for name, (tech, settings) in arms.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_profile(results, report_steps)
    doc = {
        "protocol": {"level": level, "seed": traj.seed, "steps": steps, "forced_actions": traj.forced,
                     "warmup": warmup, "repeats": repeats, "threads": torch.get_num_threads(),
                     "max_new_tokens": planner.max_new_tokens, "model": str(model_dir),
                     "machine": platform.machine(), "torch": torch.__version__,
                     "elapsed_s": round(time.perf_counter() - t0, 1)},
        "summary": summary,
        "arms": results,
    }
    (out_dir / "profile.json").write_text(json.dumps(doc, indent=1))
    plot_profile(results, report_steps, out_dir / "profile.png",
                 f"{level}, forced {steps}-step episode, {torch.get_num_threads()} thread(s), median of {repeats}")
    return doc
