"""The `thrifty` command: bench suites, train assets, list what is registered."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="thrifty: cheap calls for embodied planners, measured in closed loop.")
train_app = typer.Typer(no_args_is_help=True, help="Rebuild the shipped assets with their recipes.")
app.add_typer(train_app, name="train")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI get the whole table


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@app.command()
def bench(
    suite: str = typer.Argument(..., help="suite name (see `thrifty suites`)"),
    out: Optional[Path] = typer.Option(None, help="results file (JSON lines); default results/SUITE.jsonl"),
    episodes: Optional[int] = typer.Option(None, min=1, help="episodes per configuration and level"),
    level: Optional[list[str]] = typer.Option(None, help="restrict to these levels (repeatable)"),
    model: Optional[Path] = typer.Option(None, help="planner model directory (default: the shipped planner)"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads per episode (default 2)"),
    max_steps: Optional[int] = typer.Option(None, min=1, help="cap on environment steps per episode"),
    ray: bool = typer.Option(False, "--ray", help="run the episodes as Ray tasks"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local cluster)"),
    by_level: bool = typer.Option(True, help="one table row per configuration and level"),
) -> None:
    """Run SUITE, append one JSON line per episode (resumable), print the table and write the Pareto plot."""
    from thrifty.backbones import ModelLoadError
    from thrifty.bench import (SHIPPED_PLANNER, ResultsFile, ResultsMismatchError, UnknownSuiteError, episode_fn,
                               get_suite, pareto_plot, print_table, run_jobs, summarize, write_summary_json)
    from thrifty.bench.suites import check_levels
    from thrifty.envs import UnknownLevelError

    try:
        spec = get_suite(suite)
        levels = check_levels(level)
    except (UnknownSuiteError, UnknownLevelError) as e:
        _fail(str(e))
    model_dir = Path(model) if model else SHIPPED_PLANNER
    try:
        from thrifty.backbones import HFDecoder
        HFDecoder.check_dir(model_dir)
    except ModelLoadError as e:
        hint = " (rebuild the shipped planner with `thrifty train planner`)" if model is None else ""
        _fail(f"{e}{hint}")
    out = out or Path("results") / f"{suite}.jsonl"
    jobs = spec.jobs(episodes, levels)
    # Ray gives each task one CPU, so one thread per episode there. Ray runs its workers at nice 15: on a busy
    # machine their wall times are not comparable with in-process ones (success and FLOPs are identical).
    fn = episode_fn(spec, model_dir, threads=threads if threads else (1 if ray else None), max_steps=max_steps)
    meta = {"model": str(model_dir), "configs": [c.as_dict() for c in spec.configs], "ray": ray,
            "max_steps": max_steps or spec.max_steps}
    try:
        results = ResultsFile(out, suite, meta=meta)
    except (ResultsMismatchError, ValueError) as e:
        _fail(str(e))
    console.print(f"[bold]{suite}[/]: {spec.description}; {len(jobs)} episodes -> {out}")
    records = run_jobs(jobs, fn, results, use_ray=ray, ray_address=ray_address)
    rows = summarize(records, by_level=by_level)
    print_table(rows, console=console, title=f"thrifty bench {suite}")
    overall = summarize(records, by_level=False)
    if by_level:
        print_table(overall, console=console, title=f"thrifty bench {suite}: all levels")
    plot = pareto_plot(overall if not by_level else rows, out.with_suffix(".png"), title=f"thrifty bench {suite}")
    summary = write_summary_json(rows, out.with_name(out.stem + "_summary.json"))
    console.print(f"results: {out}\nplot: {plot}\nsummary: {summary}")


@app.command()
def suites() -> None:
    """List the benchmark suites."""
    from thrifty.bench import SUITES

    for s in SUITES.values():
        configs = ", ".join(c.name for c in s.configs)
        console.print(f"[bold]{s.name}[/]: {s.description}\n  configs: {configs}; levels: {', '.join(s.levels)}; "
                      f"{s.episodes} episodes each")


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
        _fail(str(e))
    planner = TextPlanner.load(model or SHIPPED_PLANNER)
    r = run_episode(planner, level, eval_seed(seed))
    console.print(f"mission: {r['mission']}\nactions: {' '.join(r['actions'])}\n"
                  f"success: {r['success']} in {r['steps']} steps, {r['decisions']} decisions, "
                  f"{r['tokens_context_max']} context tokens at the end")


@app.command("profile-reuse")
def profile_reuse_cmd(
    model: Optional[Path] = typer.Option(None, help="planner model directory (default: the shipped planner)"),
    out: Path = typer.Option(Path("results/reuse_profile"), help="output folder (profile.json, profile.png)"),
    level: str = typer.Option("GoToObjMazeS4", help="level whose expert trajectory is replayed"),
    seed: int = typer.Option(0, min=0, help="evaluation seed index"),
    steps: int = typer.Option(64, min=1, help="decisions played (the context grows every step)"),
    report_steps: str = typer.Option("16,32,64", help="steps at which decisions are timed"),
    warmup: int = typer.Option(1, min=0),
    repeats: int = typer.Option(3, min=1),
    threads: int = typer.Option(1, min=1),
    pruning: str = typer.Option("random_pruning", help="pruning arm: random_pruning | token_pruning | none"),
    keep_ratio: float = typer.Option(0.7, help="keep ratio of the pruning arms"),
) -> None:
    """Decision latency and FLOPs against context length: full recompute vs prefix reuse (vs reuse + pruning)."""
    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.bench.reuse_profile import default_arms, profile_reuse
    from thrifty.envs import UnknownLevelError, level_id

    try:
        level_id(level)
        steps_at = tuple(int(x) for x in report_steps.split(","))
        result = profile_reuse(model or SHIPPED_PLANNER, out, level=level, seed_index=seed, steps=steps,
                               report_steps=steps_at, warmup=warmup, repeats=repeats, threads=threads,
                               arms=default_arms(None if pruning == "none" else pruning, keep_ratio))
    except (UnknownLevelError, ValueError) as e:
        _fail(str(e))
    console.print_json(data={k: v for k, v in result.items() if k != "series"} if isinstance(result, dict) else result)
    console.print(f"written to {out}")


@train_app.command("planner")
def train_planner_cmd(
    out: Path = typer.Option(None, help="model directory to write (default: the shipped asset's place)"),
    run_dir: Path = typer.Option(Path("runs/planner"), help="transcripts and resumable checkpoints"),
    steps: Optional[int] = typer.Option(None, min=1, help="optimisation steps (default: the recipe's)"),
    threads: int = typer.Option(2, min=1, help="torch threads"),
    stop_at: Optional[int] = typer.Option(None, min=1, help="stop at this step of the schedule and export"),
) -> None:
    """Rebuild the BabyAI-Text planner (behaviour cloning on expert transcripts); resumes from RUN_DIR."""
    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.train.planner import PlannerRecipe, train_planner

    recipe = PlannerRecipe(threads=threads)
    if steps:
        recipe.steps = steps
    path = train_planner(recipe, out or SHIPPED_PLANNER, run_dir, command="thrifty " + " ".join(sys.argv[1:]),
                         stop_at=stop_at)
    console.print(f"planner written to {path}; measure it with `thrifty bench planner --model {path}`")


if __name__ == "__main__":
    app()
