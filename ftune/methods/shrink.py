"""Shrinking: drop transformer blocks of the pretrained model, all before fine-tuning or one at a time during it.

Sajjad et al. 2020, "On the Effect of Dropping Layers of Pre-trained Transformer Models" (arXiv:2004.03844): dropping
the top blocks keeps most of the accuracy. DynaBERT (Hou et al. 2020, arXiv:2004.04037) keeps evenly spaced blocks
(at depth 1/2 it drops block d, 0-based, when (d+1) mod 2 = 0). `drop`, in a stack of n blocks: top-k drops the top
k (n-1, n-2, ...); every-other the top k of the odd blocks; list the blocks `blocks`, in that order; k defaults to
n // 2. An encoder-decoder model (T5, BART) drops by the same rule in each stack.

Without `schedule` the blocks go before training and the model is smaller from the start. With `schedule: {start,
end}` (optimizer steps as integers, or fractions of the run as floats in (0, 1]) they go one at a time in that order,
evenly spaced from start to end (models/depth.py: removal_steps); the stack keeps every block and skips the dropped
ones (layers/shrinking_blocks.py), whose parameters get no gradient and stop training. A schedule's natural pair is
distillation from the unshrunk model. A part of a method list that trains nothing itself and goes in first, so other
parts are built on the blocks that remain: `method: [{name: shrink, drop: top-k, k: 3}, {name: full}]`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ftune.errors import MethodError
from ftune.layers import shrinking_blocks as sb
from ftune.methods import base
from ftune.models import depth


class Config(base.MethodConfig):
    name: Literal["shrink"] = "shrink"
    drop: Literal["top-k", "every-other", "list"] = "top-k"
    """Which blocks go: the top k, every other one from the top (evenly spaced), or those listed in `blocks`."""
    k: int | None = Field(None, ge=1)
    """Blocks to drop (top-k: the top k; every-other: the top k of the odd ones). Default: half, rounded down."""
    blocks: tuple[int, ...] = ()
    """drop: list: the 0-based blocks to drop, in the order a schedule removes them."""
    schedule: depth.Schedule | None = None
    """Remove the blocks one at a time during training, evenly spaced from start to end; None: all before training."""

    @model_validator(mode="after")
    def _one_way_to_choose(self) -> Config:
        if self.drop == "list":
            if not self.blocks or self.k is not None:
                raise ValueError("drop: list takes the blocks to drop in `blocks` (and no k)")
            if min(self.blocks) < 0:
                raise ValueError(f"blocks: {min(self.blocks)} is not a block; blocks count from 0")
            if len(set(self.blocks)) < len(self.blocks):
                raise ValueError(f"blocks: {list(self.blocks)} names a block twice; give each block once")
        elif self.blocks:
            raise ValueError(f"blocks is read by drop: list only; drop: {self.drop} chooses its blocks by k")
        if (s := self.schedule) and type(s.start) is type(s.end) and s.start > s.end:  # a step and a fraction: later
            raise ValueError(f"schedule: start {s.start} comes after end {s.end}")
        return self


def _order(cfg: Config, n: int) -> list[int]:
    return depth.blocks_to_drop(cfg.drop, cfg.k, cfg.blocks, n, "shrink")


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    for stack in depth.stacks(model):
        order = _order(cfg, len(stack.blocks))
        depth.check_droppable(list(stack.blocks), order, "shrink.blocks")
        if cfg.schedule is None:
            depth.remove(stack, order)
        else:
            setattr(stack.owner, stack.attr, sb.ShrinkingBlocks(list(stack.blocks), stack.depth))
    return model


def check_total_steps(cfg: Config, total_steps: int) -> None:
    start, end = cfg.schedule.steps(total_steps)
    if end > total_steps:
        raise MethodError(
            f"shrink.schedule.end: step {end} lies past the run's last step, {total_steps}; end by then "
            "or give a fraction of the run (e.g. 0.5)"
        )
    if start > end:  # a step and a fraction: known only now
        raise MethodError(f"shrink.schedule: start (step {start}) comes after end (step {end}) of {total_steps}")


def drop_due(model: nn.Module, step: int, total: int, cfg: Config) -> None:
    """`on_step_end` of a schedule: every block whose removal step has come is dropped (again, harmlessly)."""
    for stack in sb.shrinking_stacks(model):
        order = _order(cfg, len(stack.dropped))
        due = [i for i, at in zip(order, depth.removal_steps(*cfg.schedule.steps(total), len(order))) if at <= step]
        if due and not bool(stack.dropped[due].all()):
            stack.drop(due)


def saved_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights and, per stack, which blocks were dropped when they were saved."""
    return base.trainable_state_dict(model) | sb.dropped_state(model)


BEFORE_TRAINING = base.Method(
    name="shrink",
    config_cls=Config,
    trains=base.Trains.NOTHING,
    claims=frozenset({base.Claim.BLOCKS}),
    apply=apply,
    trainable=base.only_with_others,
    merging=base.ALREADY_MERGED,
    runs_with=base.RunsWith(quantized_base=True),
    about=base.About(
        "drops transformer blocks (top-k, every-other, a list), before or during training (list it with a method)",
        "Sajjad et al. 2020, On the Effect of Dropping Layers of Pre-trained Transformer Models, arXiv:2004.03844; "
        "Hou et al. 2020, DynaBERT, arXiv:2004.04037",
    ),
)


def resolve(cfg: Config) -> base.Method:
    """The record for `cfg`: blocks gone before training, or a schedule (stepwise, with its own saved form)."""
    if cfg.schedule is None:
        return BEFORE_TRAINING
    return dataclasses.replace(
        BEFORE_TRAINING,
        merging=base.Merging(sb.collapse_all, sb.expand_all),
        saving=base.Saving(saved_weights),
        hooks=base.Hooks(check_total_steps=check_total_steps, on_step_end=lambda m, step, n: drop_due(m, step, n, cfg)),
        runs_with=base.RunsWith(quantized_base=True, unused_parameters=True),
    )


METHOD = dataclasses.replace(BEFORE_TRAINING, resolve=resolve)


def validate_lines(recipe, model: nn.Module, base_config) -> list[str]:
    """What `ftune validate` adds for a recipe with a shrink part (nothing without): blocks kept, parameters, and an
    estimate of the forward speed-up at data.max_length (models/depth.py: describe) from `base_config(recipe)`."""
    cfg = next((p for p in [recipe.method, *getattr(recipe.method, "methods", [])] if isinstance(p, Config)), None)
    if cfg is None:
        return []
    when = "before training" if (s := cfg.schedule) is None else f"one at a time from {s.start} to {s.end}"
    return depth.describe(model, base_config(recipe), lambda n: _order(cfg, n), when, recipe.data.max_length)
