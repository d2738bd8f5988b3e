"""What several training processes agree on, in one place: the loop calls these and stays the same for one
process or many (DDP, FSDP through accelerate). With one process each is a no-op or an identity.

Every decision that changes what happens next (skip or stop on a non-finite step, which weights are best) is taken
from values every process holds after a collective, so the processes never diverge; only the main process writes.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator


def total(accelerator: Accelerator, value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the processes (on the accelerator's device)."""
    value = value.to(accelerator.device)
    return accelerator.reduce(value, "sum") if accelerator.num_processes > 1 else value


def mean(accelerator: Accelerator, value: torch.Tensor) -> torch.Tensor:
    value = value.to(accelerator.device)
    return accelerator.reduce(value, "mean") if accelerator.num_processes > 1 else value


def gather(accelerator: Accelerator, obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in rank order, on every process."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def barrier(accelerator: Accelerator) -> None:
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
