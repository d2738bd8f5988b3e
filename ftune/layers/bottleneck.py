"""Bottleneck adapters and the wrapper that puts one after (or beside) a sub-block's output projection.

Houlsby et al. 2019, arXiv:1902.00751 (sequential, after the sub-block); He et al. 2022, arXiv:2110.04366 (parallel,
beside it, reading the sub-block's input). The `adapter` method (ftune/methods/adapter.py) says where they go and
how they start; AdapterDrop, AdapterFusion, MAM and UniPELT reuse them. Shapes: d = hidden size, m = bottleneck.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ftune.models.arch import block_stacks, first_input

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """d -> m -> d: up(dropout(act(down(x)))) * scaling. Shapes: x (..., d) -> (..., d)."""

    def __init__(self, d: int, m: int, activation: str, dropout: float, scaling: float, parallel: bool) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(d, m), nn.Linear(m, d)
        if parallel:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        else:
            nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
        for zero_at_start in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(zero_at_start)
        self.act, self.dropout, self.scaling = ACTIVATIONS[activation](), nn.Dropout(dropout), scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scaling


class AdapterAt(nn.Module):
    """An output projection followed (sequential) or accompanied (parallel) by a bottleneck adapter.

    Sequential: y + adapter(y). Parallel: y + adapter(x_in), where x_in is the sub-block's input, handed over by a
    forward pre-hook on the sub-block (`block_input`), because the projection alone never sees it. `active = False`
    skips the adapter entirely (AdapterDrop's choice per batch), and so does `enabled = False` (the method switched
    off, `Method.disabled`: no dropout draw, no gate call); a `gate` (UniPELT) scales its output by g(adapter input),
    (B, 1, 1), or (B, T, 1) per position.
    """

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck, parallel: bool) -> None:
        super().__init__()
        self.base_layer, self.adapter, self.parallel = base_layer, adapter, parallel
        self.active, self.enabled, self.gate = True, True, None
        self.block_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        source, self.block_input = (self.block_input if self.parallel else y), None
        if not (self.active and self.enabled):
            return y
        if not torch.is_autocast_enabled(source.device.type):  # autocast casts by itself; a copy would be wasted
            source = source.to(self.adapter.down.weight.dtype)
        out = self.adapter(source)
        return y + (out if self.gate is None else out * self.gate(source)).to(y.dtype)

    def remember_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.block_input = first_input(args, kwargs)


def adapters_by_block(model: nn.Module) -> list[list[AdapterAt]]:
    """The adapter wrappers of each block, in block order (encoder before decoder; for AdapterDrop and reports)."""
    return [
        [m for m in block.modules() if isinstance(m, AdapterAt)]
        for blocks, _ in block_stacks(model)
        for block in blocks
    ]
