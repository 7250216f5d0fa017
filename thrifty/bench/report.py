"""Summaries of episode records: per-config table, summary JSON and a success-vs-FLOPs Pareto plot."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "wilson_interval",
    "summarize",
    "print_table",
    "pareto_plot",
    "pareto_front",
    "write_summary_json",
    "format_flops",
    "ROW_FIELDS",
]

#: Fields of every row returned by :func:`summarize`, in table order.
ROW_FIELDS = (
    "config",
    "level",
    "episodes",
    "success",
    "success_lo",
    "success_hi",
    "steps",
    "decisions",
    "tokens_per_decision",
    "flops_per_decision",
    "latency_median_s",
    "peak_rss_mb",
    "kv_mb",
    "prefix_hit_rate",
)

_MB = float(2**20)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(0.0, 1.0)`` when ``n == 0``."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def _num(ep: Mapping[str, Any], field: str) -> float | None:
    """The episode's numeric ``field``, or None if missing, null, non-numeric or NaN."""
    v = ep.get(field)
    if v is None or isinstance(v, (str, bytes, list, dict)):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _row(config: Any, level: Any, eps: list[Mapping[str, Any]]) -> dict[str, Any]:
    def vals(field: str) -> list[float]:
        return [x for x in (_num(e, field) for e in eps) if x is not None]

    succ = vals("success")
    if succ:
        k = sum(1 for s in succ if s > 0.5)
        rate: float | None = k / len(succ)
        lo, hi = wilson_interval(k, len(succ))
    else:
        rate, lo, hi = None, None, None

    # FLOPs per decision pools all decisions of the episodes that report both fields.
    flops_sum = dec_sum = 0.0
    pooled = False
    for e in eps:
        f, d = _num(e, "flops_total"), _num(e, "decisions")
        if f is not None and d is not None:
            flops_sum += f
            dec_sum += d
            pooled = True
    flops_per_decision = flops_sum / dec_sum if pooled and dec_sum > 0 else None

    prompt, cached = vals("prompt_tokens_total"), vals("cached_tokens_total")
    hit_rate = sum(cached) / sum(prompt) if prompt and sum(prompt) > 0 else None  # token-weighted
    wall = vals("wall_median_s")
    rss = vals("peak_rss_bytes")
    kv = vals("kv_bytes_max")
    return {
        "config": config,
        "level": level,
        "episodes": len(eps),
        "success": rate,
        "success_lo": lo,
        "success_hi": hi,
        "steps": _mean(vals("steps")),
        "decisions": _mean(vals("decisions")),
        "tokens_per_decision": _mean(vals("tokens_context_mean")),
        "flops_per_decision": flops_per_decision,
        "latency_median_s": statistics.median(wall) if wall else None,
        "peak_rss_mb": max(rss) / _MB if rss else None,
        "kv_mb": _mean(kv) / _MB if kv else None,
        "prefix_hit_rate": hit_rate,
    }


def summarize(episodes: Iterable[Mapping[str, Any]], by_level: bool = False) -> list[dict[str, Any]]:
    """One row per config (per config and level if ``by_level``), in order of first appearance.

    Rows have the fields :data:`ROW_FIELDS`; ``level`` is ``"all"`` unless ``by_level``.
    A metric no episode of the group reports is None.
    """
    groups: dict[tuple[Any, Any], list[Mapping[str, Any]]] = {}
    for ep in episodes:
        level = ep.get("level") if by_level else "all"
        groups.setdefault((ep.get("config"), level), []).append(ep)
    return [_row(config, level, eps) for (config, level), eps in groups.items()]


