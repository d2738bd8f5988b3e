"""One optimizer step, written once: the training loop (ftune/run/train.py) and the memory estimate
(ftune/estimate/step.py) take their steps through these functions, so the estimate measures the step that runs
(tests/test_layers.py checks that both call them).

A step is `grad_accum` micro-steps (the forward under mixed precision, the objective's loss as (sum, count), the
method's loss term, backward), then the gradient norm (clipped when train.max_grad_norm is set), then the update
(optimizer, schedule, the method's step-end hook, zero_grad). What varies between the two callers is passed in:
accelerate's autocast, backward and clipping in the loop, torch's in the estimate. The optimizer and the learning-rate
schedule are built in ftune/step/optim.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


def micro_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    *,
    scale: torch.Tensor | float,
    loss_term: Callable[[nn.Module], torch.Tensor] | None,
    term_model: nn.Module,
    grad_accum: int,
    autocast: Callable[[], AbstractContextManager],
    backward: Callable[[torch.Tensor], None],
) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns the loss it backpropagated, detached (a scalar).

    `loss`: the bound objective's `(model, batch) -> (sum, count)`; its sum is multiplied by `scale` (the loop: the
    processes DDP averages over / the step's count, so the step's loss is the mean over every row or token it saw).
    `loss_term`: the method's regulariser, computed on `term_model` (the module `attach` returned, not a DDP
    wrapper) and divided by `grad_accum`, so it counts once per optimizer step whatever grad_accum is."""
    with autocast():
        loss_sum, _ = loss(model, batch)
    value = loss_sum * scale
    if loss_term is not None:
        value = value + loss_term(term_model) / grad_accum
    backward(value)
    return value.detach()


def gradient_norm(
    params: list[nn.Parameter], max_norm: float | None, clip: Callable[[list[nn.Parameter], float], torch.Tensor]
) -> torch.Tensor:
    """The total gradient norm of `params`, clipped to `max_norm` by `clip` when it is set; computed either way (a
    non-finite norm drops the step). Zero when no parameter has a gradient."""
    if max_norm:
        return clip(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def update(optimizer: Any, scheduler: Any = None, step_end: Callable[[], None] | None = None) -> None:
    """Apply the step: the optimizer, the schedule, the method's step-end hook (before zero_grad: AdaLoRA's budget
    reads the gradients), then the gradients released (set to None: no zero tensors kept between steps)."""
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if step_end is not None:
        step_end()
    optimizer.zero_grad(set_to_none=True)
