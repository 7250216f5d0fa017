"""The Typer application and what every command module shares: the console and the error exit."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="thrifty: cheap calls for embodied planners, measured in closed loop.")
train_app = typer.Typer(no_args_is_help=True, help="Rebuild the shipped assets with their recipes.")
app.add_typer(train_app, name="train")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI get the whole table


def fail(message: str) -> NoReturn:
    """Print one clear error line and exit with status 2 (no stack trace)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def comma_list(text: str, kind, option: str) -> tuple:
    """Parse a comma-separated option value like "1,2,3" with `kind` (int or float); a clear error otherwise."""
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        fail(f"{option} must be comma-separated numbers like 1,2,3, got {text!r}")