# ---------------------------------------------------------------------- formatting
def format_flops(x: float | None) -> str:
    """Human FLOPs: ``"1.23 GFLOPs"``, ``"456 MFLOPs"``, ..."""
    if x is None:
        return "–"
    for scale, unit in ((1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
        if abs(x) >= scale:
            return f"{_sig3(x / scale)} {unit}"
    return f"{_sig3(x)} FLOPs"


def _sig3(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, spec)


def _fmt_success(row: Mapping[str, Any]) -> str:
    s, lo, hi = row.get("success"), row.get("success_lo"), row.get("success_hi")
    if s is None:
        return "–"
    if lo is None or hi is None:
        return f"{s:.2f}"
    return f"{s:.2f} [{lo:.2f}, {hi:.2f}]"


def print_table(rows: Sequence[Mapping[str, Any]], console: Any = None, title: str = "thrifty benchmark"):
    """Print the rows as a rich table (to ``console``; default stdout, 160 columns when not a terminal).

    Returns the :class:`rich.table.Table`.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    show_level = any(r.get("level") != "all" for r in rows)
    table = Table(title=title, box=box.SIMPLE_HEAVY)
    table.add_column("config", style="bold")
    if show_level:
        table.add_column("level")
    for name in (
        "episodes",
        "success [95% CI]",
        "steps",
        "decisions",
        "tokens/dec",
        "FLOPs/dec",
        "latency p50",
        "peak RSS",
        "KV cache",
        "prefix hits",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        cells = [str(r.get("config"))]
        if show_level:
            cells.append(str(r.get("level")))
        lat = r.get("latency_median_s")
        cells += [
            str(r.get("episodes", "–")),
            _fmt_success(r),
            _fmt(r.get("steps"), ".1f"),
            _fmt(r.get("decisions"), ".1f"),
            _fmt(r.get("tokens_per_decision"), ".0f"),
            format_flops(r.get("flops_per_decision")),
            "–" if lat is None else f"{lat * 1e3:.1f} ms",
            "–" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f} MB",
            "–" if r.get("kv_mb") is None else f"{r['kv_mb']:.2f} MB",
            "–" if r.get("prefix_hit_rate") is None else f"{r['prefix_hit_rate']:.1%}",
        ]
        table.add_row(*cells)
    console.print(table)
    return table


# ---------------------------------------------------------------------- outputs
def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points ``(flops, success)`` not dominated by one with no more FLOPs and more success, by FLOPs."""
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto_plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "thrifty benchmark") -> Path:
    """Save a PNG of success rate (95% Wilson bars) against FLOPs per decision (log x).

    One labelled point per row; the Pareto front (max success, min FLOPs) is drawn as a
    step line, separately per level when the rows are per level. Rows without a positive
    FLOPs figure or a success rate are left out. Does not touch pyplot's global state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    usable = [
        r
        for r in rows
        if r.get("success") is not None and r.get("flops_per_decision") is not None and r["flops_per_decision"] > 0
    ]
    levels = list(dict.fromkeys(r.get("level") for r in usable))
    colors = [f"C{i % 10}" for i in range(len(levels))]
    for level, color in zip(levels, colors):
        pts = [r for r in usable if r.get("level") == level]
        xs = [float(r["flops_per_decision"]) for r in pts]
        ys = [float(r["success"]) for r in pts]
        lo = [max(0.0, y - (r.get("success_lo") if r.get("success_lo") is not None else y)) for r, y in zip(pts, ys)]
        hi = [max(0.0, (r.get("success_hi") if r.get("success_hi") is not None else y) - y) for r, y in zip(pts, ys)]
        label = None if level == "all" else f"level {level}"
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, ecolor=color, capsize=3, label=label)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(str(r.get("config")), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front = pareto_front(zip(xs, ys))
        if front:
            fx, fy = zip(*front)
            ax.step(fx, fy, where="post", color=color, alpha=0.6, linestyle="--",
                    label="Pareto front" if level == "all" else f"Pareto front ({level})")

    if usable:
        ax.set_xscale("log")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no rows with success and FLOPs", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("FLOPs per decision")
    ax.set_ylabel("success rate (95% Wilson interval)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_summary_json(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write the rows as a JSON list (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump([dict(r) for r in rows], fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
