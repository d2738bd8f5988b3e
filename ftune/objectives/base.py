"""The objective interface: what the loop minimises, as (loss sum, count) per micro-batch.

The loop divides each micro-batch's sum by the count of the whole optimizer step (over its micro-batches and every
process), so a step's loss is the mean over every row or token it saw, however they were split. The default
objective is the task's own loss; the next ones (distillation, preference losses) need other models (a teacher, a
reference), which `extra_models` names and ftune/assemble.py builds beside the main model and hands over; `bind`
also gets the model being trained (`Trained`), whose method can switch itself off to give the base model's outputs
(DPO's reference without a second copy of the weights).

An objective may reshape the task it trains (`shape_task`: a reward model reads preference pairs through a
one-output classification head) and bring its own evaluation metrics (`Bound.evaluation`: DPO's implicit rewards,
which need the reference as well as the logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ftune.tasks import Task


class ObjectiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


@dataclass(frozen=True)
class Trained:
    """The model being trained, as `bind` may read it besides the batch."""

    model: nn.Module
    """As the method's `attach` returned it (not a DDP wrapper): `method.disabled(model)` gives the base outputs."""
    method: Any
    """Its method record (ftune.methods.base.Method)."""
    device: torch.device
    precision: str
    """train.precision as resolved ("fp32", "bf16", "fp16"): what the objective computes before training (DPO's
    precomputed reference) runs under the same autocast as the loop's forward, so the two agree at step 0."""
    pad_token_id: int
    load_base: Callable[[], nn.Module]
    """A fresh copy of the base model the task trains, without the method, in eval mode and frozen (the reference of
    a method that trains base weights in place); loaded only when called."""


@dataclass(frozen=True)
class Evaluation:
    """An objective's own evaluation metrics, used instead of the task's scorer.

    `sums(model, batch)` returns plain floats to add up over batches and processes (e.g. {"pairs": 4, "loss": 2.8});
    `result(totals)` turns the totals into the metrics. Both run under no_grad and the run's autocast, the model in
    eval mode.
    """

    sums: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, float]]
    result: Callable[[dict[str, float]], dict[str, float]]


@dataclass(frozen=True)
class Bound:
    """An objective ready for the loop: its config, the task, and the extra models it asked for, bound in."""

    loss: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    """`(model, batch) -> (sum, count)` of one micro-batch (on the batch's device)."""
    count: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    """`batch -> count`, read from the batch before the forward (on the host: no device sync)."""
    evaluation: Evaluation | None = None
    """The objective's own metrics (evaluation during training and `ftune eval`); None: the task's scorer."""


@dataclass(frozen=True)
class OtherRun:
    """A finished ftune run an objective reads (a teacher), opened by ftune/assemble.py as data: objectives never
    import the layers that build runs; they receive this from `TrainingData.open_run`."""

    task: str
    label_names: list[str] | None
    tokenizer: Any
    files: list[Path]
    """Its recipe and method weights."""
    folders: list[Path]
    """Its tokenizer folder and its base model's folder (their regular files define it too)."""


@dataclass(frozen=True)
class TrainingData:
    """What setup has read and encoded for training, handed to `Objective.prepare` as plain values, with the
    builders an objective may need besides (all made by ftune/assemble.py: objectives import nothing above them)."""

    rows: Any
    """The training rows as read (data.sources.Rows): the text a teacher with its own tokenizer encodes."""
    examples: list[dict[str, Any]]
    """The rows encoded for the trained model, in the same order."""
    tokenizer: Any
    """The trained model's tokenizer."""
    label_names: list[str] | None
    device: torch.device
    """Where the run computes (a model `prepare` runs is moved there)."""
    encode: Callable[[Any, Any], list[dict[str, Any]]]
    """`(rows, tokenizer) -> examples`: the recipe's encoding of `rows` with another model's tokenizer."""
    load_model: Callable[[str, str], nn.Module]
    """`(role, where) -> model`: a frozen model as `extra_models` would build it (a run dir or a model name)."""
    open_run: Callable[[Path], OtherRun]
    """A finished run directory as data (refused while it trains; never runs its code)."""
    trust_remote_code: bool = False
    """The recipe's model.trust_remote_code: the consent a model named by Hub id may be loaded with."""
    trained: Trained | None = None
    """The model being trained, its method and the base's loader (DPO's reference log-probs computed beforehand)."""


@dataclass(frozen=True)
class Objective:
    """One training objective.

    Attributes:
        name: registry key, the recipe's `objective.name`.
        config_cls: its pydantic config.
        summary: one line for the README.
        bind: `(cfg, task, extra_models, trained) -> Bound`; `task` as `shape_task` made it.
        extra_models: `cfg -> {role: run dir or model name}`, the frozen models the objective reads (built once, in
            eval mode, without gradients, by assemble.build_extra_models). Default: none.
        prepare: `(cfg, task, TrainingData, extra_models) -> per-example fields or None`, run once before training
            and before anything is written: checks the extra models against the data (a teacher's vocabulary and
            classes) and returns one dict per training example of values the loss reads from its batch (a
            teacher's logits per row), which the loader stacks. Default: none.
        shape_task: `(cfg, task) -> task`, the task as this objective trains it (a reward model: the preference
            task's rows through a one-output sequence-classification head, with the Bradley-Terry loss and its
            metrics); every place that builds or scores a run asks `trained_task`. None: the task as registered.
        check: `(cfg, task, method)` raises ValueError (a one-line message naming the field) for a combination the
            objective cannot train: a task without pairs, a reference the method cannot switch off. Called when
            the recipe is validated. None: anything goes.
        own_metrics: the Bound has an `evaluation`, so `ftune eval` binds the objective on the loaded run.
    """

    name: str
    config_cls: type[ObjectiveConfig]
    summary: str
    bind: Callable[[Any, Task, dict[str, nn.Module], Trained], Bound]
    extra_models: Callable[[Any], dict[str, str]] = field(default=lambda cfg: {})
    prepare: Callable[[Any, Task, TrainingData, dict[str, nn.Module]], list[dict[str, Any]] | None] | None = None
    shape_task: Callable[[Any, Task], Task] | None = None
    check: Callable[[Any, Task, Any], None] | None = None
    own_metrics: bool = False


def trained_task(objective: Objective, cfg: Any, task: Task) -> Task:
    """The task record a run of `objective` trains and scores (`Objective.shape_task`)."""
    return objective.shape_task(cfg, task) if objective.shape_task else task
