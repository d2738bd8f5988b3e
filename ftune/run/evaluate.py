"""Scoring a model on a loader, the same way during training and in `ftune eval`: the task's scorer over the
model's logits (and, for a generating task, the text it writes), or an objective's own metrics where it has them
(DPO's implicit rewards, which need the reference model too), under the precision the run trained with, over every
process's shard of the rows."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from ftune.models.precision import autocast
from ftune.objectives.base import Evaluation
from ftune.tasks import Decoding, Task


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    task: Task,
    label_names: list[str] | None,
    device: torch.device,
    precision: str = "fp32",
    gather: Callable[[object], list] | None = None,
    decoding: Decoding | None = None,
    objective: Evaluation | None = None,
) -> dict[str, float]:
    """The task's metrics over the loader's rows; with `gather` (several processes, each scoring its own shard), over
    the union of every process's rows, the same on every process.

    A task that generates (seq2seq) also writes each row's text, under the same precision context, with `decoding`
    (the tokenizer and the recipe's generation settings: assemble.decoding), and its scorer scores it.
    With `objective` (Bound.evaluation), its metrics replace the task's scorer.
    """
    if objective is not None:
        return _objective_metrics(model, loader, objective, device, precision, gather)
    was_training = model.training
    model.eval()
    generating = task.generate is not None
    if generating:
        if decoding is None:
            raise ValueError(f"{task.name} generates text to score: build its loader with a Decoding")
        scorer = task.scorer(label_names, decoding)
        # DDP has no generate; the module it wraps does
        writer = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    else:
        scorer = task.scorer(label_names)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast(precision, device):
            logits = model(**batch).logits
            texts = task.generate(writer, batch, decoding) if generating else None
        scorer.add(logits.float(), labels)
        if generating:
            scorer.add_generated(texts, labels)
    model.train(was_training)
    if gather is not None:
        scorers = gather(scorer)
        scorer = scorers[0]
        for other in scorers[1:]:
            scorer.merge(other)
    return scorer.result()


def _objective_metrics(
    model: nn.Module,
    loader: DataLoader,
    objective: Evaluation,
    device: torch.device,
    precision: str,
    gather: Callable[[object], list] | None,
) -> dict[str, float]:
    """An objective's metrics: its per-batch sums added up over the loader and every process, then its result."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(precision, device):
            sums = objective.sums(model, batch)
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + value
    model.train(was_training)
    if gather is not None:  # every process's totals, in rank order: the same sums on every process
        everyone = gather(totals)
        totals = {key: sum(t.get(key, 0.0) for t in everyone) for key in everyone[0]}
    return objective.result(totals)
