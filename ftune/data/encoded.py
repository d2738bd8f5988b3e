"""What encoding a split produces, shared by the tasks that encode and the data pipeline that batches, packs and
caches the result (both import it from here, so the data layer never reaches up into the tasks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
"""Label id the losses skip: prompt tokens, padding, a word's later sub-tokens."""


@dataclass
class Encoded:
    """Encoded examples of one split, and what the run record should say about them."""

    examples: list[dict[str, Any]]
    source: str
    dropped: int = 0
    """Rows left out: truncation to data.max_length left them no token to learn from (SFT)."""
    truncated: int = 0
    """Rows kept but cut to data.max_length."""
