"""Mixed precision, once: `train.precision` resolved for this machine and the autocast context it means. The loop
(through accelerate, which wraps the forward in the same context), its memory estimate, evaluation and what an
objective computes before training (DPO's reference) all use it, so their numbers agree."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each mixed precision; "fp32" has none."""


def resolve_precision(requested: str) -> str:
    """`train.precision` as this machine runs it: "auto" is bf16 on a GPU that supports it, else fp32."""
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The mixed-precision context of a resolved `precision` on `device` ("fp32": none)."""
    dtype = AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
