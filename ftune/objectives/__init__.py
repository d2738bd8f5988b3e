"""The objective registry: one file per objective (a test keeps files and registry in sync)."""

from __future__ import annotations

from ftune.objectives import task_loss
from ftune.objectives.base import Bound, Objective, ObjectiveConfig

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (task_loss.OBJECTIVE,)}

AnyObjectiveConfig = task_loss.Config  # a discriminated union on `name` once there are several

__all__ = ["OBJECTIVES", "AnyObjectiveConfig", "Bound", "Objective", "ObjectiveConfig"]
