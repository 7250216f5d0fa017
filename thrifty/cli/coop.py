"""`thrifty train coop-planner`, `thrifty bench-coop`: the cooperative planner and its benchmark."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Optional

import typer

from thrifty.cli._app import app, comma_list, console, fail, train_app


@train_app.command("coop-planner")
def train_coop_planner_cmd(
    out: Optional[Path] = typer.Option(None, help="model directory to write (default: the shipped asset's place)"),
    run_dir: Path = typer.Option(Path("runs/coop_planner"), help="encoded data and resumable checkpoints"),
    steps: Optional[int] = typer.Option(None, min=1, help="phase 1 (window) steps (default: the recipe's)"),
    final_steps: Optional[int] = typer.Option(None, min=1, help="phase 2 (whole-sequence) steps (default: the recipe's)"),
    episodes: Optional[int] = typer.Option(None, min=1, help="expert episodes per team size (default: the recipe's)"),
    dagger_rounds: Optional[int] = typer.Option(None, min=0, help="phase 3 DAgger rounds (default: the recipe's)"),
    threads: int = typer.Option(1, min=1, help="torch threads"),
    measure: int = typer.Option(10, min=0, help="evaluation episodes per team size for the card (0: skip)"),
) -> None:
    """Rebuild the CoopGrid planner (behaviour cloning on expert episodes, K = 2, 4, 8, then DAgger rounds); resumes from RUN_DIR,
    then measures closed-loop success per team size against the expert's and writes it into the card."""
    from thrifty.train.coop_planner import SHIPPED_COOP_PLANNER, CoopPlannerRecipe, train_coop_planner

    recipe = CoopPlannerRecipe(threads=threads)
    if steps:
        recipe.window_steps = steps
    if final_steps:
        recipe.final_steps = final_steps
    if episodes:
        recipe.episodes_per_size = episodes
    if dagger_rounds is not None:
        recipe.dagger_rounds = dagger_rounds
    path = train_coop_planner(recipe, out or SHIPPED_COOP_PLANNER, run_dir,
                              command="thrifty " + " ".join(sys.argv[1:]))
    console.print(f"coop planner written to {path}")
    if measure:
        from thrifty.agents.coop_planner import measure_coop_planner

        success = measure_coop_planner(path, recipe.team_sizes, measure, threads=threads)
        console.print_json(data=success)


