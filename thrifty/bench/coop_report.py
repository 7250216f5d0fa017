"""What `thrifty bench-coop` reports from its results file: the table per (configuration, K), the paired comparison
with the full planner, and three plots.

- `summarize_coop` / `print_coop_table`: success with its 95% Wilson interval, context tokens per call, tokens per
  round, FLOPs per call (and its ratio to the same configuration's at the smallest K), FLOPs per round, the largest
  KV cache, latency and malformed outputs.
- `paired_coop` / `print_paired_coop`: every configuration against full on the same (K, seed) episodes: the seeds
  only full solves (lost) and only the configuration solves (gained), the difference with Tango's paired 95%
  interval (`thrifty.bench.paired`), and FLOPs per call over the seeds both solve. Means over all episodes mix in
  failing episodes, which run to the round limit with longer contexts; the paired cost does not.
- `coop_plots`: FLOPs per round against K, success against K, and FLOPs per call against the call's context length
  (every call of every episode, binned), where a token cap shows as a flatter slope.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from thrifty.bench.paired import paired_rows
from thrifty.bench.report import collapse_warning, distinct_groups, distinct_success, format_flops, wilson_interval

# --- summary and table ---------------------------------------------------------------------------------------------

COOP_ROW_FIELDS = ("config", "n_robots", "episodes", "distinct_episodes", "success", "success_lo", "success_hi",
                   "rounds", "tokens_per_call", "tokens_per_round", "flops_per_call", "flops_growth", "flops_per_round",
                   "kv_bytes_max", "latency_per_call_s", "malformed_per_call")


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarize_coop(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, K), configs in order of first appearance, K ascending. Success and its interval are over
    distinct episodes (`episode_key`, `thrifty.bench.report`)."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["config"], int(str(r["level"])[1:])), []).append(r)
    order = list(dict.fromkeys(r["config"] for r in records))
    rows = []
    for (config, k), eps in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        wins, n = distinct_success(eps)
        lo, hi = wilson_interval(wins, n)
        calls = sum(e["calls"] for e in eps)
        model = [e for e in eps if "flops_total" in e]
        flops_calls = sum(e["decisions"] for e in model)
        rows.append({
            "config": config, "n_robots": k, "episodes": len(eps), "distinct_episodes": len(distinct_groups(eps)),
            "success": wins / n if n else None,
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
    for name in ("config", "K", "episodes", "distinct", "success [95% CI]", "rounds", "tokens/call", "tokens/round",
                 "FLOPs/call", "x smallest K", "FLOPs/round", "KV cache max", "latency/call", "malformed"):
        table.add_column(name, justify="left" if name == "config" else "right", no_wrap=True)

    def num(v, spec):
        return "–" if v is None else format(v, spec)

    for r in rows:
        lat = r.get("latency_per_call_s")
        table.add_row(str(r["config"]), str(r["n_robots"]), str(r["episodes"]), str(r.get("distinct_episodes", "–")),
                      f"{r['success']:.2f} [{r['success_lo']:.2f}, {r['success_hi']:.2f}]", num(r["rounds"], ".1f"),
                      num(r["tokens_per_call"], ".0f"), num(r["tokens_per_round"], ".0f"),
                      format_flops(r["flops_per_call"]), num(r.get("flops_growth"), ".2f"),
                      format_flops(r["flops_per_round"]),
                      "–" if r.get("kv_bytes_max") is None else f"{r['kv_bytes_max'] / 2**20:.2f} MB",
                      "–" if lat is None else f"{lat * 1e3:.1f} ms", num(r["malformed_per_call"], ".1%"))
    console.print(table)
    warning = collapse_warning(rows, where="n_robots")
    if warning:
        console.print(f"[bold yellow]warning:[/] {warning}")
    return table


# --- paired with full -------------------------------------------------------------------------------------------------

def _team_size(record: Mapping[str, Any]) -> int:
    return int(str(record["level"])[1:])


def _flops_per_call(episodes: Sequence[Mapping[str, Any]]) -> float | None:
    calls = sum(e["decisions"] for e in episodes)
    return sum(e["flops_total"] for e in episodes) / calls if calls else None


def paired_coop(records: Sequence[Mapping[str, Any]], reference: str = "full") -> list[dict[str, Any]]:
    """One row per (configuration, K) other than `reference`, on the seeds both played at that K.

    Fields: pairs, both, reference_only (seeds lost), config_only (gained), difference [lo, hi] (config minus
    reference, Tango's interval); on the seeds both solve: flops_per_call of the configuration and of the
    reference, flops_ratio (config / reference); how cost per call grows with K, from the smallest K both
    solve something at: flops_growth / reference_growth (the ratio to it) and flops_per_robot /
    reference_flops_per_robot (FLOPs per call added per extra robot). [] without reference episodes."""
    sizes = sorted({_team_size(r) for r in records})
    order = list(dict.fromkeys(str(r["config"]) for r in records))
    by: dict[tuple[str, int], dict[Any, Mapping[str, Any]]] = {}
    for r in records:
        if r.get("success") is not None:
            by.setdefault((str(r["config"]), _team_size(r)), {})[r["seed"]] = r
    rows, first = [], {}
    for config in order:
        if config == reference:
            continue
        for k in sizes:
            mine, ref = by.get((config, k), {}), by.get((reference, k), {})
            if not mine or not ref:
                continue
            paired = paired_rows([*mine.values(), *ref.values()], reference)
            if not paired:
                continue
            row = {"config": config, "n_robots": k, **{f: v for f, v in paired[0].items() if f != "config"}}
            solved = [s for s in mine if s in ref and mine[s]["success"] and ref[s]["success"]
                      and "flops_total" in mine[s] and "flops_total" in ref[s]]
            cfg = _flops_per_call([mine[s] for s in solved])
            base = _flops_per_call([ref[s] for s in solved])
            row.update(flops_per_call=cfg, reference_flops_per_call=base,
                       flops_ratio=cfg / base if cfg and base else None)
            if cfg and base and config not in first:
                first[config] = (k, cfg, base)
            k0, cfg0, base0 = first.get(config, (None, None, None))
            grown = bool(cfg and base and k0 is not None and k > k0)
            row.update(flops_growth=cfg / cfg0 if cfg and cfg0 else None,
                       reference_growth=base / base0 if base and base0 else None,
                       flops_per_robot=(cfg - cfg0) / (k - k0) if grown else None,
                       reference_flops_per_robot=(base - base0) / (k - k0) if grown else None)
            rows.append(row)
    return rows


def print_paired_coop(rows: Sequence[Mapping[str, Any]], console: Any, title: str) -> None:
    """The paired rows as a rich table (nothing when there are none)."""
    if not rows:
        return
    from rich import box
    from rich.table import Table

    ref = rows[0]["reference"]
    table = Table(title=title, box=box.SIMPLE_HEAVY)
    for name in ("config", "K", "pairs", "distinct", f"lost (only {ref})", "gained", "difference [95% CI]",
                 f"FLOPs/call vs {ref}, both solve", "x smallest K", f"{ref} x smallest K", "added per robot",
                 f"{ref} added per robot"):
        table.add_column(name, justify="left" if name == "config" else "right", no_wrap=True)

    def num(v, spec):
        return "–" if v is None else format(v, spec)

    for r in rows:
        table.add_row(str(r["config"]), str(r["n_robots"]), str(r["pairs"]),
                      str(r.get("distinct_pairs", r["pairs"])), f"{r['reference_only']:g}", f"{r['config_only']:g}",
                      f"{r['difference']:+.2f} [{r['difference_lo']:+.2f}, {r['difference_hi']:+.2f}]",
                      num(r["flops_ratio"], ".0%"), num(r["flops_growth"], ".2f"), num(r["reference_growth"], ".2f"),
                      format_flops(r["flops_per_robot"]), format_flops(r["reference_flops_per_robot"]))
    console.print(table)


def _line(i: int) -> str:
    """Line style of the i-th configuration: matplotlib has 10 default colours, so the next ten are dashed."""
    return ("-", "--", ":")[min(i // 10, 2)]


# --- plots -------------------------------------------------------------------------------------------------------

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
                ax.plot(ks, [r["flops_per_round"] for r in pts], "o", color=f"C{i % 10}", linestyle=_line(i), label=c)
            else:
                ys = [r["success"] for r in pts]
                err = [[y - r["success_lo"] for r, y in zip(pts, ys)], [r["success_hi"] - y for r, y in zip(pts, ys)]]
                shift = (i - (len(configs) - 1) / 2) * 0.06  # spread the bars apart
                ax.errorbar([k + shift for k in ks], ys, yerr=err, fmt="o", capsize=3, color=f"C{i % 10}",
                            linestyle=_line(i), label=c)
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


def context_plot(records: Sequence[Mapping[str, Any]], out_prefix: str | Path, bin_tokens: int = 128) -> Path | None:
    """`<prefix>_context.png`: FLOPs per call against the call's context length, every call of every episode,
    averaged in bins of `bin_tokens` (bins with fewer than 5 calls are left out). Configurations without a model
    (the expert) are skipped; returns None when no episode has per-call FLOPs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points: dict[str, dict[int, list[float]]] = {}
    for r in records:
        calls = r.get("per_call")
        if not isinstance(calls, Mapping) or "flops" not in calls:
            continue
        bins = points.setdefault(str(r["config"]), {})
        for tokens, flops in zip(calls["context_tokens"], calls["flops"]):
            bins.setdefault(int(tokens) // bin_tokens, []).append(float(flops))
    if not points:
        return None
    fig = Figure(figsize=(7.0, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (config, bins) in enumerate(points.items()):
        kept = sorted(b for b, v in bins.items() if len(v) >= 5)
        ax.plot([(b + 0.5) * bin_tokens for b in kept], [statistics.fmean(bins[b]) / 1e9 for b in kept], "o",
                markersize=3, color=f"C{i % 10}", linestyle=_line(i), label=config)
    ax.set_xlabel(f"context tokens of the call (bins of {bin_tokens})")
    ax.set_ylabel("GFLOPs per call (mean)")
    ax.set_title("coop planner: compute per call vs shared-context length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_prefix)
    path = path.with_name(f"{path.name}_context.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
