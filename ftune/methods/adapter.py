"""Bottleneck adapters: a small down-project -> non-linearity -> up-project module added to each block.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751: an adapter after the
attention output and after the feed-forward output of every layer, layer norms trainable. Pfeiffer et al. 2021
(arXiv:2005.00247): one adapter after the feed-forward block only. He et al. 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning" (arXiv:2110.04366): a *parallel* adapter reads the sub-block's input and
adds s * adapter(input) to its output, s = 4 by default.

Encoder-decoder models (T5, BART) get adapters in the blocks of both stacks (after self-attention and the
feed-forward block; not after cross-attention, as AdapterHub's default `cross_adapter: false`); `layers` counts the
encoder's blocks first, then the decoder's.

Shapes: d = hidden size, m = bottleneck (default d / reduction_factor, reduction 16 as adapters' SeqBnConfig).
Parameters per adapter: 2md + d + m. The up-projection starts at zero, so step 0 equals the base model exactly;
the down-projection is truncated-normal(std 1e-2) for sequential adapters (Houlsby) and Kaiming-uniform for
parallel ones (He et al., App. A.3). Sequential adapters sit on the output projection, before the dropout that
HF encoders apply ahead of the residual and LayerNorm (AdapterHub applies them just after that dropout).
The modules themselves live in ftune/layers/bottleneck.py.

Switched off (`disabled`), every adapter is skipped; Houlsby's trained layer norms are the one part a flag cannot
undo, so `apply` keeps their pretrained values (2d numbers per norm, non-persistent buffers, as peft keeps the
original of a module it trains) and `disabled` swaps those in for the block, without copying anything then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from pydantic import Field
from torch import nn

from ftune.errors import MethodError
from ftune.layers.bottleneck import AdapterAt, Bottleneck
from ftune.methods import base
from ftune.models.arch import block_norms, block_stacks, hidden_size, replace_submodule


class Config(base.MethodConfig):
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


PRETRAINED = "pretrained_"
"""Prefix of the buffers holding a Houlsby norm's pretrained parameters (`pretrained_weight`, `pretrained_bias`)."""


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if any(isinstance(m, AdapterAt) for m in model.modules()):
        raise MethodError("adapter: the model already has adapters")
    stacks = block_stacks(model)  # an encoder-decoder's blocks count encoder first, then decoder
    placed = [(block, layout) for blocks, layout in stacks for block in blocks]
    chosen = cfg.layers if cfg.layers is not None else range(len(placed))
    if any(i < 0 or i >= len(placed) for i in chosen):
        raise MethodError(f"method.layers: indices must lie in 0..{len(placed) - 1}")
    parallel = cfg.placement == "parallel"
    sites = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}.get(cfg.placement) or (
        ("attn", "ffn") if cfg.parallel_at == "both" else (cfg.parallel_at,)
    )
    d = hidden_size(model)
    m = cfg.bottleneck or max(1, round(d / cfg.reduction_factor))
    scaling = cfg.scaling or (4.0 if parallel else 1.0)
    device = next(model.parameters()).device
    for i in chosen:
        block, layout = placed[i]
        for site in sites:
            out_path = getattr(layout, f"{site}_out")
            adapter = Bottleneck(d, m, cfg.activation, cfg.dropout, scaling, parallel).to(device)
            wrapper = AdapterAt(block.get_submodule(out_path), adapter, parallel)
            replace_submodule(block, out_path, wrapper)
            if parallel:
                block.get_submodule(getattr(layout, f"{site}_in")).register_forward_pre_hook(
                    wrapper.remember_input, with_kwargs=True
                )
    if cfg.placement == "houlsby":  # the values `disabled` brings back; taken before any training
        for norm in block_norms(model):
            for name, p in norm.named_parameters(recurse=False):
                norm.register_buffer(PRETRAINED + name, p.detach().clone(), persistent=False)
    return model


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    params = [p for m in model.modules() if isinstance(m, Bottleneck) for p in m.parameters()]
    if cfg.placement == "houlsby":  # the paper also trains the layer norms of every block
        params += [p for m in block_norms(model) for p in m.parameters(recurse=False)]
    return params


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Every adapter skipped, and Houlsby's norms at their pretrained values (swapped in by reference, not copied)."""
    kept = [
        (p, getattr(m, PRETRAINED + name))
        for m in block_norms(model)
        for name, p in m.named_parameters(recurse=False)
        if hasattr(m, PRETRAINED + name)
    ]
    with base.switched_off(m for m in model.modules() if isinstance(m, AdapterAt)):
        trained = [p.data for p, _ in kept]
        try:
            for p, pretrained in kept:  # neither a copy nor a version bump: a graph built before backpropagates after
                p.data = pretrained
            yield
        finally:
            for (p, _), value in zip(kept, trained):
                p.data = value


METHOD = base.Method(
    name="adapter",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset({base.Claim.SUB_BLOCKS}),
    apply=apply,
    trainable=trainable,
    disabled=disabled,
    runs_with=base.RunsWith(quantized_base=True),
    about=base.About(
        "bottleneck adapters: houlsby, pfeiffer or parallel placement",
        "Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247; He et al. 2022, "
        "arXiv:2110.04366",
        base.Recommended(2e-3, "ftune's adapter_sst2 recipe (README); Houlsby et al. 2019 search {3e-5, 3e-4, 3e-3}"),
    ),
)
