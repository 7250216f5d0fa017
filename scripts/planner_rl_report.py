"""Curves and a table of planner-RL runs (`thrifty train planner-rl`) from their metrics files.

    python scripts/planner_rl_report.py NAME=runs/planner_rl_x/metrics.jsonl [...] [--out results/planner_rl.png]

Plots each run's validation success (greedy, on validation seeds) and its rollout success (sampled, a moving mean
over 8 iterations) against environment steps, and prints per run: iterations, episodes, env steps, wall time, the
first and last validation, the best validation, and the mean of the last three validations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="NAME=path/to/metrics.jsonl")
    ap.add_argument("--out", type=Path, default=Path("results/planner_rl.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    table = []
    for spec in args.runs:
        if "=" not in spec:
            sys.exit(f"give each run as NAME=path/to/metrics.jsonl, got {spec!r}")
        name, path = spec.rsplit("=", 1)
        rows = load(Path(path))
        val = [r for r in rows if r.get("val_success") is not None]
        axes[0].plot([r["env_steps"] for r in val], [r["val_success"] for r in val], "o-", ms=3, label=name)
        roll = [r for r in rows if r.get("success") is not None]
        mean = [sum(x["success"] for x in roll[max(0, i - 7):i + 1]) / len(roll[max(0, i - 7):i + 1])
                for i in range(len(roll))]
        axes[1].plot([r["env_steps"] for r in roll], mean, label=name)
        last = rows[-1]
        vs = [r["val_success"] for r in val]
        table.append({"run": name, "iterations": last["iteration"], "episodes": last["episodes"],
                      "env_steps": last["env_steps"], "wall_s": last["wall_s"], "val_first": vs[0],
                      "val_last": vs[-1], "val_best": max(vs), "val_last3_mean": sum(vs[-3:]) / len(vs[-3:])})
    axes[0].set_title("validation success (greedy)")
    axes[1].set_title("rollout success (sampled, mean of 8 iterations)")
    for ax in axes:
        ax.set_xlabel("environment steps")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("| run | iterations | episodes | env steps | wall s | validation: first | last | best | mean of last 3 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['run']} | {t['iterations']} | {t['episodes']} | {t['env_steps']} | {t['wall_s']:.0f} | "
              f"{t['val_first']:.3f} | {t['val_last']:.3f} | {t['val_best']:.3f} | {t['val_last3_mean']:.3f} |")
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
