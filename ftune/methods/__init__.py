"""The method registry: one file per method, one entry each (tests/test_methods.py keeps files and registry in step)."""

from __future__ import annotations

import operator
from functools import reduce
from typing import Annotated

from pydantic import AfterValidator, Field
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
    l2sp,
    layers,
    lora,
    mam_adapter,
    p_tuning,
    p_tuning_v2,
    prefix_tuning,
    prompt_tuning,
    shrink,
    sparse,
    unipelt,
)
from ftune.methods.base import Method, MethodConfig, Trains, set_trainable

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        full.METHOD,
        head.METHOD,
        layers.METHOD,
        bitfit.METHOD,
        lora.METHOD,
        adapter.METHOD,
        adapter_drop.METHOD,
        adapter_fusion.METHOD,
        prompt_tuning.METHOD,
        p_tuning.METHOD,
        prefix_tuning.METHOD,
        p_tuning_v2.METHOD,
        adalora.METHOD,
        compose.METHOD,
        mam_adapter.METHOD,
        unipelt.METHOD,
        sparse.METHOD,
        l2sp.METHOD,
        shrink.METHOD,
    )
}

_AnyPart = Annotated[reduce(operator.or_, (m.config_cls for m in METHODS.values())), Field(discriminator="name")]


def _trains_something(cfg: MethodConfig) -> MethodConfig:
    if METHODS[cfg.name].trains is Trains.NOTHING:  # L2-SP, shrink: a part that adds to what another method trains
        raise ValueError(
            f"{cfg.name} trains nothing itself; list it with a method that trains pretrained weights, "
            f"e.g. method: [{{name: full}}, {{name: {cfg.name}}}]"
        )
    return cfg


AnyMethodConfig = Annotated[_AnyPart, AfterValidator(_trains_something)]
"""A recipe's method: any registered method that trains something on its own."""
compose.Config.model_rebuild(_types_namespace={"AnyMethodConfig": _AnyPart})  # its parts are any method


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
