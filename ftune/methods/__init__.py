"""The method registry: one file per method, one entry each (a test keeps files, registry and union in sync)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from ftune.methods import (
    adalora,
    adapter,
    adapter_drop,
    adapter_fusion,
    bitfit,
    compose,
    full,
    head,
    layers,
    lora,
    mam_adapter,
    p_tuning,
    p_tuning_v2,
    prefix_tuning,
    prompt_tuning,
    unipelt,
)
from ftune.methods.base import Method, MethodConfig, set_trainable

METHODS: dict[str, Method] = {
    m.name: m
    for m in (full.METHOD, head.METHOD, layers.METHOD, bitfit.METHOD, lora.METHOD, adapter.METHOD, adapter_drop.METHOD,
              adapter_fusion.METHOD, prompt_tuning.METHOD, p_tuning.METHOD, prefix_tuning.METHOD, p_tuning_v2.METHOD,
              adalora.METHOD, compose.METHOD, mam_adapter.METHOD, unipelt.METHOD)
}

AnyMethodConfig = Annotated[
    full.Config | head.Config | layers.Config | bitfit.Config | lora.Config | adapter.Config | adapter_drop.Config
    | adapter_fusion.Config | prompt_tuning.Config | p_tuning.Config | prefix_tuning.Config | p_tuning_v2.Config
    | adalora.Config | compose.Config | mam_adapter.Config | unipelt.Config,
    Field(discriminator="name"),
]
compose.Config.model_rebuild(_types_namespace={"AnyMethodConfig": AnyMethodConfig})  # its parts are any method


def method_of(cfg: MethodConfig) -> Method:
    """The record that serves `cfg`: the registry entry, or, for a method built from other methods (compose and the
    hybrids), the record its parts make for this config."""
    method = METHODS[cfg.name]
    return method.resolve(cfg) if method.resolve else method


def attach(model: nn.Module, cfg: MethodConfig, head: list[nn.Parameter]) -> nn.Module:
    """Apply the method named by `cfg` and set what trains: the method's parameters, plus `head` if asked.

    `head` is the task head and any weight the checkpoint lacked (see `models.head_parameters`): a new classifier
    must learn whichever method adapts the body.
    """
    method = method_of(cfg)
    model = method.apply(model, cfg)
    params = list(method.trainable(model, cfg))
    set_trainable(model, params + (head if cfg.train_head else []))
    return model
