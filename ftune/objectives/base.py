"""The objective interface: what the loop minimises, as (loss sum, count) per micro-batch.

The loop divides each micro-batch's sum by the count of the whole optimizer step (over its micro-batches and every
process), so a step's loss is the mean over every row or token it saw, however they were split. The default
objective is the task's own loss; the next ones (distillation, preference losses) need other models (a teacher, a
reference), which `extra_models` names and ftune/assemble.py builds beside the main model and hands over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ftune.tasks import Task


class ObjectiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


@dataclass(frozen=True)
class Bound:
    """An objective ready for the loop: its config, the task, and the extra models it asked for, bound in."""

    loss: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    """`(model, batch) -> (sum, count)` of one micro-batch (on the batch's device)."""
    count: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    """`batch -> count`, read from the batch before the forward (on the host: no device sync)."""


@dataclass(frozen=True)
class Objective:
    """One training objective.

    Attributes:
        name: registry key, the recipe's `objective.name`.
        config_cls: its pydantic config.
        summary: one line for the README.
        bind: `(cfg, task, extra_models) -> Bound`.
        extra_models: `cfg -> {role: run dir or model name}`, the frozen models the objective reads (built once, in
            eval mode, without gradients, by assemble.build_extra_models). Default: none.
    """

    name: str
    config_cls: type[ObjectiveConfig]
    summary: str
    bind: Callable[[Any, Task, dict[str, nn.Module]], Bound]
    extra_models: Callable[[Any], dict[str, str]] = field(default=lambda cfg: {})
