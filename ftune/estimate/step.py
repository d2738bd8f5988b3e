"""One optimizer step at the recipe's batch and length, taken as the training loop takes it (ftune/run/train.py),
and what it needs, built as ftune/run/setup.py builds it (the objective bound to the model with the task it
trains, the objective's per-example values, the optimizer).

The step: `grad_accum` micro-batches of forward (under the recipe's mixed precision), the objective's loss, the
method's loss term and backward, then the gradient norm (clipped when train.max_grad_norm is set), the optimizer
step, and zero_grad(set_to_none=True). The memory estimate runs it on fake tensors and `--measure` on real ones, so
both see the same operations. Left out, because none of them keeps a tensor across the step: logging, the
non-finite check, the scheduler, and `Method.on_step_end` (AdaLoRA's rank budget, in place on its own buffers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ftune.objectives.base import Bound
from ftune.recipe import Recipe

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
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

    @property
    def autocast(self) -> Callable[[], AbstractContextManager]:
        if self.precision not in AUTOCAST:
            return nullcontext
        return lambda: torch.autocast(self.device.type, dtype=AUTOCAST[self.precision])


def prepare_step(recipe: Recipe, model: nn.Module, tokenizer, names: list[str] | None, rows,
                 device: torch.device) -> tuple[StepSetup, dict[str, torch.Tensor]]:
    """The step of `recipe` for `model` (as assemble.build_model made it, with class `names`) on `device`, and its
    micro-batch: the first ROWS_READ training `rows` encoded, with what the objective prepares per example, each
    repeated to full length (`longest_batch`)."""
    from ftune import assemble
    from ftune.data.sources import Rows
    from ftune.methods import method_of
    from ftune.objectives import OBJECTIVES
    from ftune.objectives.base import TrainingData
    from ftune.run import linear_ce
    from ftune.run.setup import resolve_precision

    t, method, objective = recipe.train, method_of(recipe.method), OBJECTIVES[recipe.objective.name]
    precision, task = resolve_precision(t.precision), assemble.task_of(recipe)
    first = Rows(rows.rows[:ROWS_READ], rows.source, rows.lines[:ROWS_READ] if rows.lines else None)
    examples = assemble.encode(recipe, first, tokenizer, names).examples
    extra = {role: m.to(device)
             for role, m in assemble.build_extra_models(recipe, objective.extra_models(recipe.objective), names).items()}
    trained = assemble.trained(recipe, model, tokenizer, device, precision, names)
    if objective.prepare:
        data = TrainingData(recipe, first, examples, tokenizer, names, device, trained)
        fields = objective.prepare(recipe.objective, task, data, extra)
        examples = [e | f for e, f in zip(examples, fields, strict=True)] if fields else examples
    bound = objective.bind(recipe.objective, linear_ce.training_task(task, model, False), extra, trained)
    setup = StepSetup(bound, method.loss_term, optimizer_for(recipe, device), t.max_grad_norm, t.grad_accum, precision,
                      device, extra)
    return setup, longest_batch(recipe, examples, tokenizer)


def optimizer_for(recipe: Recipe, device: torch.device) -> Callable[[nn.Module], Any]:
    """model -> train.optimizer over its trainable parameters, as ftune/run/setup.py makes it."""
    from ftune.methods import method_of
    from ftune.run.optim import make_optimizer

    t, method = recipe.train, method_of(recipe.method)

    def optimizer(trained_model: nn.Module):
        exempt = method.decay_exempt(trained_model) if method.decay_exempt else []
        return make_optimizer(t.optimizer, [p for p in trained_model.parameters() if p.requires_grad], t.lr,
                              t.weight_decay, exempt, fused=device.type == "cuda")

    return optimizer


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
    return [_stretched(examples[i % len(examples)], d.max_length, d.max_target_length)
            for i in range(recipe.train.batch_size)]


def _stretched(example: dict[str, Any], length: int, target_length: int) -> dict[str, Any]:
    if isinstance(example["input_ids"][0], list):  # a group of sequences: each member on its own
        members = [_stretched({k: v[m] for k, v in example.items()}, length, target_length)
                   for m in range(len(example["input_ids"]))]
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
    """One optimizer step over `batches` (its micro-batches), as the loop takes it (see the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(setup.objective.count(b) for b in batches).clamp(min=1)
    for batch in batches:
        with setup.autocast():
            loss_sum, _ = setup.objective.loss(model, batch)
        loss = loss_sum / count
        if setup.loss_term:
            loss = loss + setup.loss_term(model) / len(batches)
        loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    if setup.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, setup.max_grad_norm)
    elif grads:
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Switch gradient checkpointing on (as the loop does) or off."""
    from ftune.run.setup import enable_gradient_checkpointing

    if on:
        enable_gradient_checkpointing(model)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
