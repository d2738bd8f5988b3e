"""The encoded splits checked before anything is written: what the length limits cut or dropped, and the task's own
checks (Task.check: a single class, pairs with nothing to prefer, ...). Every count reaches the console; above the
shares below, training is refused unless data.allow_truncation says the loss is meant.

- MAX_DROPPED_SHARE: a dropped row (an SFT prompt that fills data.max_length) is lost whole, and always the longest
  ones, so the loss is biased towards short prompts (whole subtasks of an instruction mix can vanish) and the
  validation score covers only the rows that fit. A few very long outliers are normal; a twentieth of the data is not.
- MAX_TRUNCATED_SHARE: cutting the long tail of a split is what max_length is for (BERT's 128 and 512 cut a few
  percent of rows); when a fifth of the rows are cut, max_length sits inside the bulk of the lengths, not in the tail
  (an SFT response cut before its end teaches the model not to stop; a classifier sees part of each text).

Both are read from the encoded splits (Encoded.dropped, Encoded.truncated: rows = examples + dropped), so data read
from the encoded-data cache is checked as freshly encoded data is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftune.errors import DataError

if TYPE_CHECKING:
    from ftune.tasks.base import Encoded, Task

MAX_DROPPED_SHARE = 0.05
MAX_TRUNCATED_SHARE = 0.2


def check_splits(
    task: Task, spec: Any, names: list[str] | None, train: Encoded, validation: Encoded | None
) -> list[str]:
    """Check the encoded splits of a training run (DataError when they cannot be trained on as the recipe says);
    returns the lines the console prints about them: per split what was cut or dropped, then the task's own."""
    lines = [
        f"{split}: {said}"
        for split, part in (("train", train), ("validation", validation))
        if part is not None and (said := check_lengths(part, spec, task))
    ]
    return lines + (task.check(train, validation, names, spec) if task.check else [])


def limits(spec: Any, task: Task) -> str:
    """The length limits the task's rows are cut to, as the recipe writes them: `data.max_length=128`."""
    return " / ".join(f"data.{name}={getattr(spec, name)}" for name in task.length_fields)


def counted(part: Encoded, spec: Any, task: Task) -> str | None:
    """What the limits did to a split, in words (None: nothing cut or dropped): `3 of 48 rows cut to
    data.max_length=32` and/or `1 of 48 rows dropped (...)`."""
    rows = len(part.examples) + part.dropped
    said = [f"{part.truncated} of {rows} rows cut to {limits(spec, task)}"] if part.truncated else []
    if part.dropped:
        said.append(f"{part.dropped} of {rows} rows dropped ({limits(spec, task)} leaves them no token to learn from)")
    return "; ".join(said) or None


def check_lengths(part: Encoded, spec: Any, task: Task) -> str | None:
    """`counted`, after refusing a split above MAX_DROPPED_SHARE dropped or MAX_TRUNCATED_SHARE cut rows unless
    data.allow_truncation."""
    rows = len(part.examples) + part.dropped
    fix = f"raise {' or '.join(f'data.{name}' for name in task.length_fields)}, or set data.allow_truncation: true"
    if not spec.allow_truncation and part.dropped > MAX_DROPPED_SHARE * rows:
        raise DataError(
            f"{part.source}: {limits(spec, task)} leaves {part.dropped} of {rows} rows "
            f"({part.dropped / rows:.1%}, above {MAX_DROPPED_SHARE:.0%}) no token to learn from, so they "
            f"would be dropped; {fix} to train without them"
        )
    if not spec.allow_truncation and part.truncated > MAX_TRUNCATED_SHARE * rows:
        raise DataError(
            f"{part.source}: {limits(spec, task)} cuts {part.truncated} of {rows} rows "
            f"({part.truncated / rows:.1%}, above {MAX_TRUNCATED_SHARE:.0%}); {fix} to train on them cut"
        )
    return counted(part, spec, task)


def unscored(part: Encoded, rows: int, spec: Any, task: Task) -> list[str]:
    """`ftune eval`'s notes on a scored split of `rows` rows: the rows it could not score, and those it cut."""
    notes = []
    if part.dropped:
        notes.append(
            f"note: {part.dropped} of {rows} rows could not be scored: {limits(spec, task)} leaves them "
            f"no token to score (dropped); the metrics cover the other {rows - part.dropped}"
        )
    if part.truncated:
        notes.append(f"note: {part.truncated} of {rows} rows were cut to {limits(spec, task)} tokens")
    return notes
