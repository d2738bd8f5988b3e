"""Full fine-tuning: every weight trains (the baseline every PEFT paper compares against)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ftune.methods.base import Method, MethodConfig, fold_nothing


class Config(MethodConfig):
    name: Literal["full"] = "full"


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    return list(model.parameters())


METHOD = Method(
    name="full",
    claims=frozenset({"every weight"}),
    config_cls=Config,
    trainable=trainable,
    merge=fold_nothing,
    unmerge=fold_nothing,
    summary="every weight trains",
    paper="Howard & Ruder 2018, Universal Language Model Fine-tuning (ULMFiT), arXiv:1801.06146",
)
