"""The objective registry: one file per objective (a test keeps files and registry in sync)."""

from __future__ import annotations

import operator
from functools import reduce
from typing import Annotated

from pydantic import Field

from ftune.objectives import distill, dpo, reward, task_loss
from ftune.objectives.base import Bound, Objective, ObjectiveConfig, Trained, trained_task

OBJECTIVES: dict[str, Objective] = {
    o.name: o for o in (task_loss.OBJECTIVE, distill.OBJECTIVE, reward.OBJECTIVE, dpo.OBJECTIVE)
}

AnyObjectiveConfig = Annotated[
    reduce(operator.or_, (o.config_cls for o in OBJECTIVES.values())), Field(discriminator="name")
]
"""A recipe's objective section: any registered objective's config, chosen by `name`."""
DEFAULT_OBJECTIVE = task_loss.Config()
"""The objective of a recipe without an objective section: the task's own loss."""

__all__ = [
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "AnyObjectiveConfig",
    "Bound",
    "Objective",
    "ObjectiveConfig",
    "Trained",
    "trained_task",
]
