"""Summaries of episode records: per-config table, summary JSON and a success-vs-FLOPs Pareto plot.

Distinct episodes (issue 23). Two seeds can give the same episode (MemoryRecallS13's 40 evaluation seeds give 2), and
a deterministic configuration then replays it: counting both as evidence overstates it. Every episode record
carries `episode_key`, a hash of its initial state and mission (`thrifty.envs.seeds.episode_key`), and a
configuration's success is computed over its *distinct* episodes: the records of one key are one episode, scoring
the mean success of its records (1 or 0 for a deterministic configuration; a fraction for a random one, e.g. random
pruning solving one of its two replays scores 0.5). `success` is the mean of those scores, and its 95% Wilson
interval has n = the number of distinct episodes and the summed scores as successes. A record without
`episode_key` (results written before it existed, or suites that do not set it) is its own distinct episode, so
such results are summarized exactly as before. Rows report `episodes` (records) and `distinct_episodes`;
`collapse_warning` (printed under every table) names the rows whose seeds collapsed.
"""

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
    "distinct_groups",
    "distinct_success",
    "collapse_warning",
    "EPISODE_KEY",
    "summarize",
    "print_table",
    "latency_note",
    "pareto_plot",
    "pareto_figure",
    "pareto_front",
    "dodge",
    "write_summary_json",
    "format_flops",
    "ROW_FIELDS",
]

#: Fields of every row returned by :func:`summarize`, in table order.
ROW_FIELDS = (
    "config",
    "level",
    "episodes",
    "distinct_episodes",
    "success",
    "success_lo",
    "success_hi",
    "steps",
    "decisions",
    "tokens_per_decision",
    "flops_per_decision",
    "layers_per_decision",
    "latency_median_s",
    "peak_rss_mb",
    "kv_mb",
    "prefix_hit_rate",
    "efficiency_vs_full",
)

_MB = float(2**20)

EPISODE_KEY = "episode_key"
"""The field of an episode record that identifies its episode (initial state and mission)."""


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(0.0, 1.0)`` when ``n == 0``. `successes` may be
    fractional (summed per-episode scores over distinct episodes, module doc): the interval at that proportion."""
    if n < 0 or successes < 0 or successes > n + 1e-9:
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


def distinct_groups(episodes: Iterable[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The records grouped by `episode_key`, in order of first appearance; a record without one (None or missing)
    is a group of its own."""
    groups: dict[tuple[str, Any], list[Mapping[str, Any]]] = {}
    for i, ep in enumerate(episodes):
        key = ep.get(EPISODE_KEY)
        groups.setdefault(("key", key) if key is not None else ("row", i), []).append(ep)
    return list(groups.values())


def distinct_success(episodes: Iterable[Mapping[str, Any]]) -> tuple[float, int]:
    """``(score, n)``: n distinct episodes among the records that report `success`, and the sum over them of each
    one's mean success (a record succeeds when its `success` is > 0.5). ``(0.0, 0)`` without any."""
    scored = [e for e in episodes if _num(e, "success") is not None]
    groups = distinct_groups(scored)
    score = sum(sum(_num(e, "success") > 0.5 for e in g) / len(g) for g in groups)
    return float(score), len(groups)


def collapse_warning(rows: Sequence[Mapping[str, Any]], where: str = "level") -> str | None:
    """The rows whose seeds gave fewer distinct episodes than records, one clause per (`where` field, records,
    distinct), or None: "MemoryRecallS13: 40 seeds gave 2 distinct episodes (13 configs: full, ...)"."""
    collapsed: dict[tuple[Any, Any, Any], list[str]] = {}
    for r in rows:
        n, d = r.get("episodes"), r.get("distinct_episodes")
        if n is not None and d is not None and d < n:
            collapsed.setdefault((r.get(where), n, d), []).append(str(r.get("config")))
    if not collapsed:
        return None
    lines = []
    for (level, n, d), configs in collapsed.items():
        names = ", ".join(configs[:3]) + (", ..." if len(configs) > 3 else "")
        place = "all levels" if level == "all" else str(level) if where == "level" else f"{where} {level}"
        lines.append(f"{place}: {n} seeds gave {d} distinct episodes ({len(configs)} config"
                     f"{'s' if len(configs) > 1 else ''}: {names})")
    return ("seeds collapse, so success and its interval count each distinct episode once: " + "; ".join(lines))


