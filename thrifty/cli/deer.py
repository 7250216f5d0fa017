"""`thrifty train deer`: DeeR-VLA's multi-exit policy on Meta-World demonstrations (docs/deer.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from thrifty.cli._app import app, console, fail, train_app

tune_app = typer.Typer(no_args_is_help=True, help="Refine a shipped model's settings in closed loop.")
app.add_typer(tune_app, name="tune")


@train_app.command("deer")
def train_deer_cmd(
    data: Path = typer.Option(..., help="demonstration directory (`thrifty collect metaworld`)"),
    out: Optional[Path] = typer.Option(None, help="policy directory to write (default: the shipped asset's place, "
                                       "thrifty/assets/deer_policy)"),
    run_dir: Path = typer.Option(Path("runs/deer"), help="resumable checkpoint"),
    steps: Optional[int] = typer.Option(None, min=1, help="optimisation steps (default: the recipe's)"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="windows per step (default: the recipe's)"),
    layers: Optional[int] = typer.Option(None, min=1, help="decoder layers (default: the recipe's 12)"),
    seed: int = typer.Option(0, help="seed of initialisation, windows and exit draws"),
    threads: int = typer.Option(1, min=1, help="torch threads"),
) -> None:
    """Train the multi-exit Llama policy with DeeR's losses, then score the held-out demonstrations for the exit
    thresholds (resumes from RUN_DIR)."""
    from thrifty.bench.policy_suites import SHIPPED_DEER_POLICY
    from thrifty.train.deer import DeerRecipe, train_deer
    from thrifty.train.demos import DemoDirError

    recipe = DeerRecipe(threads=threads, seed=seed)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("layers", layers)):
        if value is not None:
            setattr(recipe, name, value)
    try:
        path = train_deer(recipe, data, out or SHIPPED_DEER_POLICY, run_dir,
                          command="thrifty " + " ".join(sys.argv[1:]))
    except (DemoDirError, ValueError) as e:
        fail(str(e))
    console.print(f"DeeR policy written to {path}; measure it with `thrifty bench deer --policy {path}`")


@tune_app.command("deer")
def tune_deer_cmd(
    policy: Optional[Path] = typer.Option(None, help="DeeR policy directory (default: the shipped one)"),
    exit_ratio: float = typer.Option(0.2, help="the initial thresholds (and so the budget): this exit ratio's"),
    max_layer: Optional[int] = typer.Option(None, help="peak budget: tune the exits up to this layer"),
    trials: int = typer.Option(20, min=1, help="trials in all, the initial one included"),
    episodes_per_task: int = typer.Option(3, min=1, help="closed-loop episodes per task per trial"),
    task: Optional[list[str]] = typer.Option(None, help="tasks or task sets (default: the policy's)"),
    penalty: float = typer.Option(1.0, min=0.0, help="per exit of mean depth above the budget"),
    storage: str = typer.Option("sqlite:///runs/deer_bo.db", help="optuna storage (resumable)"),
    study_name: Optional[str] = typer.Option(None, help="default: deer-r<EXIT_RATIO>[-max<MAX_LAYER>]"),
    out: Path = typer.Option(Path("results/deer_bo.json"), help="the best thresholds and every trial"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1, help="torch threads"),
) -> None:
    """Bayesian optimisation of DeeR's thresholds in closed loop (optuna), from those an exit ratio solves; the
    budget is the initial thresholds' closed-loop mean depth. Resumes from the optuna storage."""
    import torch

    from thrifty.agents.deer_policy import DeerLoadError
    from thrifty.bench.policy_suites import SHIPPED_DEER_POLICY
    from thrifty.envs.metaworld import UnknownTaskError, resolve_tasks
    from thrifty.train.deer_bo import BORecipe, tune_deer

    torch.set_num_threads(threads)
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    recipe = BORecipe(exit_ratio=exit_ratio, max_layer=max_layer, trials=trials, episodes_per_task=episodes_per_task,
                      penalty=penalty, seed=seed)
    name = study_name or f"deer-r{exit_ratio}" + (f"-max{max_layer}" if max_layer else "")

    def show(number, value, success, layers):
        console.print(f"trial {number}: objective {value:.3f}, success {success:.3f}, mean layers {layers:.2f}")

    try:
        tasks = resolve_tasks(task) if task else None
        result = tune_deer(recipe, policy or SHIPPED_DEER_POLICY, storage, name, out, tasks=tasks, progress=show)
    except (DeerLoadError, UnknownTaskError, ValueError) as e:
        fail(str(e))
    console.print(f"best trial {result['best_trial']}: success {result['success']:.3f} at {result['mean_layers']:.2f} "
                  f"layers (budget {result['budget_mean_layers']:.2f}); thresholds -> {out}")
