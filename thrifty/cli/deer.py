"""`thrifty train deer`: DeeR-VLA's multi-exit policy on Meta-World demonstrations (docs/deer.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from thrifty.cli._app import console, fail, train_app


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
