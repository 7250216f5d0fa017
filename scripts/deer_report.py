"""The DeeR figures of issue 16 from a `thrifty bench deer` results file: success (paired with full depth), average
backbone FLOPs per step and its reduction, peak FLOPs and loaded weights, measured latency against the FLOPs ratio.

    python scripts/deer_report.py results/deer.jsonl [--out results/deer_report.json] [--reference deer-full]

Per configuration, pooled over every step of every episode: backbone FLOPs per step (decoder layers run, analytic),
head FLOPs per step (observation projection + every head peek; DeeR leaves them out), mean layers run and the exit
distribution; the peak: the largest backbone FLOPs of any step; loaded weights (all, and the decoder's); latency:
the median over episodes of each episode's median act() time (warm-up steps left out). Ratios are full / config.
`latency_vs_flops` = latency ratio / backbone FLOPs ratio (the issue asks >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from thrifty.bench import ResultsFile  # noqa: E402
from thrifty.bench.paired import paired_rows  # noqa: E402
from thrifty.bench.report import distinct_success, wilson_interval  # noqa: E402


def config_row(eps: list[dict]) -> dict:
    steps = sum(e["steps"] for e in eps)
    k, n = distinct_success(eps)
    lo, hi = wilson_interval(k, n)
    counts = [sum(x) for x in zip(*(e["exit_counts"] for e in eps))]
    layers = eps[0]["exit_layers"]
    return {"episodes": len(eps), "distinct_episodes": n, "success": k / n if n else None, "success_lo": lo,
            "success_hi": hi, "steps": steps,
            "backbone_flops_per_step": sum(e["backbone_flops_total"] for e in eps) / steps,
            "head_flops_per_step": sum(e["head_flops_total"] for e in eps) / steps,
            "flops_per_step": sum(e["flops_total"] for e in eps) / steps,
            "peak_backbone_flops_step": max(e["backbone_flops_max_step"] for e in eps),
            "loaded_weight_bytes": max(e["loaded_weight_bytes"] for e in eps),
            "loaded_backbone_bytes": max(e["loaded_backbone_bytes"] for e in eps),
            "layers_built": eps[0]["layers_built"],
            "mean_layers": sum(c * l for c, l in zip(counts, layers)) / steps,
            "exit_distribution": {str(l): round(c / steps, 4) for c, l in zip(counts, layers)},
            "latency_p50_s": statistics.median(e["wall_median_s"] for e in eps),
            "threads": sorted({e.get("threads") for e in eps})}


def report(path: Path, reference: str) -> dict:
    eps = [e for e in ResultsFile(path, "deer").episodes() if "backbone_flops_total" in e]
    by_config: dict[str, list[dict]] = {}
    for e in eps:
        by_config.setdefault(e["config"], []).append(e)
    if reference not in by_config:
        raise SystemExit(f"{path} has no {reference!r} episodes to compare with; it has {sorted(by_config)}")
    rows = {c: config_row(v) for c, v in by_config.items()}
    ref = rows[reference]
    for c, r in rows.items():
        r["backbone_flops_ratio"] = ref["backbone_flops_per_step"] / r["backbone_flops_per_step"]
        r["flops_ratio_with_head"] = ref["flops_per_step"] / r["flops_per_step"]
        r["peak_flops_ratio"] = ref["peak_backbone_flops_step"] / r["peak_backbone_flops_step"]
        r["loaded_weight_ratio"] = ref["loaded_weight_bytes"] / r["loaded_weight_bytes"]
        r["loaded_backbone_ratio"] = ref["loaded_backbone_bytes"] / r["loaded_backbone_bytes"]
        r["latency_ratio"] = ref["latency_p50_s"] / r["latency_p50_s"]
        r["latency_vs_flops"] = r["latency_ratio"] / r["backbone_flops_ratio"] if c != reference else None
    for p in paired_rows(eps, reference=reference):
        rows[p["config"]]["paired"] = {k: v for k, v in p.items() if k != "config"}
    per_task = {}
    for e in eps:
        per_task.setdefault(e["config"], {}).setdefault(e["level"], []).append(e["success"])
    for c, tasks in per_task.items():
        rows[c]["success_per_task"] = {t: round(sum(v) / len(v), 3) for t, v in tasks.items()}
    return {"results": str(path), "reference": reference, "configs": rows}


def plot(rep: dict, path: Path) -> Path:
    """Success (95% Wilson bars) against average backbone FLOPs per step, and against the peak step's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate((("backbone_flops_per_step", "average backbone FLOPs per step"),
                                      ("peak_backbone_flops_step", "peak backbone FLOPs (largest step)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, (c, r) in enumerate(rep["configs"].items()):
            y = r["success"]
            ax.errorbar([r[key]], [y], yerr=[[y - r["success_lo"]], [r["success_hi"] - y]], fmt="osD^vP*Xh<>"[j % 11],
                        color=f"C{j % 10}", capsize=3, label=c)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("MT10 success (95% CI)")
        ax.grid(True, which="both", alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("DeeR on Meta-World MT10")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reference", default="deer-full")
    args = ap.parse_args()
    rep = report(args.results, args.reference)
    out = args.out or args.results.with_name(args.results.stem + "_report.json")
    out.write_text(json.dumps(rep, indent=2) + "\n")
    head = (f"{'config':<18} {'eps':>4} {'success [95% CI]':>20} {'vs full [95% CI]':>24} {'layers':>6} "
            f"{'bb MFLOP':>9} {'ratio':>6} {'head kF':>8} {'peak r':>7} {'mem r':>6} {'lat ms':>7} {'lat r':>6} "
            f"{'lat/fl':>6}")
    print(head)
    for c, r in rep["configs"].items():
        p = r.get("paired")
        diff = "–" if not p else (f"{p['difference']:+.3f} [{p['difference_lo']:+.3f}, {p['difference_hi']:+.3f}]"
                                  if "difference" in p else "?")
        lvf = "–" if r["latency_vs_flops"] is None else f"{r['latency_vs_flops']:.2f}"
        print(f"{c:<18} {r['episodes']:>4} {r['success']:.3f} [{r['success_lo']:.2f}, {r['success_hi']:.2f}] "
              f"{diff:>24} {r['mean_layers']:>6.2f} {r['backbone_flops_per_step'] / 1e6:>9.2f} "
              f"{r['backbone_flops_ratio']:>6.2f} {r['head_flops_per_step'] / 1e3:>8.1f} {r['peak_flops_ratio']:>7.2f} "
              f"{r['loaded_weight_ratio']:>6.2f} {r['latency_p50_s'] * 1e3:>7.3f} {r['latency_ratio']:>6.2f} {lvf:>6}")
    print(f"report: {out}\nplot: {plot(rep, out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
