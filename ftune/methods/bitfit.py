"""BitFit: train only the bias terms (and the task head).

Ben Zaken, Ravfogel & Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models", arXiv:2106.10199. Biases are found structurally: the `bias` parameter a module owns (Linear,
LayerNorm, ...). Models without biases (Llama's linears, RMSNorm) are refused rather than silently trained as a
head-only run.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ftune.errors import MethodError
from ftune.methods import base


class Config(base.MethodConfig):
    name: Literal["bitfit"] = "bitfit"


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    biases = [m.bias for m in model.base_model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)]
    if not biases:
        raise MethodError(f"bitfit: {type(model).__name__} has no bias parameters; use lora or layers instead")
    return biases


METHOD = base.Method(
    name="bitfit",
    config_cls=Config,
    trains=base.Trains.EXISTING,
    claims=frozenset(),
    trainable=trainable,
    merging=base.ALREADY_MERGED,
    about=base.About(
        "only bias terms (+ task head) train",
        "Ben Zaken et al. 2022, BitFit, arXiv:2106.10199",
        base.Recommended(
            2e-3, "ftune's bitfit_sst2 recipe (README); Ben Zaken et al. 2022 search 1e-4 to 1e-3 over longer runs"
        ),
    ),
)
