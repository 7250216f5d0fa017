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
(mean over episodes), latency per call (median) and malformed outputs per call. Plots: FLOPs per round against K,
success against K.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from thrifty.agents.coop import CoopConfig, run_coop_episode
from thrifty.agents.coop_planner import (COOP_PROTECT, EVAL_CONFIG, SHIPPED_COOP_PLANNER, SHIPPED_COOP_PRUNER,
                                         CoopPlanner, run_coop_planner_episode)
from thrifty.bench.report import format_flops, wilson_interval
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
episodes; the README's 8-episode run (288, constrained decoding) took 12 min on one core with the shipped planner."""


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


# --- summary, table, plots -------------------------------------------------------------------------------------------

COOP_ROW_FIELDS = ("config", "n_robots", "episodes", "success", "success_lo", "success_hi", "rounds",
                   "tokens_per_call", "tokens_per_round", "flops_per_call", "flops_growth", "flops_per_round",
                   "kv_bytes_max", "latency_per_call_s", "malformed_per_call")


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarize_coop(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, K), configs in order of first appearance, K ascending."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["config"], int(str(r["level"])[1:])), []).append(r)
    order = list(dict.fromkeys(r["config"] for r in records))
    rows = []
    for (config, k), eps in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        wins = sum(bool(e["success"]) for e in eps)
        lo, hi = wilson_interval(wins, len(eps))
        calls = sum(e["calls"] for e in eps)
        model = [e for e in eps if "flops_total" in e]
        flops_calls = sum(e["decisions"] for e in model)
        rows.append({
            "config": config, "n_robots": k, "episodes": len(eps), "success": wins / len(eps),
            "success_lo": lo, "success_hi": hi, "rounds": _mean([e["rounds"] for e in eps]),
            "tokens_per_call": _mean([e["context_tokens_mean"] for e in eps if e.get("context_tokens_mean")]),
            "tokens_per_round": _mean([e["tokens_per_round_mean"] for e in eps if e.get("tokens_per_round_mean")]),
            "flops_per_call": sum(e["flops_total"] for e in model) / flops_calls if flops_calls else None,
            "flops_per_round": _mean([e["flops_per_round"] for e in model]),
            "kv_bytes_max": _mean([e["kv_bytes_max"] for e in model if e.get("kv_bytes_max")]),
            "latency_per_call_s": statistics.median(e["wall_median_s"] for e in model) if model else None,
            "malformed_per_call": sum(e["malformed"] for e in eps) / calls if calls else None,
        })
    base: dict[str, float] = {}  # FLOPs per call at the config's smallest K (rows are K-ascending per config)
    for row in rows:
        fpc = row["flops_per_call"]
        if fpc and row["config"] not in base:
            base[row["config"]] = fpc
        row["flops_growth"] = fpc / base[row["config"]] if fpc and row["config"] in base else None
    return rows


def print_coop_table(rows: Sequence[Mapping[str, Any]], console: Any = None, title: str = "thrifty bench-coop"):
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)
    table = Table(title=title, box=box.SIMPLE_HEAVY)
    for name in ("config", "K", "episodes", "success [95% CI]", "rounds", "tokens/call", "tokens/round",
                 "FLOPs/call", "x smallest K", "FLOPs/round", "KV cache max", "latency/call", "malformed"):
        table.add_column(name, justify="left" if name == "config" else "right", no_wrap=True)

    def num(v, spec):
        return "–" if v is None else format(v, spec)

    for r in rows:
        lat = r.get("latency_per_call_s")
        table.add_row(str(r["config"]), str(r["n_robots"]), str(r["episodes"]),
                      f"{r['success']:.2f} [{r['success_lo']:.2f}, {r['success_hi']:.2f}]", num(r["rounds"], ".1f"),
                      num(r["tokens_per_call"], ".0f"), num(r["tokens_per_round"], ".0f"),
                      format_flops(r["flops_per_call"]), num(r.get("flops_growth"), ".2f"),
                      format_flops(r["flops_per_round"]),
                      "–" if r.get("kv_bytes_max") is None else f"{r['kv_bytes_max'] / 2**20:.2f} MB",
                      "–" if lat is None else f"{lat * 1e3:.1f} ms", num(r["malformed_per_call"], ".1%"))
    console.print(table)
    return table


def coop_plots(rows: Sequence[Mapping[str, Any]], out_prefix: str | Path) -> tuple[Path, Path]:
    """Two PNGs: `<prefix>_flops.png` (FLOPs per round vs K, log y) and `<prefix>_success.png` (success vs K,
    95% Wilson bars). Does not touch pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_prefix = Path(out_prefix)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    paths = []
    for what in ("flops", "success"):
        fig = Figure(figsize=(7.0, 4.6), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for i, c in enumerate(configs):
            pts = [r for r in rows if r["config"] == c]
            ks = [r["n_robots"] for r in pts]
            if what == "flops":
                if all(r["flops_per_round"] is None for r in pts):
                    continue
                ax.plot(ks, [r["flops_per_round"] for r in pts], "o-", color=f"C{i % 10}", label=c)
            else:
                ys = [r["success"] for r in pts]
                err = [[y - r["success_lo"] for r, y in zip(pts, ys)], [r["success_hi"] - y for r, y in zip(pts, ys)]]
                shift = (i - (len(configs) - 1) / 2) * 0.06  # spread the bars apart
                ax.errorbar([k + shift for k in ks], ys, yerr=err, fmt="o-", capsize=3, color=f"C{i % 10}", label=c)
        ax.set_xlabel("robots K")
        ax.set_xticks(sorted({r["n_robots"] for r in rows}))
        if what == "flops":
            ax.set_yscale("log")
            ax.set_ylabel("FLOPs per round (K calls)")
            ax.set_title("coop planner: compute per round vs team size")
        else:
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("success (95% Wilson interval)")
            ax.set_title("coop planner: success vs team size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_prefix.with_name(f"{out_prefix.name}_{what}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        paths.append(path)
    return paths[0], paths[1]
