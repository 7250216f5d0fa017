"""The `thrifty` command. One module per group of commands; `_app` holds the Typer app they register on."""

from thrifty.cli import bench, coop, deer, policy, profile, relic, schedule, train  # noqa: F401  (registers the commands)
from thrifty.cli._app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
