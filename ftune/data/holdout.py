"""data.validation_fraction: an evaluation split held out from the training rows, decided by the data alone.

Rows are grouped (Task.holdout_group: preference pairs by prompt, so a prompt never sits on both sides; other tasks
row by row) and the round(fraction x groups) groups with the smallest SHA-256 of their key are held out. The split
depends on neither the seed nor the row order, so every run, and `ftune eval --split validation` of a finished run,
reads the same held-out rows; a row keeps its number in the file for error messages.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from ftune.data.sources import Rows
from ftune.errors import DataError


def row_key(row: dict[str, Any]) -> str:
    """A row as its own group: its values, in a stable text form."""
    return json.dumps(row, sort_keys=True, default=str)


def split(
    rows: Rows, fraction: float, group: Callable[[dict[str, Any]], str], held_out: bool, limit: int | None = None
) -> Rows:
    """The held-out part of `rows` (`held_out`), or the rest, cut to its first `limit` rows."""
    keys = [group(row) for row in rows.rows]
    groups = sorted(set(keys), key=lambda key: hashlib.sha256(key.encode()).hexdigest())
    n = round(fraction * len(groups))
    if not 0 < n < len(groups):
        raise DataError(
            f"data.validation_fraction: {fraction} of the {len(groups)} groups of rows in {rows.source} "
            f"leaves {'no rows to hold out' if n == 0 else 'no rows to train on'}; "
            f"{'raise' if n == 0 else 'lower'} it or give data.validation"
        )
    out = set(groups[:n])
    picked = [i for i, key in enumerate(keys) if (key in out) == held_out][:limit]
    part = f"{n} of {len(groups)} groups held out" if held_out else f"less {n} of {len(groups)} groups held out"
    numbers = rows.numbers or range(1, len(keys) + 1)
    return Rows(
        [rows.rows[i] for i in picked],
        f"{rows.source} [{part}]",
        rows.lines and [rows.lines[i] for i in picked],
        [numbers[i] for i in picked],
    )
