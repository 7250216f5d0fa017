"""Per-decision latency of two runs of the same planner suite, paired on the same episodes (issue 22).

    .venv/bin/python scripts/compare_latency.py BEFORE.jsonl [BEFORE2.jsonl ...] --after AFTER.jsonl [AFTER2.jsonl ...]

Episodes are matched on (config, level, seed); their actions must be identical (the runtime changes are exact),
else the script says which differ and exits 1. With several files per side (repeated runs), each decision's wall
time is the median over them. Per config: the median of after/before over decisions (the first `warmup`
decisions of each episode left out, as the bench does), with a bootstrap 95% interval over episodes, and the
median decision latency of each side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict

import numpy as np


def load(paths: list[str]) -> dict[tuple, list[dict]]:
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for path in paths:
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("kind") == "episode" or ("config" in rec and "per_decision" in rec):
                    runs[(rec["config"], rec["level"], rec["seed"])].append(rec)
    return runs


def walls(recs: list[dict]) -> np.ndarray:
    """(decisions,) median over repeated runs of each decision's wall time, warm-up decisions dropped."""
    skip = recs[0].get("warmup_decisions", 0) or 0
    return np.median(np.array([r["per_decision"]["wall_s"] for r in recs]), axis=0)[skip:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", nargs="+")
    ap.add_argument("--after", nargs="+", required=True)
    ap.add_argument("--boot", type=int, default=2000)
    args = ap.parse_args()
    before, after = load(args.before), load(args.after)
    common = sorted(set(before) & set(after))
    if not common:
        print("no episode appears in both runs", file=sys.stderr)
        return 1
    differ = [k for k in common if any(r["actions"] != before[k][0]["actions"] for r in before[k] + after[k])]
    if differ:
        print(f"actions differ on {len(differ)} of {len(common)} episodes, e.g. {differ[:3]}", file=sys.stderr)
        return 1
    by_config: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for k in common:
        by_config[k[0]].append((walls(before[k]), walls(after[k])))
    rng = np.random.default_rng(0)
    print(f"{len(common)} episodes paired, identical actions in every run "
          f"({len(args.before)} before / {len(args.after)} after file(s))")
    print(f"{'config':<32} {'episodes':>8} {'decisions':>9} {'before ms':>10} {'after ms':>9} "
          f"{'after/before':>12} {'95% CI':>16}")
    for config, pairs in by_config.items():
        ratios = [a / b for b_, a_ in pairs for b, a in zip(b_, a_)]
        per_ep = [np.median(a_ / b_) for b_, a_ in pairs]
        boot = [np.median(rng.choice(per_ep, len(per_ep))) for _ in range(args.boot)]
        lo, hi = np.quantile(boot, [0.025, 0.975])
        b_ms = 1e3 * statistics.median(float(x) for b_, _ in pairs for x in b_)
        a_ms = 1e3 * statistics.median(float(x) for _, a_ in pairs for x in a_)
        print(f"{config:<32} {len(pairs):>8} {len(ratios):>9} {b_ms:>10.2f} {a_ms:>9.2f} "
              f"{statistics.median(ratios):>12.3f} [{lo:.3f}, {hi:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
