"""One optimizer step at the recipe's batch and length, taken through the loop's own step functions (ftune/step:
the micro-step, the gradient norm, the update), and what it needs, built as ftune/run/setup.py builds it (the
objective bound by assemble.bind_objective with the task it trains and its per-example values, the optimizer by
step.optim.training_optimizer). The memory estimate runs it on fake tensors and `--measure` on real ones, so both
see the operations the loop runs. Left out, because none of them keeps a tensor across the step: logging, the
non-finite check, the scheduler, and the method's step-end hook (AdaLoRA's rank budget, in place on its own buffers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ftune import step
from ftune.models.precision import autocast as precision_autocast
from ftune.models.precision import resolve_precision
from ftune.objectives.base import Bound
from ftune.recipe import Recipe
from ftune.step.optim import training_optimizer

ROWS_READ = 8
"""Training rows encoded for the batch (each is repeated to the recipe's length)."""


@dataclass(frozen=True)
class StepSetup:
    """Everything `train_step` needs besides the model and the batch."""

    objective: Bound
    loss_term: Callable[[nn.Module], torch.Tensor] | None
    optimizer: Callable[[nn.Module], Any]
    """model -> train.optimizer over its trainable parameters (the method's decay exemptions in their own group)."""
    max_grad_norm: float | None
    grad_accum: int
    precision: str
    """train.precision as resolved on this machine ("fp32", "bf16", "fp16")."""
    device: torch.device
    extra_models: dict[str, nn.Module] = field(default_factory=dict)
    """The frozen models the objective reads (a teacher), whose weights are held too."""

    def autocast(self) -> AbstractContextManager:
        return precision_autocast(self.precision, self.device)


def prepare_step(
    recipe: Recipe, model: nn.Module, tokenizer, names: list[str] | None, rows, device: torch.device
) -> tuple[StepSetup, dict[str, torch.Tensor]]:
    """The step of `recipe` for `model` (as assemble.build_model made it, with class `names`) on `device`, and its
    micro-batch: the first ROWS_READ training `rows` encoded, with what the objective prepares per example, each
    repeated to full length (`longest_batch`). The objective is bound as the loop binds it (assemble.bind_objective),
    the optimizer made as the loop makes it (step.optim.training_optimizer)."""
    from ftune import assemble
    from ftune.data.sources import Rows
    from ftune.kernels import linear_ce

    precision, task = resolve_precision(recipe.train.precision), assemble.recipe_task(recipe)
    first = Rows(rows.rows[:ROWS_READ], rows.source, rows.lines[:ROWS_READ] if rows.lines else None)
    examples = assemble.encode_rows(recipe, first, tokenizer, names).examples
    bound, examples, extra = assemble.bind_objective(
        recipe,
        model,
        tokenizer,
        device,
        precision,
        names,
        task=linear_ce.training_task(task, model, False),
        examples=examples,
        rows=first,
    )
    return step_setup(recipe, bound, precision, device, extra), longest_batch(recipe, examples, tokenizer)


def step_setup(
    recipe: Recipe, objective: Bound, precision: str, device: torch.device, extra: dict[str, nn.Module]
) -> StepSetup:
    """The step of `recipe` with its `objective` bound (and the `extra` models it reads): the method's loss term and
    the loop's optimizer over whatever model the step is taken on."""
    from ftune.methods import method_of

    t, method = recipe.train, method_of(recipe.method)

    def optimizer(trained_model: nn.Module):
        return training_optimizer(t, trained_model, method.hooks.decay_exempt, fused=device.type == "cuda")

    return StepSetup(
        objective, method.hooks.loss_term, optimizer, t.max_grad_norm, t.grad_accum, precision, device, extra
    )


def longest_batch(recipe: Recipe, examples: list[dict[str, Any]], tokenizer) -> dict[str, torch.Tensor]:
    """The micro-batch of `longest_rows` from the first ROWS_READ encoded `examples`, collated as the loop does."""
    from ftune.data import packing
    from ftune.data.loader import collate

    collate_fn = packing.collate_packed if recipe.data.packing else collate(tokenizer.pad_token_id)
    return collate_fn(longest_rows(recipe, examples[:ROWS_READ]))


def longest_rows(recipe: Recipe, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """train.batch_size examples, every one data.max_length tokens long: the largest micro-batch the loop can
    meet. Each is an encoded example repeated to that length: input_ids and every list of token ids or labels as
    long as them to data.max_length; a decoder's (decoder_input_ids, and the labels as long as them) to
    data.max_target_length; each member of a group (a preference pair) alike. Anything else (a class label, an
    objective's per-example values) stays as it is."""
    d = recipe.data
    return [
        _stretched(examples[i % len(examples)], d.max_length, d.max_target_length)
        for i in range(recipe.train.batch_size)
    ]


def _stretched(example: dict[str, Any], length: int, target_length: int) -> dict[str, Any]:
    if isinstance(example["input_ids"][0], list):  # a group of sequences: each member on its own
        members = [
            _stretched({k: v[m] for k, v in example.items()}, length, target_length)
            for m in range(len(example["input_ids"]))
        ]
        return {k: [member[k] for member in members] for k in example}
    encoder, decoder = len(example["input_ids"]), len(example.get("decoder_input_ids", ()))
    row = {}
    for key, value in example.items():
        tokens = isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)
        if tokens and decoder and len(value) == decoder:
            value = _repeat(value, target_length)
        elif tokens and len(value) == encoder:
            value = _repeat(value, length)
        row[key] = value
    return row


def _repeat(values: list[int], length: int) -> list[int]:
    return (values * math.ceil(length / len(values)))[:length]


def train_step(model: nn.Module, batches: list[dict[str, torch.Tensor]], setup: StepSetup, optimizer: Any) -> None:
    """One optimizer step over `batches` (its micro-batches), through the loop's own step functions (ftune/step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(setup.objective.count(b) for b in batches).clamp(min=1)
    for batch in batches:
        step.micro_step(
            model,
            batch,
            setup.objective.loss,
            scale=1 / count,
            loss_term=setup.loss_term,
            term_model=model,
            grad_accum=len(batches),
            autocast=setup.autocast,
            backward=torch.Tensor.backward,
        )
    step.gradient_norm(params, setup.max_grad_norm, torch.nn.utils.clip_grad_norm_)
    step.update(optimizer)
