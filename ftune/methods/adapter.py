"""Bottleneck adapters: a small down-project -> non-linearity -> up-project module added to each block.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751: an adapter after the
attention output and after the feed-forward output of every layer, layer norms trainable. Pfeiffer et al. 2021
(arXiv:2005.00247): one adapter after the feed-forward block only. He et al. 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning" (arXiv:2110.04366): a *parallel* adapter reads the sub-block's input and
adds s * adapter(input) to its output, s = 4 by default.

Shapes: d = hidden size, m = bottleneck (default d / reduction_factor, reduction 16 as adapters' SeqBnConfig).
Parameters per adapter: 2md + d + m. The up-projection starts at zero, so step 0 equals the base model exactly;
the down-projection is truncated-normal(std 1e-2) for sequential adapters (Houlsby) and Kaiming-uniform for
parallel ones (He et al., App. A.3). Sequential adapters sit on the output projection, before the dropout that
HF encoders apply ahead of the residual and LayerNorm (AdapterHub applies them just after that dropout).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ftune.arch import blocks_with_layout, first_input, replace_submodule
from ftune.errors import MethodError
from ftune.methods.base import Method, MethodConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Config(MethodConfig):
    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    """houlsby: after attention and feed-forward (+ trainable norms); pfeiffer: after feed-forward; parallel:
    beside the sub-blocks named by `parallel_at`."""
    bottleneck: int | None = Field(None, gt=0)
    """Bottleneck width m; default hidden_size / reduction_factor."""
    reduction_factor: float = Field(16.0, gt=0)
    """m = d / reduction_factor when `bottleneck` is not set."""
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    """Non-linearity between the projections."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the bottleneck activations."""
    layers: list[int] | None = None
    """Block indices that get adapters (0 = nearest the input); default all."""
    parallel_at: Literal["ffn", "attn", "both"] = "ffn"
    """Parallel placement only: beside the feed-forward block, the attention block, or both."""
    scaling: float | None = Field(None, gt=0)
    """Multiplier of the adapter output; default 4 for parallel adapters (He et al.), 1 otherwise."""


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
    skips the adapter entirely (AdapterDrop); a `gate` (UniPELT) scales its output by g(adapter input), (B, 1, 1).
    """

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck, parallel: bool) -> None:
        super().__init__()
        self.base_layer, self.adapter, self.parallel = base_layer, adapter, parallel
        self.active, self.gate = True, None
        self.block_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        source, self.block_input = (self.block_input if self.parallel else y), None
        if not self.active:
            return y
        if not torch.is_autocast_enabled(source.device.type):  # autocast casts by itself; a copy would be wasted
            source = source.to(self.adapter.down.weight.dtype)
        out = self.adapter(source)
        return y + (out if self.gate is None else out * self.gate(source)).to(y.dtype)

    def remember_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.block_input = first_input(args, kwargs)


def hidden_size(model: nn.Module) -> int:
    return getattr(model.config, "hidden_size", None) or model.config.n_embd


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if any(isinstance(m, AdapterAt) for m in model.modules()):
        raise MethodError("adapter: the model already has adapters")
    blocks, layout = blocks_with_layout(model)
    chosen = cfg.layers if cfg.layers is not None else range(len(blocks))
    if any(i < 0 or i >= len(blocks) for i in chosen):
        raise MethodError(f"method.layers: indices must lie in 0..{len(blocks) - 1}")
    parallel = cfg.placement == "parallel"
    sites = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}.get(cfg.placement) or (
        ("attn", "ffn") if cfg.parallel_at == "both" else (cfg.parallel_at,))
    d = hidden_size(model)
    m = cfg.bottleneck or max(1, round(d / cfg.reduction_factor))
    scaling = cfg.scaling or (4.0 if parallel else 1.0)
    device = next(model.parameters()).device
    for i in chosen:
        for site in sites:
            out_path = getattr(layout, f"{site}_out")
            adapter = Bottleneck(d, m, cfg.activation, cfg.dropout, scaling, parallel).to(device)
            wrapper = AdapterAt(blocks[i].get_submodule(out_path), adapter, parallel)
            replace_submodule(blocks[i], out_path, wrapper)
            if parallel:
                blocks[i].get_submodule(getattr(layout, f"{site}_in")).register_forward_pre_hook(
                    wrapper.remember_input, with_kwargs=True)
    return model


def adapters_by_block(model: nn.Module) -> list[list[AdapterAt]]:
    """The adapter wrappers of each block, in block order (for AdapterDrop and reports)."""
    blocks, _ = blocks_with_layout(model)
    return [[m for m in block.modules() if isinstance(m, AdapterAt)] for block in blocks]


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    params = [p for m in model.modules() if isinstance(m, Bottleneck) for p in m.parameters()]
    if cfg.placement == "houlsby":  # the paper also trains the layer norms of every block
        blocks, _ = blocks_with_layout(model)
        params += [p for block in blocks for m in block.modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
                   for p in m.parameters(recurse=False)]
    return params


METHOD = Method(
    name="adapter",
    config_cls=Config, quantized_base=True, claims=frozenset({"sub-block outputs"}),
    apply=apply, trainable=trainable,
    summary="bottleneck adapters: houlsby, pfeiffer or parallel placement",
    paper="Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247; He et al. 2022, arXiv:2110.04366",
)
