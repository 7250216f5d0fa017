"""`thrifty simulate-schedule` and `thrifty compare-schedules`: the scheduler at scale (simulated from a recorded
trace) and two scheduled runs of the same jobs paired (docs/scheduling.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from thrifty.cli._app import app, comma_list, console, fail


@app.command("simulate-schedule")
def simulate_schedule(
    trace: Path = typer.Option(..., help="trace of a real run (`thrifty bench SUITE --ray --schedule ... "
                                         "--trace-out FILE`)"),
    workers: str = typer.Option("2,8,64,1024", help="simulated worker counts, comma-separated"),
    seed: int = typer.Option(0, help="seed of the workload draw, the submission order and `random`"),
    jobs_per_worker: int = typer.Option(8, min=1, help="jobs per simulated worker (at least the trace's episodes)"),
    store_bytes: Optional[int] = typer.Option(None, help="cache budget per worker (default: the traced run's)"),
    w_b: float = typer.Option(1.0, help="bandwidth schedule: weight of b_eff (seconds)"),
    w_q: float = typer.Option(1.0, help="bandwidth schedule: weight of the wait (seconds)"),
    out: Optional[Path] = typer.Option(None, help="results JSON (default: beside the trace, TRACE_sim.json) and "
                                                  "its plot (.png)"),
) -> None:
    """SIMULATE bandwidth, fifo and random routing over N workers with per-worker caches, and one shared cache of
    the same total budget, replaying a recorded trace of real decisions; print the table, write JSON and a plot."""
    from rich.table import Table

    from thrifty.bench.schedule_sim import TraceFormatError, load_trace, plot_sweep, sweep
    from thrifty.bench.scheduler import ScheduleConfig

    ns = comma_list(workers, int, "--workers")
    if any(n < 1 for n in ns):
        fail(f"--workers must be >= 1, got {workers}")
    try:
        ScheduleConfig("bandwidth", w_b=w_b, w_q=w_q)
    except ValueError as e:
        fail(str(e).replace("w_b", "--w-b").replace("w_q", "--w-q"))
    if store_bytes is not None and store_bytes < 0:
        fail(f"--store-bytes must be >= 0, got {store_bytes}")
    try:
        doc = load_trace(trace)
    except TraceFormatError as e:
        fail(str(e))
    result = sweep(doc, list(ns), seed=seed, jobs_per_worker=jobs_per_worker, budget_bytes=store_bytes,
                   w_b=w_b, w_q=w_q)
    result["command"] = (f"thrifty simulate-schedule --trace {trace} --workers {workers} --seed {seed} "
                         f"--jobs-per-worker {jobs_per_worker}" + (f" --store-bytes {store_bytes}" if store_bytes
                                                                   is not None else ""))
    c = result["cost_model"]
    table = Table(title="SIMULATION from a recorded trace: hit rate and throughput against workers", caption=(
        f"cost fitted on {c['decisions']} real decisions: {c['c0_s'] * 1e3:.2f} ms + {c['c_tok_s'] * 1e6:.1f} us/new "
        f"token + {c['c_pair_s'] * 1e9:.2f} ns/attention pair (mean abs error {c['mean_abs_error_s'] * 1e3:.2f} ms); "
        f"budget {result['trace']['store_budget_bytes']} bytes per worker; shared = one cache of N x that budget"))
    for col in ("workers", "policy", "jobs", "prefix hit rate", "decisions/s", "utilization", "stolen"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["workers"]), r["policy"], str(r["jobs"]), f"{r['prefix_hit_rate']:.4f}",
                      f"{r['decisions_per_s']:.1f}", f"{r['utilization']:.3f}", str(r["picks"].get("stolen", 0)))
    console.print(table)
    out = out or trace.with_name(trace.stem + "_sim.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot = plot_sweep(result, out.with_suffix(".png"))
    console.print(f"results: {out}\nplot: {plot}")


@app.command("compare-schedules")
def compare_schedules_cmd(
    a: Path = typer.Argument(..., help="results file of one scheduled run"),
    b: Path = typer.Argument(..., help="results file of the other, on the same jobs"),
    suite: str = typer.Option("sched", help="the suite both ran"),
    out: Optional[Path] = typer.Option(None, help="write the paired figures to this JSON file"),
) -> None:
    """Pair two scheduled runs of the same jobs: hit rate, decisions/s, b_eff, wait, and whether every episode's
    outcome and actions are identical (exit 1 if not)."""
    from thrifty.bench.results import ResultsCorruptError, ResultsMismatchError
    from thrifty.bench.schedule_report import compare_schedules, print_comparison

    for p in (a, b):
        if not p.exists():
            fail(f"{p} does not exist")
    try:
        c = compare_schedules(a, b, suite)
    except (ValueError, ResultsMismatchError, ResultsCorruptError) as e:
        fail(str(e))
    print_comparison(c, console)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(c, indent=1) + "\n")
        console.print(f"paired figures: {out}")
    if c["differing"]:
        console.print(f"[bold red]{len(c['differing'])} episodes differ[/]: {c['differing'][:5]}")
        raise typer.Exit(1)
