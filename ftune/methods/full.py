"""Full fine-tuning: every weight trains (the baseline every PEFT paper compares against)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ftune.methods.base import Method, MethodConfig, Recommended, fold_nothing


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
    recommended=Recommended(1e-4, 'Turc et al. 2019 (arXiv:1908.08962) tune small BERTs at {1e-4, 5e-5, 3e-5}; '
                            'BERT-base uses 2e-5 to 5e-5 (Devlin et al. 2019, App. A.3); the top of the '
                            'small-model range suits short budgets'),
)
