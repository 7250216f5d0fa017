"""Where the time of one planner decision goes (issue 22): a breakdown by phase and by operator.

Replays `profile-reuse`'s forced trajectory (the expert on GoToObjMazeS4, evaluation seed 0) through prefix reuse
up to decision STEP, then times that decision's phases REPEATS times on a fresh replay each:
  context  building the context ids (`PlannerContext.add_observation`)
  session  `technique.open_session` (the kept session and the new tokens' start)
  prefill  `Session.extend` of the new tokens, with the drafted first tokens (`Session.extend_with_draft`)
  decode   `Session.decode`: a model pass per decoded token but a drafted one and the final stop
  parse    `tokenizer.decode` of the output
and, under torch.profiler, the operators of the last repeat's decision (self CPU time, top 25). With the
analytic FLOPs of each phase, the table shows which part is arithmetic and which is fixed cost.

    .venv/bin/python scripts/profile_decision.py [--step 64] [--repeats 5] [--threads 1] [--technique prefix_reuse]
        [--out results/decision_breakdown.json]

Time it on a quiet machine (nothing else heavy running).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from thrifty.agents.planner import PlannerContext, TextPlanner
from thrifty.bench import SHIPPED_PLANNER
from thrifty.bench.reuse_profile import forced_trajectory
from thrifty.cost import forward_flops
from thrifty.envs.babyai_text import eval_seed
from thrifty.techniques import DecisionContext, build


def _timed_decision(planner: TextPlanner, ctx: PlannerContext, obs: str, seed: int, times: dict) -> list:
    """One decision, as `TextPlanner.decide` makes it, with each phase timed into `times` (lists of seconds);
    returns [(phase, works)] for the FLOPs."""
    t0 = time.perf_counter()
    ctx.add_observation(obs)
    ids = torch.tensor(ctx.ids, dtype=torch.long)
    dctx = DecisionContext(token_ids=ids, spans=dict(ctx.spans), seed=seed)
    t1 = time.perf_counter()
    session, new_from = planner.technique.open_session(planner.backbone, dctx)
    hook = planner.technique.prefill_hook(dctx, planner.backbone.n_layers, new_from)
    drafts = planner._recent_first[:planner.draft_width] if planner.draft and hook is None else []
    t2 = time.perf_counter()
    if drafts:
        pre = session.extend_with_draft(ids[new_from:], drafts)
    else:
        pre = session.extend(ids[new_from:], logits="last", layer_hook=hook)
    t3 = time.perf_counter()
    decode_from = session.next_position - int(bool(pre.draft_accepted))
    out = session.decode(planner.max_new_tokens, stop_ids=planner.stop_ids)  # a right draft: no pass
    t4 = time.perf_counter()
    planner.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    planner.technique.close_session(session, dctx, decode_from)
    t5 = time.perf_counter()
    for name, dt in (("context", t1 - t0), ("session", t2 - t1), ("prefill", t3 - t2), ("decode", t4 - t3),
                     ("parse", t5 - t4)):
        times.setdefault(name, []).append(dt)
    times.setdefault("decode passes", []).append(len(out.works))
    times.setdefault("drafts", []).append(len(drafts))
    return [("prefill", pre.works, 1 + pre.draft_rows)] + [(f"decode pass {i + 1}", w, 1)
                                                          for i, w in enumerate(out.works)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHIPPED_PLANNER))
    ap.add_argument("--level", default="GoToObjMazeS4")
    ap.add_argument("--step", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--technique", default="prefix_reuse")
    ap.add_argument("--out", default="results/decision_breakdown.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    traj = forced_trajectory(args.level, eval_seed(0), args.step)
    planner = TextPlanner.load(args.model)
    times: dict[str, list[float]] = {}
    phases = []
    for r in range(args.repeats + 1):  # the first replay warms up and is not kept
        planner.technique = build(args.technique)
        planner.reset()
        ctx = PlannerContext(planner.tokenizer)
        ctx.start(traj.mission)
        for step, (obs, action) in enumerate(zip(traj.observations[:-1], traj.actions)):
            ctx.add_observation(obs)
            planner.decide(ctx, seed=step)
            ctx.add_action(action)
        kept: dict[str, list[float]] = {}
        if r == args.repeats:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                phases = _timed_decision(planner, ctx, traj.observations[-1], args.step - 1, kept)
        else:
            phases = _timed_decision(planner, ctx, traj.observations[-1], args.step - 1, kept)
        if r:
            for k, v in kept.items():
                times.setdefault(k, []).extend(v)
    shape = planner.backbone.shape
    flops = {name: forward_flops(shape, works, n_logits=rows) for name, works, rows in phases}
    rows = []
    for name in ("decode passes", "drafts"):
        print(f"  {name}: {times.pop(name)}")
    for name, ts in times.items():
        med = statistics.median(ts)
        f = flops.get(name) if name in flops else (sum(v for k, v in flops.items() if k.startswith("decode"))
                                                   if name == "decode" else None)
        rows.append({"phase": name, "median_ms": round(med * 1e3, 3), "flops": f,
                     "gflop_per_s": round(f / med / 1e9, 2) if f else None})
    total = sum(statistics.median(times[k]) for k in ("context", "session", "prefill", "decode", "parse"))
    print(f"decision {args.step} of {args.level} ({args.technique}, {args.threads} thread(s)), "
          f"context {len(ctx.ids)} tokens, median of {args.repeats}: {total * 1e3:.2f} ms")
    for row in rows:
        print(f"  {row['phase']:>16}: {row['median_ms']:8.3f} ms"
              + (f"  {row['flops'] / 1e6:9.1f} MFLOPs  {row['gflop_per_s']:6.2f} GFLOP/s" if row["flops"] else ""))
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(ops)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "context_tokens": len(ctx.ids), "total_ms": total * 1e3,
                               "phases": rows, "operators_last_repeat": ops}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
