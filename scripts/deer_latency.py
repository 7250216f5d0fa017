"""Per-step latency of the deer suite's policies on the same inputs, against their analytic FLOPs ratio.

    python scripts/deer_latency.py --data runs/demos_mt10_n03 [--policy DIR] [--steps 100] [--passes 5]
        [--config deer-full --config deer-r0.1 ...] [--out results/deer_latency.json]

The closed-loop suite times act() too, but each arm plays its own episodes on a shared machine. Here every arm acts
on the same recorded states (the first `steps` states of one demonstration episode per MT10 task), arms interleaved
pass by pass (a slow spell hits one pass of one arm), one thread, the first 3 steps of every episode left out; per
arm the median over passes of the pass's median step time. `latency_vs_flops` = (full / arm latency) / (full / arm
backbone FLOPs): 1 when time follows the layers run exactly; below 1, the fixed per-step work (embedding, head
peeks, Python) that exiting early does not remove.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    from thrifty.bench.policy_suites import POLICY_SUITES, build_policy, with_policy_path
    from thrifty.train.demos import DemoSet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--policy", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--reference", default="deer-full")
    ap.add_argument("--out", type=Path, default=Path("results/deer_latency.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    suite = with_policy_path(POLICY_SUITES["deer"], args.policy)
    configs = [c for c in suite.configs if args.config is None or c.name in args.config or c.name == args.reference]
    policies = {c.name: build_policy(c.as_dict()) for c in configs}
    demos = DemoSet(args.data)
    data = demos.arrays(names=("state", "task_id", "step"))
    from thrifty.envs.metaworld import INSTRUCTIONS, TASKS

    episodes = []
    for task in demos.tasks:
        rows = np.flatnonzero(data["task_id"] == TASKS.index(task))
        start = rows[data["step"][rows] == 0][0]
        episodes.append((task, data["state"][start:start + args.steps]))
    per_pass: dict[str, list[float]] = {name: [] for name in policies}
    flops: dict[str, dict] = {name: {"backbone": 0, "head": 0, "steps": 0} for name in policies}
    for p in range(args.passes):
        for name, policy in policies.items():
            times = []
            for task, states in episodes:
                policy.reset(task, INSTRUCTIONS[task])
                for i, s in enumerate(states):
                    t0 = time.perf_counter()
                    policy.act({"state": s})
                    if i >= 3:
                        times.append(time.perf_counter() - t0)
                if p == 0:
                    r = policy.episode_report()
                    flops[name]["backbone"] += r["backbone_flops_total"]
                    flops[name]["head"] += r["head_flops_total"]
                    flops[name]["steps"] += len(states)
            per_pass[name].append(statistics.median(times))
        print(f"pass {p + 1}: " + ", ".join(f"{n} {per_pass[n][-1] * 1e3:.3f} ms" for n in policies), flush=True)
    ref = args.reference
    rows = {}
    for name in policies:
        lat = statistics.median(per_pass[name])
        bb = flops[name]["backbone"] / flops[name]["steps"]
        hd = flops[name]["head"] / flops[name]["steps"]
        rows[name] = {"latency_median_s": lat, "latency_passes_s": per_pass[name], "backbone_flops_per_step": bb,
                      "head_flops_per_step": hd}
    for name, r in rows.items():
        r["latency_ratio"] = rows[ref]["latency_median_s"] / r["latency_median_s"]
        r["backbone_flops_ratio"] = rows[ref]["backbone_flops_per_step"] / r["backbone_flops_per_step"]
        r["flops_ratio_with_head"] = ((rows[ref]["backbone_flops_per_step"] + rows[ref]["head_flops_per_step"])
                                      / (r["backbone_flops_per_step"] + r["head_flops_per_step"]))
        r["latency_vs_flops"] = r["latency_ratio"] / r["backbone_flops_ratio"]
        print(f"{name:<20} {r['latency_median_s'] * 1e3:7.3f} ms  latency x{r['latency_ratio']:.2f}  "
              f"backbone FLOPs x{r['backbone_flops_ratio']:.2f}  latency/FLOPs {r['latency_vs_flops']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "threads": 1, "steps": args.steps,
                                    "passes": args.passes, "reference": ref, "arms": rows}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
