"""LoRA: low-rank updates to frozen linear layers.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685. A frozen linear
W (d_out x d_in) computes W x + (alpha / r) * B A dropout(x), with A (r x d_in) and B (d_out x r). As in the reference
code and peft, A starts Kaiming-uniform (a = sqrt(5)) and B at zero, so step 0 equals the base model exactly.
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead, which keeps the update's size
stable as r grows. Defaults follow peft: r = 8, alpha = 8, dropout = 0.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ftune.errors import MethodError
from ftune.methods.base import Method, MethodConfig


class Config(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    """Rank of the update: A is r x d_in, B is d_out x r."""
    alpha: float = Field(8.0, gt=0)
    """The update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the input of the low-rank path only."""
    targets: list[str] | Literal["all-linear"] = "all-linear"
    """Linear layers to adapt, by module name or name suffix (e.g. [query, value]), or every linear of the body."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        base_layer: the linear layer to adapt; shapes (d_out, d_in).
        r: rank of the update.
        scaling: multiplier of B A (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout: dropout probability on the low-rank path's input.
    """

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        # fp32 factors even over a bf16 base: tiny updates to B vanish in bf16 rounding otherwise
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)  # Kaiming-uniform(a=sqrt 5)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(d_out, d_in): the dense update the low-rank path adds."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> None:
        if not self.merged:
            weight = self.base_layer.weight
            weight.data = (weight.data.float() + self.delta_weight().detach()).to(weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight
            weight.data = (weight.data.float() - self.delta_weight().detach()).to(weight.dtype)
            self.merged = False


def target_linears(model: nn.Module, targets: list[str] | str) -> dict[str, nn.Linear]:
    """The linear layers `targets` names, by full module name. `all-linear` means every linear of the body."""
    body = model.base_model
    prefix = next(n for n, m in model.named_modules() if m is body)
    linears = {f"{prefix}.{n}" if prefix else n: m for n, m in body.named_modules() if type(m) is nn.Linear}
    if targets == "all-linear":
        found = linears
    else:
        found = {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in targets)}
        for t in targets:
            if not any(n == t or n.endswith("." + t) for n in found):
                names = sorted({n.rsplit(".", 1)[-1] for n in linears})
                raise MethodError(f"method.targets: {t!r} matches no linear layer; names here: {', '.join(names)}")
    if not found:
        raise MethodError(f"method.targets: {type(model).__name__} has no nn.Linear layers to adapt")
    return found


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise MethodError("lora: the model already has LoRA layers")
    scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
    for name, linear in target_linears(model, cfg.targets).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, cfg.r, scaling, cfg.dropout))
    return model


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A.weight, m.lora_B.weight)]


def merge(model: nn.Module) -> None:
    for m in (m for m in model.modules() if isinstance(m, LoRALinear)):
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in (m for m in model.modules() if isinstance(m, LoRALinear)):
        m.unmerge()


def peft_config(model: nn.Module, cfg: Config) -> dict[str, Any]:
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {
        "peft_type": "LORA",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": wrapped,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }


METHOD = Method(
    name="lora",
    config_cls=Config,
    apply=apply,
    trainable=trainable,
    merge=merge,
    unmerge=unmerge,
    peft_config=peft_config,
    summary="low-rank updates B A on frozen linears (rsLoRA option)",
    paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685",
)
