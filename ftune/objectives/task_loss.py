"""The task's own loss (the default objective): cross-entropy over rows or response tokens, as the task defines."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ftune.objectives.base import Bound, Objective, ObjectiveConfig
from ftune.tasks import Task


class Config(ObjectiveConfig):
    name: Literal["task"] = "task"


def bind(cfg: Config, task: Task, extra: dict[str, nn.Module]) -> Bound:
    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return task.loss(model(**inputs).logits, batch["labels"])

    return Bound(loss=loss, count=lambda batch: task.count(batch["labels"]))


OBJECTIVE = Objective(name="task", config_cls=Config, summary="the task's own loss (default)", bind=bind)
