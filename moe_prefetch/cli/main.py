"""The `moe-prefetch` entry point: the app (app.py) with every command module registered.

Modules read top-down: app.py holds the typer app and the error mapping; commands.py and
predictor_cmds.py, simulate_cmd.py, plan_cmd.py and serve_cmd.py register their commands on it; this
module imports them all.
"""

from __future__ import annotations

from . import commands, plan_cmd, predictor_cmds, serve_cmd, simulate_cmd  # noqa: F401  (importing registers their commands)
from .app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point (`moe-prefetch`); errors are mapped in app.py."""
    app(prog_name="moe-prefetch")


if __name__ == "__main__":
    main()
