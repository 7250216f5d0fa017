"""Policy suite summaries: a table per task and overall, and success against FLOPs per step.

Rows pool a configuration's episodes (per task, or over all tasks): success with its 95% Wilson interval over
distinct episodes (rows sharing an `episode_key`, the same initial state and instruction, count once, scored by
their mean success; `thrifty.bench.report.distinct_success`), the number of distinct episodes, mean
steps, FLOPs per step (all steps pooled), latency per step p50 and p90 (the medians over episodes of each episode's
p50 and p90, warm-up steps left out: `thrifty.agents.policy.WARMUP_STEPS`), peak resident memory, the largest
state/KV the policy carried, and the invalid actions clipped. Overall rows also give success relative to the
reference configuration (the expert), the ratio of the two pooled success rates.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from thrifty.bench.report import collapse_warning, distinct_success, format_flops, wilson_interval


def _vals(eps, field):
    return [float(e[field]) for e in eps if isinstance(e.get(field), (int, float))]


def summarize_policy(episodes: Iterable[Mapping[str, Any]], by_task: bool = True,
                     reference: str | None = "expert") -> list[dict[str, Any]]:
    groups: dict[tuple, list] = {}
    for e in episodes:
        groups.setdefault((e.get("config"), e.get("level") if by_task else "all"), []).append(e)
    rows = []
    for (config, task), eps in groups.items():
        n = len(eps)
        k, distinct = distinct_success(eps)
        lo, hi = wilson_interval(k, distinct)
        steps = sum(_vals(eps, "steps"))
        p50, p90, rss, kv = (_vals(eps, f) for f in ("wall_median_s", "wall_p90_s", "peak_rss_bytes", "kv_bytes_max"))
        rows.append({"config": config, "task": task, "episodes": n, "distinct_episodes": distinct,
                     "success": k / distinct if distinct else None,
                     "success_lo": lo, "success_hi": hi, "steps": steps / n if n else None,
                     "flops_per_step": sum(_vals(eps, "flops_total")) / steps if steps else None,
                     "latency_p50_s": statistics.median(p50) if p50 else None,
                     "latency_p90_s": statistics.median(p90) if p90 else None,
                     "peak_rss_mb": max(rss) / 2**20 if rss else None, "state_kb": max(kv) / 2**10 if kv else None,
                     "invalid_actions": int(sum(_vals(eps, "invalid_actions")))})
    if reference:
        ref = {r["task"]: r["success"] for r in rows if r["config"] == reference}
        for r in rows:
            base = ref.get(r["task"])
            r["relative_to_reference"] = r["success"] / base if base else None
    return rows


def print_policy_table(rows: Sequence[Mapping[str, Any]], console, title: str) -> None:
    from rich import box
    from rich.table import Table

    show_task = any(r["task"] != "all" for r in rows)
    table = Table(title=title, box=box.SIMPLE_HEAVY)
    cols = ["config", *(["task"] if show_task else []), "episodes", "distinct", "success [95% CI]", "vs expert", "steps",
            "FLOPs/step", "latency p50", "p90", "peak RSS", "state/KV", "invalid"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("config", "task") else "right", no_wrap=True)

    def ms(x):
        return "–" if x is None else f"{x * 1e3:.3f} ms"

    for r in rows:
        rel = r.get("relative_to_reference")
        cells = [str(r["config"]), *([str(r["task"])] if show_task else []), str(r["episodes"]),
                 str(r.get("distinct_episodes", r["episodes"])),
                 f"{r['success']:.2f} [{r['success_lo']:.2f}, {r['success_hi']:.2f}]",
                 "–" if rel is None else f"{rel:.2f}", f"{r['steps']:.1f}",
                 format_flops(r["flops_per_step"]) if r["flops_per_step"] else "0 (rules)",
                 ms(r["latency_p50_s"]), ms(r["latency_p90_s"]),
                 "–" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} MB",
                 "–" if not r["state_kb"] else f"{r['state_kb']:.1f} KiB", str(r["invalid_actions"])]
        table.add_row(*cells)
    console.print(table)
    warning = collapse_warning(rows, where="task")
    if warning:
        console.print(f"[yellow]warning: {warning}[/yellow]")


def policy_plot(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Success (95% Wilson bars) against FLOPs per step, one marker and legend entry per configuration; a policy
    without FLOPs (the scripted expert) is a dashed horizontal line. Per-task rows get one panel per task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    ncol = min(5, len(tasks))
    nrow = (len(tasks) + ncol - 1) // ncol
    fig = Figure(figsize=(3.2 * ncol + 1.5, 2.8 * nrow + 0.6), dpi=110)
    FigureCanvasAgg(fig)
    markers = "osD^vP*Xh<>"
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for j, config in enumerate(configs):
            r = next((r for r in rows if r["task"] == task and r["config"] == config), None)
            if r is None:
                continue
            color = f"C{j % 10}"
            if not r["flops_per_step"]:
                ax.axhline(r["success"], color=color, linestyle="--", label=f"{config} (no FLOPs)")
                continue
            y = r["success"]
            ax.errorbar([r["flops_per_step"]], [y], yerr=[[y - r["success_lo"]], [r["success_hi"] - y]],
                        fmt=markers[j % len(markers)], color=color, capsize=3, label=config)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if i % ncol == 0:
            ax.set_ylabel("success (95% CI)")
        if i >= len(tasks) - ncol:
            ax.set_xlabel("FLOPs per step")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.85 if ncol > 1 else 0.7, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