def _row(config: Any, level: Any, eps: list[Mapping[str, Any]]) -> dict[str, Any]:
    def vals(field: str) -> list[float]:
        return [x for x in (_num(e, field) for e in eps) if x is not None]

    score, n = distinct_success(eps)
    if n:
        rate: float | None = score / n
        lo, hi = wilson_interval(score, n)
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
    # layers run per decision (early exit), pooled the same way
    layer_pairs = [(x, d) for e in eps if (x := _num(e, "exit_layer_mean")) is not None
                   and (d := _num(e, "decisions")) is not None]
    layer_dec = sum(d for _, d in layer_pairs)
    layers_per_decision = sum(x * d for x, d in layer_pairs) / layer_dec if layer_dec > 0 else None

    prompt, cached = vals("prompt_tokens_total"), vals("cached_tokens_total")
    hit_rate = sum(cached) / sum(prompt) if prompt and sum(prompt) > 0 else None  # token-weighted
    wall = vals("wall_median_s")
    rss = vals("peak_rss_bytes")
    kv = vals("kv_bytes_max")
    return {
        "config": config,
        "level": level,
        "episodes": len(eps),
        "distinct_episodes": len(distinct_groups(eps)),
        "success": rate,
        "success_lo": lo,
        "success_hi": hi,
        "steps": _mean(vals("steps")),
        "decisions": _mean(vals("decisions")),
        "tokens_per_decision": _mean(vals("tokens_context_mean")),
        "flops_per_decision": flops_per_decision,
        "layers_per_decision": layers_per_decision,
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
    rows = [_row(config, level, eps) for (config, level), eps in groups.items()]
    full = {r["level"]: r for r in rows if r["config"] == "full"}
    for r in rows:
        r["efficiency_vs_full"] = efficiency(full.get(r["level"]), r)
    return rows


def efficiency(full: Mapping[str, Any] | None, row: Mapping[str, Any]) -> float | None:
    """Measured speedup over the full model divided by the FLOPs ratio (issue 22): 1.0 when a technique's latency
    falls exactly as its FLOPs do, below 1 when fixed costs per decision (Python, masks, copies, one pass per
    decoded token) eat the saving. None without a full row or a latency and FLOPs on both."""
    keys = ("latency_median_s", "flops_per_decision")
    if full is None or any(not full.get(k) or not row.get(k) for k in keys):
        return None
    speedup = full["latency_median_s"] / row["latency_median_s"]
    return speedup / (full["flops_per_decision"] / row["flops_per_decision"])


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


def latency_note(episodes: Iterable[Mapping[str, Any]]) -> str:
    """The footnote saying what the latency column measures, and whether one-off warm-up costs are left out
    (episodes record `warmup_decisions`: untimed decisions their planner made in its process beforehand)."""
    warm = [_num(e, "warmup_decisions") or 0 for e in episodes]
    note = ("latency p50: median of the episodes' median decision wall times; speedup/FLOPs: full's latency over "
            "this one's, divided by full's FLOPs over this one's (1.00: the time falls as the work does)")
    if not warm:
        return note
    cold = sum(1 for w in warm if w <= 0)
    if cold == 0:
        return f"{note}; warm-up left out ({int(min(warm))} untimed decisions per configuration and process first)"
    return (f"{note}; {cold} of {len(warm)} episodes ran without a warm-up (older results): theirs include one-off "
            "first-call costs")


def print_table(rows: Sequence[Mapping[str, Any]], console: Any = None, title: str = "thrifty benchmark",
                caption: str | None = None):
    """Print the rows as a rich table (to ``console``; default stdout, 160 columns when not a terminal), with
    `caption` (e.g. `latency_note`) under it and, when seeds collapsed, the `collapse_warning`.

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
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAVY)
    table.add_column("config", style="bold")
    if show_level:
        table.add_column("level")
    for name in (
        "episodes",
        "distinct",
        "success [95% CI]",
        "steps",
        "decisions",
        "tokens/dec",
        "FLOPs/dec",
        "layers/dec",
        "latency p50",
        "peak RSS",
        "KV cache",
        "prefix hits",
        "speedup/FLOPs",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        cells = [str(r.get("config"))]
        if show_level:
            cells.append(str(r.get("level")))
        lat = r.get("latency_median_s")
        cells += [
            str(r.get("episodes", "–")),
            str(r.get("distinct_episodes", "–")),
            _fmt_success(r),
            _fmt(r.get("steps"), ".1f"),
            _fmt(r.get("decisions"), ".1f"),
            _fmt(r.get("tokens_per_decision"), ".0f"),
            format_flops(r.get("flops_per_decision")),
            _fmt(r.get("layers_per_decision"), ".2f"),
            "–" if lat is None else f"{lat * 1e3:.1f} ms",
            "–" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f} MB",
            "–" if r.get("kv_mb") is None else f"{r['kv_mb']:.2f} MB",
            "–" if r.get("prefix_hit_rate") is None else f"{r['prefix_hit_rate']:.1%}",
            "–" if r.get("efficiency_vs_full") is None else f"{r['efficiency_vs_full']:.2f}",
        ]
        table.add_row(*cells)
    console.print(table)
    warning = collapse_warning(rows)
    if warning:
        console.print(f"[bold yellow]warning:[/] {warning}")
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


_MARKERS = "osD^vPXph<>*"
_TIE_TOLERANCE = 0.06
"""Points of one panel with the same success and FLOPs within 10**0.06 (15%) of each other count as coinciding."""
_TIE_STEP = 0.04
"""Vertical spacing (success units) between coinciding points, so each stays visible."""


def _short_flops(x: float) -> str:
    """Axis label for a FLOPs figure: 200M, 1G, 5G."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def dodge(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Plotted y of points (flops, success): coinciding points (same success, FLOPs within 15%, chained) are spread
    symmetrically about their true success, `_TIE_STEP` apart, in the given order; the others keep their y."""
    out = [float(y) for y in ys]
    order = sorted(range(len(xs)), key=lambda i: (ys[i], math.log10(xs[i])))
    groups: list[list[int]] = []
    for i in order:
        last = groups[-1][-1] if groups else None
        if last is not None and ys[last] == ys[i] and math.log10(xs[i]) - math.log10(xs[last]) <= _TIE_TOLERANCE:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        for k, i in enumerate(sorted(group)):
            out[i] += (k - (len(group) - 1) / 2) * _TIE_STEP
    return out


def pareto_figure(rows: Sequence[Mapping[str, Any]], title: str = "thrifty benchmark"):
    """The figure `pareto_plot` saves (a matplotlib `Figure`, not registered with pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    usable = [
        r
        for r in rows
        if r.get("success") is not None and r.get("flops_per_decision") is not None and r["flops_per_decision"] > 0
    ]
    levels = list(dict.fromkeys(r.get("level") for r in usable)) or ["all"]
    configs = list(dict.fromkeys(r.get("config") for r in usable))
    style = {c: (f"C{j % 10}", _MARKERS[j % len(_MARKERS)]) for j, c in enumerate(configs)}
    ncol = 2 if len(levels) == 4 else min(3, len(levels))
    nrow = (len(levels) + ncol - 1) // ncol
    fig = Figure(figsize=(4.2 * ncol + 2.4, 3.6 * nrow + 0.7), dpi=120)
    FigureCanvasAgg(fig)
    handles: dict[str, Any] = {}
    for i, level in enumerate(levels):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        pts = [r for r in usable if r.get("level") == level]
        xs = [float(r["flops_per_decision"]) for r in pts]
        ys = [float(r["success"]) for r in pts]
        for r, x, y, shown in zip(pts, xs, ys, dodge(xs, ys)):
            lo = y - r["success_lo"] if r.get("success_lo") is not None else 0.0
            hi = r["success_hi"] - y if r.get("success_hi") is not None else 0.0
            color, marker = style[r.get("config")]
            handles[str(r.get("config"))] = ax.errorbar(
                [x], [shown], yerr=[[max(0.0, lo)], [max(0.0, hi)]], fmt=marker, color=color, ecolor=color,
                elinewidth=1, capsize=3, markersize=7, markeredgecolor="white", markeredgewidth=0.6, zorder=3)
        front = pareto_front(zip(xs, ys))
        if front:  # a staircase from the cheapest point, flat to the costliest one
            fx, fy = zip(*front, (max(xs), front[-1][1]))
            (handles["Pareto front"],) = ax.step(fx, fy, where="post", color="0.35", alpha=0.7, linestyle="--",
                                                 zorder=1)
        if pts:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short_flops(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
            lo_x, hi_x = min(xs), max(xs)
            ax.set_xlim(lo_x / 1.3, hi_x * 1.3)
        else:
            ax.text(0.5, 0.5, "no rows with success and FLOPs", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylim(-0.1, 1.1)
        ax.set_title("all levels" if level == "all" else str(level), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if i % ncol == 0:
            ax.set_ylabel("success (95% Wilson interval)")
        if i >= len(levels) - ncol:
            ax.set_xlabel("FLOPs per decision")
    if handles:  # the Pareto front last
        labels = [k for k in handles if k != "Pareto front"] + [k for k in handles if k == "Pareto front"]
        fig.legend([handles[k] for k in labels], labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    note = (f"coinciding points (same success, FLOPs within 15%) are drawn {_TIE_STEP:g} apart about their "
            "success; the front uses the true values")
    fig.text(0.01, 0.005, note, fontsize=7, color="0.4", ha="left", va="bottom")
    right = 1 - 2.4 / (4.2 * ncol + 2.4) if handles else 1.0
    fig.tight_layout(rect=(0, 0.03, right, 0.96))
    return fig


def pareto_plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "thrifty benchmark") -> Path:
    """Save a PNG of success rate (95% Wilson bars) against FLOPs per decision (log x).

    One panel per level (rows of level "all": a panel "all levels"); each configuration has its own marker and
    colour, the same in every panel, and one legend entry (no text labels on the points). Each panel draws its
    Pareto front (max success, min FLOPs) as a dashed step line. Coinciding points (same success, FLOPs within
    15%) are spread a few hundredths apart vertically so every point can be read; the front uses the true values.
    Rows without a positive FLOPs figure or a success rate are left out. Does not touch pyplot's global state.
    """
    path = Path(path)
    fig = pareto_figure(rows, title)
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
