"""Full fine-tuning: every weight trains (the baseline every PEFT paper compares against)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ftune.methods import base


class Config(base.MethodConfig):
    name: Literal["full"] = "full"


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    return list(model.parameters())


METHOD = base.Method(
    name="full",
    config_cls=Config,
    trains=base.Trains.EXISTING,
    claims=frozenset({base.Claim.EVERY_WEIGHT}),
    trainable=trainable,
    merging=base.ALREADY_MERGED,
    about=base.About(
        "every weight trains",
        "Howard & Ruder 2018, Universal Language Model Fine-tuning (ULMFiT), arXiv:1801.06146",
        base.Recommended(
            1e-4,
            "Turc et al. 2019 (arXiv:1908.08962) tune small BERTs at {1e-4, 5e-5, 3e-5}; "
            "BERT-base uses 2e-5 to 5e-5 (Devlin et al. 2019, App. A.3); the top of the "
            "small-model range suits short budgets",
        ),
    ),
)
