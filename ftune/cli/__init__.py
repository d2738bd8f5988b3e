"""The `ftune` command line. Each command parses, calls one library function, and prints; heavy imports are
deferred into the commands so `ftune --help` stays fast. Expected errors print one line (no traceback unless
FTUNE_DEBUG=1) and exit 2 (bad usage or recipe) or 1 (runtime). Commands on a recipe are in recipes.py, commands on
finished runs in runs.py; app.py holds the app and what they share."""

from ftune.cli import recipes, runs  # noqa: F401  (importing them registers their commands, in this order)
from ftune.cli.app import app

__all__ = ["app"]
