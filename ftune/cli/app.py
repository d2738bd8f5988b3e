"""The Typer app, the options several commands share, and `command`: how every command turns an FtuneError into one
line and an exit code (no traceback unless FTUNE_DEBUG=1)."""

from __future__ import annotations

import os
from functools import wraps
from typing import Annotated

import typer
from rich.console import Console

from ftune import launch

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune language models from YAML recipes.")
err = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: dotted.key=value.")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow a run whose model needs code from "
        "its model folder (model.trust_remote_code) to run that code. A run "
        "never allows it by itself.",
    ),
]


def command(fn=None, *, name: str | None = None):
    """Register `fn` as a command whose FtuneErrors become one line and an exit code."""
    if fn is None:
        return lambda f: command(f, name=name)

    @wraps(fn)
    def run(*args, **kwargs):
        from ftune.errors import FtuneError

        try:
            launch.quiet_libraries()
            return fn(*args, **kwargs)
        except FtuneError as e:
            if os.environ.get("FTUNE_DEBUG") == "1":
                raise
            err.quiet = False  # a process other than the main one is quiet while training, but never about an error
            err.print(f"[red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None

    return app.command(name)(run)
