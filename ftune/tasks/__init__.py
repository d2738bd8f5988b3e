"""The task registry: one file per task, one entry each (a test keeps files, registry and the recipe in sync)."""

from __future__ import annotations

from ftune.tasks import causal_lm, preference, seq2seq, sequence_classification, token_classification
from ftune.tasks.base import IGNORE_INDEX, Decoding, Encoded, Task

TASKS: dict[str, Task] = {
    t.name: t
    for t in (sequence_classification.TASK, token_classification.TASK, causal_lm.TASK, seq2seq.TASK, preference.TASK)
}


def as_task(task: Task | str) -> Task:
    """A task record, given the record or its registry name (the recipe's `task:`)."""
    return task if isinstance(task, Task) else TASKS[task]


__all__ = ["IGNORE_INDEX", "TASKS", "Decoding", "Encoded", "Task", "as_task"]
