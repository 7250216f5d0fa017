"""`thrifty profile-reuse`, `profile`, `pruning-quality`: per-decision cost and quality diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from thrifty.cli._app import app, comma_list, console, fail


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
        steps_at = comma_list(report_steps, int, "--report-steps")
        result = profile_reuse(model or SHIPPED_PLANNER, out, level=level, seed_index=seed, steps=steps,
                               report_steps=steps_at, warmup=warmup, repeats=repeats, threads=threads,
                               arms=default_arms(None if pruning == "none" else pruning, keep_ratio))
    except (UnknownLevelError, ValueError) as e:
        fail(str(e))
    console.print_json(data={k: v for k, v in result.items() if k != "series"} if isinstance(result, dict) else result)
    console.print(f"written to {out}")


@app.command("profile")
def profile_cmd(
    model: str = typer.Option("tiny-12x512", help="model directory, or tiny-LxD for a random-initialised Llama"),
    mode: str = typer.Option("prefill", help="prefill | end2end (end2end decodes exactly --gen-tokens tokens)"),
    lengths: str = typer.Option("1024,2048,4096", help="context lengths in tokens"),
    keep: str = typer.Option("0.9,0.8,0.7", help="keep ratios of the pruned arms"),
    schedule: str = typer.Option("compound", help="compound (E-RECAP per-layer keep ratio) | work (overall fraction)"),
    layers: Optional[str] = typer.Option(None, help="prune layers, e.g. 3,6,9 (default: derived from depth)"),
    pruner: Optional[str] = typer.Option(None, help="pruner checkpoint (default: shipped one if it fits, else a "
                                                    "random scorer of the same cost)"),
    gen_tokens: int = typer.Option(32, min=1, help="tokens decoded in end2end mode"),
    repeats: int = typer.Option(3, min=1),
    warmup: int = typer.Option(1, min=0),
    threads: int = typer.Option(1, min=1),
    out: Path = typer.Option(Path("results/profile"), help="output folder (profile-MODE.json and .png)"),
) -> None:
    """Pruned prefill against the full model: measured speedup next to the analytic FLOPs ratio, peak memory."""
    from thrifty.backbones import ModelLoadError
    from thrifty.bench.profile import print_profile, run_profile
    from thrifty.techniques.token_pruning import PrunerMismatchError

    layer_ids = comma_list(layers, int, "--layers") if layers else None
    try:
        result = run_profile(model, mode=mode, lengths=comma_list(lengths, int, "--lengths"),
                             keeps=comma_list(keep, float, "--keep"), gen_tokens=gen_tokens, repeats=repeats,
                             warmup=warmup, threads=threads, schedule=schedule, layers=layer_ids, pruner=pruner,
                             out_json=out / f"profile-{mode}.json", out_png=out / f"profile-{mode}.png")
    except (ModelLoadError, PrunerMismatchError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    print_profile(result, console=console)
    console.print(f"written: {out / f'profile-{mode}.json'}, {out / f'profile-{mode}.png'}")


@app.command("pruning-quality")
def pruning_quality_cmd(
    model: Optional[Path] = typer.Option(None, help="planner model directory (default: the shipped planner)"),
    keep: str = typer.Option("0.9,0.8,0.7,0.6", help="keep ratios"),
    pruner: Optional[str] = typer.Option(None, help="pruner checkpoint for token_pruning (default: the shipped one)"),
    episodes: int = typer.Option(10, min=1, help="held-out expert episodes per level (evaluation seeds)"),
    per_level: int = typer.Option(40, min=1, help="contexts per level"),
    threads: int = typer.Option(1, min=1),
    out: Path = typer.Option(Path("results/pruning_quality.json"), help="JSON output"),
) -> None:
    """Next-action agreement and KL with the full model on held-out contexts, per technique and keep ratio."""
    from thrifty.backbones import ModelLoadError
    from thrifty.bench.pruning_quality import print_quality, run_pruning_quality
    from thrifty.techniques.token_pruning import PrunerMismatchError

    try:
        result = run_pruning_quality(model, keeps=comma_list(keep, float, "--keep"),
                                     settings={"pruner": pruner} if pruner else None, episodes_per_level=episodes,
                                     per_level=per_level, out_json=out, threads=threads)
    except (ModelLoadError, PrunerMismatchError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    print_quality(result, console=console)
    console.print(f"written: {out}")