@train_app.command("coop-pruner")
def train_coop_pruner_cmd(
    model: Optional[Path] = typer.Option(None, help="coop planner directory (default: the shipped one)"),
    out: Optional[Path] = typer.Option(None, help="pruner directory to write (default: the shipped asset's place)"),
    run_dir: Path = typer.Option(Path("runs/coop_pruner"), help="transcripts and the Stage 1 file"),
    samples: int = typer.Option(600, min=1, help="Stage 1 decision samples (coop calls)"),
    steps: int = typer.Option(300, min=1, help="Stage 2 optimisation steps"),
    keep_ratio: float = typer.Option(0.6, help="compounding per-layer keep ratio Stage 2 trains for"),
    max_kept: Optional[int] = typer.Option(None, min=1, help="token cap Stage 2 trains for: at most this many "
                                           "prunable tokens survive each prune layer (bench-coop --max-kept)"),
    layers: str = typer.Option("0,1,2", help="prune layers (after layer 0: every deeper layer sees only kept tokens)"),
    closed_loop_episodes: int = typer.Option(150, min=0, help="closed-loop planner episodes per team size added to "
                                             "the expert transcripts (0: expert transcripts only)"),
    closed_loop_sizes: str = typer.Option("4,8", help="team sizes of the closed-loop planner episodes"),
    threads: int = typer.Option(1, min=1, help="torch threads"),
) -> None:
    """E-RECAP Stages 1 and 2 for the coop planner: coop expert transcripts (+ the planner's own closed-loop
    episodes, labelled by the expert) -> saliency -> token scorers."""
    from thrifty.agents.coop_planner import SHIPPED_COOP_PLANNER, SHIPPED_COOP_PRUNER
    from thrifty.backbones import HFDecoder, ModelLoadError
    from thrifty.train.coop_planner import write_coop_transcripts, write_planner_transcripts
    from thrifty.train.pruner import train_pruner
    from thrifty.train.saliency import train_saliency

    command = "thrifty " + " ".join(sys.argv[1:])
    model = model or SHIPPED_COOP_PLANNER
    sizes = comma_list(closed_loop_sizes, int, "--closed-loop-sizes")
    if any(not 2 <= k <= 8 for k in sizes):
        fail(f"--closed-loop-sizes must be team sizes in 2..8, got {list(sizes)}")
    expert = run_dir / "coop_transcripts.jsonl"
    if not expert.is_file():
        write_coop_transcripts(expert)
    data = expert
    try:
        if closed_loop_episodes:  # the Stage 1 file reads one data file: expert records, then the planner's
            HFDecoder.check_dir(model)
            weights = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(model).glob("*.safetensors"))))
            planner = write_planner_transcripts(run_dir / f"planner_transcripts-{weights.hexdigest()[:12]}.jsonl",
                                                model, sizes, closed_loop_episodes, threads=threads)
            data = run_dir / "coop_pruner_data.jsonl"
            data.write_text(expert.read_text() + planner.read_text())
        sal = train_saliency(model, run_dir / "saliency.safetensors", data=data,
                             layers=comma_list(layers, int, "--layers"), samples=samples, threads=threads,
                             max_tokens=4096, command=command)
        path = train_pruner(model, sal, out or SHIPPED_COOP_PRUNER.parent, keep_ratio=keep_ratio, steps=steps,
                            threads=threads, command=command, max_kept=max_kept)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    console.print(f"coop pruner written to {path}")


