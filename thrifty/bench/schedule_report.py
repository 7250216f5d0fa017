"""Tables of a scheduled run's metrics, and the paired comparison of two schedules on the same jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thrifty.bench.results import ResultsFile
from thrifty.bench.workers import OUTCOME_FIELDS

__all__ = ["print_schedule_metrics", "compare_schedules", "print_comparison"]


def print_schedule_metrics(m: dict, console: Any, title: str | None = None) -> None:
    """One row per worker and one for the run: episodes, decisions, prefix hit rate, b_eff served / recomputed."""
    from rich.table import Table

    table = Table(title=title or f"schedule {m['schedule']} on {m['workers']} workers", caption=(
        f"{m['decisions_per_s']:.2f} decisions/s over {m['makespan_s']:.1f} s; queue wait mean "
        f"{m['queue_wait_mean_s']:.2f} s, max {m['queue_wait_max_s']:.2f} s; picks {m['picks']}; "
        f"eta_bw {m['eta_bw']:.3g} return/attention GFLOP; worker deaths {m['worker_deaths']}"))
    for col in ("worker", "episodes", "decisions", "prefix hit rate", "b_eff served (GFLOP)",
                "b_eff recomputed (GFLOP)", "success"):
        table.add_column(col, justify="right")
    rows = [(str(w), b) for w, b in enumerate(m["per_worker"])] + [("all", m)]
    for name, b in rows:
        table.add_row(name, str(b["episodes"]), str(b["decisions"]), f"{b['prefix_hit_rate']:.4f}",
                      f"{b['bw_served'] / 1e9:.3f}", f"{b['bw_recomputed'] / 1e9:.3f}", f"{b['success']:.3f}")
    console.print(table)


def _last_run(path: Path, suite: str) -> tuple[dict, dict]:
    rf = ResultsFile(path, suite)
    runs = rf.records("schedule_run")
    if not runs:
        raise ValueError(f"{path} has no schedule_run line: was it written by `thrifty bench --ray --schedule`?")
    eps = {(r["config"], r["level"], r["seed"]): r for r in rf.episodes()}
    return runs[-1], eps


def compare_schedules(a: str | Path, b: str | Path, suite: str) -> dict:
    """Pair two scheduled runs of the same jobs: their metrics side by side, and whether every episode's outcome
    and actions (`OUTCOME_FIELDS`) are identical."""
    ma, ea = _last_run(Path(a), suite)
    mb, eb = _last_run(Path(b), suite)
    if set(ea) != set(eb):
        raise ValueError(f"{a} and {b} hold different episodes ({len(ea)} and {len(eb)}): not paired")
    differ = [k for k in sorted(ea, key=str) if any(ea[k].get(f) != eb[k].get(f) for f in OUTCOME_FIELDS)]
    keys = ("prefix_hit_rate", "decisions_per_s", "makespan_s", "decisions", "bw_served", "bw_recomputed",
            "queue_wait_mean_s", "eta_bw", "success", "picks", "worker_deaths")
    return {"a": {"file": str(a), "schedule": ma["schedule"], **{k: ma[k] for k in keys},
                  "per_worker_hit_rate": [w["prefix_hit_rate"] for w in ma["per_worker"]]},
            "b": {"file": str(b), "schedule": mb["schedule"], **{k: mb[k] for k in keys},
                  "per_worker_hit_rate": [w["prefix_hit_rate"] for w in mb["per_worker"]]},
            "episodes": len(ea), "outcome_fields": list(OUTCOME_FIELDS),
            "identical_episodes": len(ea) - len(differ), "differing": [list(k) for k in differ],
            "decisions_per_s_ratio": ma["decisions_per_s"] / mb["decisions_per_s"] if mb["decisions_per_s"] else None}


def print_comparison(c: dict, console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"paired: {c['a']['schedule']} vs {c['b']['schedule']} on the same {c['episodes']} episodes",
              caption=f"identical outcomes and actions: {c['identical_episodes']} of {c['episodes']}")
    for col in ("schedule", "prefix hit rate", "per worker", "decisions/s", "makespan (s)",
                "b_eff recomputed (GFLOP)", "queue wait mean (s)", "success"):
        t.add_column(col, justify="right")
    for side in ("a", "b"):
        s = c[side]
        t.add_row(s["schedule"], f"{s['prefix_hit_rate']:.4f}", " ".join(f"{h:.3f}" for h in s["per_worker_hit_rate"]),
                  f"{s['decisions_per_s']:.2f}", f"{s['makespan_s']:.1f}", f"{s['bw_recomputed'] / 1e9:.3f}",
                  f"{s['queue_wait_mean_s']:.2f}", f"{s['success']:.3f}")
    console.print(t)
