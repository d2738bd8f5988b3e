"""Selective layers: the top-k transformer blocks and/or chosen module types train, the rest is frozen.

Training only the top of the network is the classic partial fine-tuning baseline (Lee et al. 2019, "What Would
Elsa Do? Freezing Layers During Transformer Fine-Tuning", arXiv:1911.03090). Blocks are found structurally
(`transformer_blocks`); module types are matched by class name (`LayerNorm`, `LlamaRMSNorm`, `Embedding`, ...).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from ftune.errors import MethodError
from ftune.methods import base
from ftune.models.arch import transformer_blocks


class Config(base.MethodConfig):
    name: Literal["layers"] = "layers"
    top_k: int = Field(0, ge=0)
    """Number of transformer blocks, counted from the output side, that train."""
    module_types: list[str] = Field(default_factory=list)
    """Class names of modules that train wherever they occur, e.g. [LayerNorm] or [LlamaRMSNorm]."""

    @model_validator(mode="after")
    def _selects_something(self) -> Config:
        if self.top_k == 0 and not self.module_types:
            raise ValueError("set top_k > 0 and/or module_types, else nothing but the head trains (use `head`)")
        return self


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    if cfg.top_k:
        blocks = transformer_blocks(model)
        if cfg.top_k > len(blocks):
            raise MethodError(f"method.top_k: {cfg.top_k} exceeds the {len(blocks)} blocks of this model")
        for block in blocks[len(blocks) - cfg.top_k :]:
            params.extend(block.parameters())
    present = {type(m).__name__ for m in model.modules()}
    for type_name in cfg.module_types:
        if type_name not in present:
            raise MethodError(
                f"method.module_types: no {type_name!r} in {type(model).__name__}; "
                f"types with weights here: {', '.join(sorted(_weighted_types(model)))}"
            )
        for m in model.modules():
            if type(m).__name__ == type_name:
                params.extend(m.parameters(recurse=False))
    return params


def _weighted_types(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))}


METHOD = base.Method(
    name="layers",
    config_cls=Config,
    trains=base.Trains.EXISTING,
    claims=frozenset(),
    trainable=trainable,
    merging=base.ALREADY_MERGED,
    about=base.About(
        "top-k blocks and/or named module types train",
        "Lee et al. 2019, What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning, arXiv:1911.03090",
        base.Recommended(
            3e-4,
            "the top two blocks, above full fine-tuning's 1e-4 as fewer weights train (ULMFiT "
            "gives the top layers the highest rates); at 1e-4 a tiny model barely moved in 40 "
            "steps (tests/test_learns.py)",
            options={"top_k": 2},
        ),
    ),
)
