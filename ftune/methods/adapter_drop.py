"""AdapterDrop: bottleneck adapters whose lowest k blocks are skipped, for speed.

Rücklé et al. 2021, "AdapterDrop: On the Efficiency of Adapters in Transformers", arXiv:2010.11918. The adapters
of blocks 0..k-1 are not computed at all. Specialised AdapterDrop fixes k in training; robust AdapterDrop draws
k ~ U{0, ..., drop_first} for every training batch so one model serves any k at inference (the paper's 12-layer
models draw from 0..11; its main result uses k = 5). Evaluation uses `inference_drop`. All other options and the
modules are those of `adapter`: this method only decides which of them run. Switched off (`disabled`, as
`adapter`'s) it draws no k either, so the random stream is the base model's.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ftune.layers.bottleneck import adapters_by_block
from ftune.methods import adapter, base


class Config(adapter.Config):
    name: Literal["adapter_drop"] = "adapter_drop"
    drop_first: int = Field(5, ge=0)
    """k: adapters of the first k blocks are skipped in training (the upper bound of k when robust)."""
    robust: bool = False
    """Draw k uniformly from 0..drop_first for every training batch."""
    inference_drop: int = Field(0, ge=0)
    """k used in evaluation and inference."""


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    model = adapter.apply(model, cfg)
    per_block = adapters_by_block(model)

    def choose_dropped_blocks(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not all(w.enabled for wrappers in per_block for w in wrappers):  # switched off: no draw, as no adapter
            return
        if module.training:
            # the global torch RNG: seeded by the recipe and restored on --resume, so the draws replay exactly
            k = int(torch.randint(0, cfg.drop_first + 1, ())) if cfg.robust else cfg.drop_first
        else:
            k = cfg.inference_drop
        for i, wrappers in enumerate(per_block):
            for wrapper in wrappers:
                wrapper.active = i >= k

    model.register_forward_pre_hook(choose_dropped_blocks, with_kwargs=True)
    return model


METHOD = base.Method(
    name="adapter_drop",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset({base.Claim.SUB_BLOCKS}),
    apply=apply,
    trainable=adapter.trainable,
    disabled=adapter.disabled,
    runs_with=base.RunsWith(quantized_base=True, unused_parameters=True),
    about=base.About(
        "adapters of the lowest k blocks skipped (fixed or robust k; k at inference)",
        "Rücklé et al. 2021, AdapterDrop, arXiv:2010.11918",
        base.Recommended(2e-3, "as `adapter` (Rücklé et al. 2021 train AdapterDrop as the adapters they drop)"),
    ),
)
