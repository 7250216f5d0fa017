"""`thrifty bench`, `suites`, `techniques`, `play`, `memory-level`: run the closed-loop suites, look at what is
registered, and check a memory level."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from thrifty.cli._app import app, console, fail


@app.command()
def bench(
    suite: str = typer.Argument(..., help="suite name (see `thrifty suites`)"),
    out: Optional[Path] = typer.Option(None, help="results file (JSON lines); default results/SUITE.jsonl"),
    episodes: Optional[int] = typer.Option(None, min=1, help="episodes per configuration and level"),
    level: Optional[list[str]] = typer.Option(None, help="restrict to these levels (repeatable)"),
    model: Optional[Path] = typer.Option(None, help="planner model directory (default: the suite's planner, the "
                                                   "shipped BabyAI one except for `memory`)"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads per episode (default 2)"),
    max_steps: Optional[int] = typer.Option(None, min=1, help="cap on environment steps per episode"),
    pruner: Optional[Path] = typer.Option(None, help="pruner checkpoint for token_pruning configs (default: the "
                                                     "suite's, which fits only the suite's planner)"),
    exit_head: Optional[Path] = typer.Option(None, help="exit-head directory for early_exit configs (default: the "
                                                        "shipped one, which fits only the shipped planner; make "
                                                        "one with `thrifty train exits --model DIR`)"),
    ray: bool = typer.Option(False, "--ray", help="run the episodes as Ray tasks"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local cluster)"),
    by_level: bool = typer.Option(True, help="one table row per configuration and level"),
    write_card: bool = typer.Option(False, help="write the per-level success into the model's card.json "
                                                "(how the shipped planner's card gets its figures)"),
    policy: Optional[Path] = typer.Option(None, help="policy suites: BC policy directory, or for lram a directory "
                                                     "holding action_model_ARCH (default: the shipped ones)"),
    task: Optional[list[str]] = typer.Option(None, help="policy suites: restrict to these tasks or task sets"),
    config: Optional[list[str]] = typer.Option(None, help="run only these configurations (repeatable; a planner "
                                                             "suite keeps its reference, for the pairing)"),
    schedule: Optional[str] = typer.Option(None, help="with --ray: stateful workers keeping their caches, jobs "
                                                      "ordered by `bandwidth` (EchoRL's priority against each "
                                                      "worker's cache), `fifo` or `random` (docs/scheduling.md)"),
    workers: int = typer.Option(2, min=1, help="with --schedule: Ray worker actors"),
    store_bytes: Optional[int] = typer.Option(None, help="with --schedule: prefix store byte budget per worker "
                                                         "(default: each configuration's own)"),
    w_b: float = typer.Option(1.0, help="with --schedule bandwidth: weight of b_eff (seconds) in the priority"),
    w_q: float = typer.Option(1.0, help="with --schedule bandwidth: weight of the wait (seconds)"),
    trace_out: Optional[Path] = typer.Option(None, help="with --schedule: write the trace of decisions (prefix "
                                                        "hashes, token counts, measured times) for "
                                                        "`thrifty simulate-schedule`"),
) -> None:
    """Run SUITE, append one JSON line per episode (resumable), print the table and write the Pareto plot."""
    from thrifty.backbones import ModelLoadError
    from thrifty.bench import (SHIPPED_PLANNER, ResultsFile, ResultsMismatchError, UnknownSuiteError, episode_fn,
                               get_suite, pareto_plot, print_table, run_jobs, summarize, write_summary_json)
    from thrifty.bench.paired import paired_rows, print_paired
    from thrifty.bench.report import latency_note
    from thrifty.bench.suites import (SeedsCollapseError, check_configs, check_levels, uses_technique,
                                      with_part_setting)
    from thrifty.agents.planner_exits import ExitHeadError
    from thrifty.techniques.token_pruning import PrunerMismatchError
    from thrifty.envs import UnknownLevelError

    from thrifty.bench.policy_suites import POLICY_SUITES

    sched_cfg = None
    if schedule is not None or trace_out is not None:
        from thrifty.bench.scheduler import ScheduleConfig

        if not ray:
            fail("--schedule and --trace-out need --ray (stateful Ray workers)")
        if suite in POLICY_SUITES or suite == "coop":
            fail(f"--schedule runs the planner suites, not {suite!r}")
        if store_bytes is not None and store_bytes < 0:
            fail(f"--store-bytes must be >= 0, got {store_bytes}")
        try:
            sched_cfg = ScheduleConfig(schedule or "bandwidth", w_b=w_b, w_q=w_q)
        except ValueError as e:
            fail(str(e).replace("w_b", "--w-b").replace("w_q", "--w-q"))
    if suite in POLICY_SUITES:  # Meta-World policies: tasks instead of levels, a policy instead of a planner
        if level or model or pruner or exit_head:
            fail(f"`thrifty bench {suite}` is a policy suite: it takes --task and --policy, not --level, --model, "
                 "--pruner or --exit-head")
        from thrifty.cli.policy import bench_policy_suite

        return bench_policy_suite(suite, out, episodes, task, policy, threads, max_steps, ray, ray_address,
                                  write_card, configs=config)
    if policy or task:
        fail(f"--policy and --task are for the policy suites ({', '.join(POLICY_SUITES)}), not {suite!r}")
    if suite == "coop":  # K robots over a shared context: its own runner (`thrifty bench-coop` has every option)
        if level or ray or max_steps or write_card or exit_head or config:
            fail("`thrifty bench coop` takes --out, --episodes, --model, --pruner and --threads; use "
                 "`thrifty bench-coop --help` for team sizes, keep ratio and configurations")
        from thrifty.cli.coop import bench_coop_cmd

        return bench_coop_cmd(out=out or Path("results/coop.jsonl"), episodes=episodes or 4, sizes="2,4,8",
                              keep_ratio=0.6, model=model, pruner=pruner, max_kept=None, layers=None, config=None,
                              decoding="constrained", threads=threads or 1)
    try:
        spec = get_suite(suite)
        levels = check_levels(level)
        if episodes is None:  # the suite's own seeds: refused below the distinct-episode floor it states
            spec.check_distinct(levels)
    except (UnknownSuiteError, UnknownLevelError, SeedsCollapseError) as e:
        fail(str(e))
    if config:
        names = [c.name for c in spec.configs]
        unknown = [c for c in config if c not in names]
        if unknown:
            fail(f"suite {suite} has no configuration {unknown}; it has {', '.join(names)}")
        keep = set(config) | {spec.reference}
        spec = dataclasses.replace(spec, configs=tuple(c for c in spec.configs if c.name in keep))
    model_dir = Path(model) if model else (spec.model or SHIPPED_PLANNER)
    try:
        from thrifty.backbones import HFDecoder
        HFDecoder.check_dir(model_dir)
    except ModelLoadError as e:
        hint = " (rebuild it with the command its guide in docs/ gives)" if model is None else ""
        fail(f"{e}{hint}")
    checkpoints = (("token_pruning", "pruner", pruner, "--pruner"), ("early_exit", "head", exit_head, "--exit-head"))
    for technique, key, path, _ in checkpoints:
        spec = dataclasses.replace(spec, configs=with_part_setting(spec.configs, technique, key, path))
    try:  # a checkpoint made for another planner fails here, before any episode runs
        check_configs(spec.configs, model_dir)
    except (PrunerMismatchError, ExitHeadError, FileNotFoundError, ValueError) as e:
        hints = [f"{flag} PATH" for technique, _, _, flag in checkpoints if uses_technique(spec.configs, technique)]
        hint = f"\n(suite {suite} has configurations with checkpoints: pass {' and '.join(hints)} for this model)"
        fail(f"{e}{hint if hints else ''}")
    if write_card and not (model_dir / "card.json").exists():
        fail(f"--write-card: {model_dir / 'card.json'} does not exist (only a model directory with a card can "
             "record its success)")
    out = out or Path("results") / f"{suite}.jsonl"
    jobs = spec.jobs(episodes, levels)
    # Ray gives each task one CPU, so one thread per episode there. Ray runs its workers at nice 15: on a busy
    # machine their wall times are not comparable with in-process ones (success and FLOPs are identical).
    fn = episode_fn(spec, model_dir, threads=threads if threads else (1 if ray else None), max_steps=max_steps)
    meta = {"model": str(model_dir), "configs": [c.as_dict() for c in spec.configs], "ray": ray,
            "max_steps": max_steps or spec.max_steps}
    if sched_cfg is not None:
        meta.update({"schedule": sched_cfg.schedule, "workers": workers, "store_bytes_per_worker": store_bytes})
    try:
        results = ResultsFile(out, suite, meta=meta)
    except (ResultsMismatchError, ValueError) as e:
        fail(str(e))
    console.print(f"[bold]{suite}[/]: {spec.description}; {len(jobs)} episodes -> {out}")
    if sched_cfg is not None:
        from thrifty.bench.schedule_report import print_schedule_metrics
        from thrifty.bench.workers import run_scheduled, with_store_bytes

        configs = with_store_bytes(fn.keywords["configs"], store_bytes)
        run = run_scheduled(jobs, configs, model_dir, results, cfg=sched_cfg, n_workers=workers,
                            threads=fn.keywords["threads"], max_steps=fn.keywords["max_steps"],
                            trace=trace_out is not None, ray_address=ray_address)
        records = run.records
        if run.records and run.metrics.get("episodes"):
            print_schedule_metrics(run.metrics, console)
        if trace_out is not None and run.trace is not None:
            trace_out.parent.mkdir(parents=True, exist_ok=True)
            trace_out.write_text(json.dumps(run.trace) + "\n")
            console.print(f"trace: {trace_out} ({len(run.trace['episodes'])} episodes)")
    else:
        records = run_jobs(jobs, fn, results, use_ray=ray, ray_address=ray_address)
    rows = summarize(records, by_level=by_level)
    note = latency_note(records)
    print_table(rows, console=console, title=f"thrifty bench {suite}", caption=note)
    overall = summarize(records, by_level=False)
    if by_level:
        print_table(overall, console=console, title=f"thrifty bench {suite}: all levels", caption=note)
    paired = paired_rows(records, spec.reference)  # each config against the reference on the same episodes
    print_paired(paired, console, f"thrifty bench {suite}: paired with {spec.reference} (same levels and seeds)")
    plot = pareto_plot(rows + overall if by_level else overall, out.with_suffix(".png"),  # a panel per level, and all
                       title=f"thrifty bench {suite}")
    summary = write_summary_json(rows, out.with_name(out.stem + "_summary.json"))
    if paired:
        write_summary_json(paired, out.with_name(out.stem + "_paired.json"))
    if write_card:
        given = {"--model": model, "--episodes": episodes, "--threads": threads, "--max-steps": max_steps}
        command = " ".join([f"thrifty bench {suite}", *(f"--level {lv}" for lv in level or []),
                            *(f"{k} {v}" for k, v in given.items() if v is not None), *(["--ray"] if ray else [])])
        _write_card(model_dir, summarize(records, by_level=True), command, suite, len(jobs))
    console.print(f"results: {out}\nplot: {plot}\nsummary: {summary}")


@app.command()
def suites() -> None:
    """List the benchmark suites."""
    from thrifty.bench import SUITES

    for s in SUITES.values():
        configs = ", ".join(c.name for c in s.configs)
        console.print(f"[bold]{s.name}[/]: {s.description}\n  configs: {configs}; levels: {', '.join(s.levels)}; "
                      f"{s.episodes} episodes each, at least {s.distinct_floor} distinct per level")
    from thrifty.bench.policy_suites import POLICY_SUITES

    for s in POLICY_SUITES.values():
        console.print(f"[bold]{s.name}[/]: {s.description}\n  policies: {', '.join(c.name for c in s.configs)}; "
                      f"tasks: {', '.join(s.tasks)}; {s.episodes} episodes each, at most {s.max_steps} steps")
    console.print("[bold]coop[/]: K in 2,4,8 robots on CoopGrid over a shared context: expert, full, prefix reuse, "
                  "token / random / recency pruning at 0.6 (`thrifty bench coop`; every option: `thrifty bench-coop`)")


@app.command()
def techniques() -> None:
    """List the registered techniques and their settings."""
    from thrifty.techniques import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        console.print(f"[bold]{name}[/]: {doc}")


@app.command()
def play(
    level: str = typer.Option("GoToLocal", help="BabyAI-Text level"),
    seed: int = typer.Option(0, min=0, help="evaluation seed index (the episode uses seed 1e9 + index)"),
    model: Optional[Path] = typer.Option(None, help="planner model directory (default: the shipped planner)"),
) -> None:
    """Play one episode with the planner and print its transcript."""
    from thrifty.agents.planner import TextPlanner, run_episode
    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.envs import UnknownLevelError, eval_seed, level_id

    try:
        level_id(level)
    except UnknownLevelError as e:
        fail(str(e))
    planner = TextPlanner.load(model or SHIPPED_PLANNER)
    r = run_episode(planner, level, eval_seed(seed))
    console.print(f"mission: {r['mission']}\nactions: {' '.join(r['actions'])}\n"
                  f"success: {r['success']} in {r['steps']} steps, {r['decisions']} decisions, "
                  f"{r['tokens_context_max']} context tokens at the end")


@app.command("memory-level")
def memory_level_cmd(
    level: str = typer.Option("MemoryVaried", help="memory level (MemoryVaried, MemoryRecallS13, MemoryS13, ...)"),
    episodes: int = typer.Option(200, min=1, help="evaluation seeds eval_seed(0..N-1)"),
    out: Optional[Path] = typer.Option(None, help="also write the figures to this JSON file"),
) -> None:
    """Whether a memory level tests memory: distinct episodes over its evaluation seeds, the expert's success (acting
    only on what it has seen) and the cue-blind expert's (chance on MemoryVaried); docs/memory_level.md."""
    from thrifty.bench.memory_level import measure_memory_level
    from thrifty.envs import UnknownLevelError

    try:
        figures = measure_memory_level(level, episodes)
    except UnknownLevelError as e:
        fail(str(e))

    def success(name: str) -> str:
        s, ci = figures[f"{name}_success"], figures[f"{name}_success_ci95"]
        return "– (no cue-blind expert for this level)" if s is None else f"{s:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    console.print(f"[bold]{level}[/] over eval_seed(0..{episodes - 1}):\n"
                  f"  distinct episodes: {figures['distinct_episodes']} of {episodes} "
                  f"({figures['distinct_fraction']:.3f})\n"
                  f"  expert success [95% CI]: {success('expert')}\n"
                  f"  cue-blind expert success [95% CI]: {success('blind')}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"figures: {out}")


def _write_card(model_dir: Path, rows: list[dict], command: str, suite: str, n_jobs: int) -> None:
    """Record per-level success (first configuration) and the command that measured it in card.json."""
    card_path = model_dir / "card.json"
    card = json.loads(card_path.read_text())
    first = rows[0]["config"]
    card["success"] = {r["level"]: {"success": round(r["success"], 3),
                                    "ci95": [round(r["success_lo"], 3), round(r["success_hi"], 3)],
                                    "episodes": r["episodes"], "mean_steps": round(r["steps"], 1)}
                       for r in rows if r["config"] == first}
    card["success_measured_by"] = {"command": command, "suite": suite,
                                   "config": first, "episodes": n_jobs}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    console.print(f"success per level written to {card_path}")

