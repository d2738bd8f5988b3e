"""The task's own loss (the default objective): cross-entropy over rows or response tokens, as the task defines."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ftune.kernels.linear_ce import output_layer
from ftune.objectives.base import Bound, Objective, ObjectiveConfig, Trained
from ftune.tasks import Task


class Config(ObjectiveConfig):
    name: Literal["task"] = "task"


def bind(cfg: Config, task: Task, extra: dict[str, nn.Module], trained: Trained) -> Bound:
    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if task.hidden_loss:  # setup kept it only for a model whose logits are its output layer of its last state
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1)  # logits of one position only
            return task.hidden_loss(out.hidden_states[-1], output_layer(model), batch["labels"])
        return task.loss(model(**inputs).logits, batch["labels"])

    return Bound(loss=loss, count=lambda batch: task.count(batch["labels"]))


OBJECTIVE = Objective(name="task", config_cls=Config, summary="the task's own loss (default)", bind=bind)
