"""LoRA: low-rank updates to frozen linear layers (options: rsLoRA scaling, DoRA; a quantised base is QLoRA).

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685. A frozen linear
W (d_out x d_in) computes W x + (alpha / r) * B A dropout(x), with A (r x d_in) and B (d_out x r). As in the reference
code and peft, A starts Kaiming-uniform (a = sqrt(5)) and B at zero, so step 0 equals the base model exactly.
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead, which keeps the update's size
stable as r grows. DoRA (Liu et al. 2024, arXiv:2402.09353) adds a learned magnitude per output row. Over a 4/8-bit
base (`model.quantization`, Dettmers et al. 2023) this is QLoRA. Defaults follow peft: r = 8, alpha = 8, dropout = 0.
The layer itself lives in `ftune/layers/lora.py`.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any, Literal

from pydantic import Field
from torch import nn

from ftune.errors import MethodError
from ftune.layers.lora import LoRALinear
from ftune.methods import base
from ftune.models.arch import attention_sites, block_stacks
from ftune.models.quantize import is_quantized_linear


class Config(base.MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    """Rank of the update: A is r x d_in, B is d_out x r."""
    alpha: float = Field(8.0, gt=0)
    """The update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the input of the low-rank path only."""
    targets: list[str] | Literal["all-linear", "query-value"] = "all-linear"
    """Linear layers to adapt, by module name or name suffix (e.g. [query, value]), every linear of the body, or
    each attention's query and value projections whatever the architecture calls them (the LoRA paper's choice)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    dora: bool = False
    """DoRA: also learn a magnitude per output row, W' = m (W + s B A) / ||W + s B A||_row (peft's use_dora)."""


def target_linears(model: nn.Module, targets: list[str] | str) -> dict[str, nn.Module]:
    """The linear layers `targets` names, by full module name. `all-linear` means every linear of the body.

    A linear is an nn.Linear (not a subclass with other semantics) or a bitsandbytes 4/8-bit linear (QLoRA).
    """
    body = model.base_model
    prefix = next(n for n, m in model.named_modules() if m is body)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # a seq2seq model (T5) is its own base_model: its output layer lies inside `body`, and is no part of it
    linears = {
        f"{prefix}.{n}" if prefix else n: m
        for n, m in body.named_modules()
        if (type(m) is nn.Linear or is_quantized_linear(m)) and m is not output
    }
    if targets == "all-linear":
        found = linears
    elif targets == "query-value":
        found = {n: m for n, m in linears.items() if any(m is q for q in attention_query_value(model))}
    else:
        found = {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in targets)}
        for t in targets:
            if not any(n == t or n.endswith("." + t) for n in found):
                names = sorted({n.rsplit(".", 1)[-1] for n in linears})
                raise MethodError(f"method.targets: {t!r} matches no linear layer; names here: {', '.join(names)}")
    if not found:
        raise MethodError(f"method.targets: {type(model).__name__} has no nn.Linear layers to adapt")
    return found


def attention_query_value(model: nn.Module) -> list[nn.Module]:
    """Each attention's Wq and Wv: self-attention in every stack, and an encoder-decoder's cross-attention."""
    found = []
    for blocks, layout in block_stacks(model):
        for _, query_value in attention_sites(layout):
            if query_value is None:
                raise MethodError(
                    f"method.targets: {model.config.model_type} fuses its query and value projections; "
                    "name the linears to adapt instead"
                )
            found += [block.get_submodule(path) for block in blocks for path in query_value]
    return found


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise MethodError("lora: the model already has LoRA layers")
    scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
    for name, linear in target_linears(model, cfg.targets).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, cfg.r, scaling, cfg.dropout, cfg.dora))
    return model


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    return [
        p
        for m in layers
        for part in (m.lora_A, m.lora_B, m.lora_magnitude_vector)
        if part is not None
        for p in part.parameters()
    ]


def disabled(model: nn.Module) -> AbstractContextManager[None]:
    """Every LoRA layer computes its base layer alone (DoRA's magnitude and a UniPELT gate included)."""
    return base.switched_off(m for m in model.modules() if isinstance(m, LoRALinear))


def peft_config(model: nn.Module, cfg: Config) -> dict[str, Any]:
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {
        "peft_type": "LORA",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "target_modules": wrapped,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }


METHOD = base.Method(
    name="lora",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset({base.Claim.LINEARS}),
    apply=apply,
    trainable=trainable,
    disabled=disabled,
    merging=base.module_merging(lambda model: [m for m in model.modules() if isinstance(m, LoRALinear)]),
    saving=base.Saving(peft=base.Peft(peft_config)),
    runs_with=base.RunsWith(quantized_base=True),
    about=base.About(
        "low-rank updates B A on frozen linears (rsLoRA, DoRA options; QLoRA over model.quantization)",
        "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685",
        base.Recommended(
            1e-3,
            "ftune's lora_sst2 recipe (README); Hu et al. 2021 train RoBERTa-base at 4e-4 to 5e-4 for 30+ epochs",
            options={"alpha": 16},
        ),
    ),
)