@app.command("bench-coop")
def bench_coop_cmd(
    out: Path = typer.Option(Path("results/coop.jsonl"), help="results file (JSON lines, resumable)"),
    episodes: int = typer.Option(4, min=1, help="episodes per configuration and team size"),
    sizes: str = typer.Option("2,4,8", help="team sizes K (2..8)"),
    keep_ratio: float = typer.Option(0.6, help="keep ratio of the pruning configurations (count-matched)"),
    model: Optional[Path] = typer.Option(None, help="coop planner directory (default: the shipped one)"),
    pruner: Optional[Path] = typer.Option(None, help="token_pruning checkpoint (default: the shipped coop pruner)"),
    max_kept: Optional[int] = typer.Option(None, min=0, help="also run the three pruning configurations with this "
                                           "token cap (prunable tokens kept per prune layer)"),
    layers: Optional[str] = typer.Option(None, help="prune layers of the three pruning configurations, e.g. 0,1,2 "
                                         "(default: the layers the pruner was trained for)"),
    config: Optional[list[str]] = typer.Option(None, help="run only these configurations (repeatable)"),
    decoding: str = typer.Option("constrained", help="planner decoding: 'constrained' (only decisions the parser "
                                 "accepts given the team's reports) or 'free' (greedy; malformed output -> wait)"),
    threads: int = typer.Option(1, min=1, help="torch threads"),
) -> None:
    """K robots x {expert, full, prefix reuse, token / random / recency pruning}: one JSON line per episode, then
    the table (success per K, tokens and FLOPs per call and per round, latency), each configuration paired with
    full per K, and three plots (FLOPs per round and success against K, FLOPs per call against context length)."""
    from thrifty.agents.coop_planner import SHIPPED_COOP_PLANNER
    from thrifty.backbones import HFDecoder, ModelLoadError
    from thrifty.bench.coop import DECODINGS, SUITE, coop_configs, coop_episode_fn, coop_jobs
    from thrifty.bench.coop_report import (context_plot, coop_plots, paired_coop, print_coop_table,
                                           print_paired_coop, summarize_coop)
    from thrifty.bench.report import write_summary_json
    from thrifty.bench.results import ResultsFile, ResultsMismatchError
    from thrifty.bench.runner import run_jobs
    from thrifty.techniques.token_pruning import PrunerMismatchError

    if decoding not in DECODINGS:
        fail(f"--decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    ks = comma_list(sizes, int, "--sizes")
    if any(not 2 <= k <= 8 for k in ks):
        fail(f"team sizes must be in 2..8, got {list(ks)}")
    model_dir = model or SHIPPED_COOP_PLANNER
    try:
        HFDecoder.check_dir(model_dir)
    except ModelLoadError as e:
        fail(f"{e} (rebuild the coop planner with `thrifty train coop-planner`)")
    try:
        configs = coop_configs(keep_ratio, pruner, max_kept=max_kept,
                               layers=comma_list(layers, int, "--layers") if layers else None)
    except (PrunerMismatchError, FileNotFoundError) as e:
        fail(str(e))
    if config:
        unknown = [c for c in config if c not in {x.name for x in configs}]
        if unknown:
            fail(f"unknown configuration(s) {unknown}; available: {', '.join(x.name for x in configs)}")
        configs = tuple(c for c in configs if c.name in config)
    try:
        from thrifty.bench.coop import _planner_for
        for c in configs:  # a pruner that does not fit the model, or prune layers it lacks, fail before any episode
            if c.technique not in (None, "full", "prefix_reuse"):
                planner = _planner_for(str(model_dir), c.as_dict(), decoding)
                for part in getattr(planner.technique, "parts", (planner.technique,)):
                    if hasattr(part, "prepare"):
                        part.prepare(planner.backbone.n_layers)
        results = ResultsFile(out, SUITE, meta={"model": str(model_dir), "configs": [c.as_dict() for c in configs],
                                               "threads": threads, "decoding": decoding})
        earlier = results.meta.get("decoding", "free")  # files written before the option decoded freely
        if earlier != decoding:
            fail(f"{out} holds episodes decoded {earlier!r}, not {decoding!r}; pass --decoding {earlier} to resume "
                 "it, or --out with another path")
    except (PrunerMismatchError, FileNotFoundError, ResultsMismatchError, ValueError) as e:
        fail(str(e))
    from thrifty.bench.coop import coop_distinct_episodes

    distinct = coop_distinct_episodes(episodes, ks)  # by resetting the env only: the floor is all of them
    collapsed = {k: n for k, n in distinct.items() if n < episodes}
    if collapsed:
        console.print(f"[yellow]warning[/]: the seeds give fewer distinct episodes than {episodes} at K = "
                      + ", ".join(f"{k} ({n})" for k, n in collapsed.items())
                      + "; the tables count each distinct episode once")
    jobs = coop_jobs(configs, episodes, ks)
    console.print(f"[bold]bench-coop[/]: {len(configs)} configurations x K in {list(ks)} x {episodes} episodes "
                  f"({min(distinct.values())} or more distinct per K) -> {out}")
    records = run_jobs(jobs, coop_episode_fn(configs, model_dir, threads, decoding), results)
    rows = summarize_coop(records)
    print_coop_table(rows, console=console, title=f"thrifty bench-coop ({decoding} decoding)")
    paired = paired_coop(records)
    print_paired_coop(paired, console, "paired with full (same K and seeds); FLOPs over the seeds both solve")
    flops_png, success_png = coop_plots(rows, out.with_suffix(""))
    plots = [flops_png, success_png, context_plot(records, out.with_suffix(""))]
    summary = write_summary_json(rows, out.with_name(out.stem + "_summary.json"))
    if paired:
        write_summary_json(paired, out.with_name(out.stem + "_paired.json"))
    console.print(f"results: {out}\nplots: {', '.join(str(p) for p in plots if p)}\nsummary: {summary}")
