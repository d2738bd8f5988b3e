"""AdaLoRA: SVD-form low-rank updates whose ranks are reallocated across matrices during training.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023,
arXiv:2303.10512. Each target linear W (d_out x d_in) gains alpha / init_r · P Λ Q with P (d_out x init_r),
Λ (init_r x 1, starting at 0) and Q (init_r x d_in): `svd_lora.SVDLinear`, as peft's. Training adds
orth_reg_weight · R(P, Q) to the loss (`loss_term`; peft adds it to outputs.loss in eval too, ftune's eval loss is the
task's). After every optimizer step `on_step_end` updates each triplet's importance and masks to a cubic budget falling
from init_r to target_r per matrix (`svd_lora.allocate`); `report` lists the final rank of every matrix. The schedule
spans the run's optimizer steps, passed in by the loop (no peft `total_step` to keep in step by hand).

Defaults: init_r 12, target_r 8 (peft; the reference README); beta1 = beta2 = 0.85 (paper, reference code, peft);
tinit 0, tfinal 0, deltaT 1, orth_reg_weight 0.5 (peft; the paper's grid is 0.1-0.5, the reference README uses 0.1);
alpha 8, dropout 0 (peft's LoRA defaults, as ftune's lora); targets all-linear (as ftune's lora).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ftune.errors import MethodError
from ftune.layers import svd as svd_lora
from ftune.layers.svd import SVDLinear, svd_layers
from ftune.methods import base
from ftune.methods.lora import target_linears


class Config(base.MethodConfig):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0)
    """Rank every adapted matrix starts with."""
    target_r: int = Field(8, gt=0)
    """Average rank per matrix at the end: the final budget is target_r x the number of adapted matrices."""
    alpha: float = Field(8.0, gt=0)
    """The update is scaled by alpha / init_r (peft's lora_alpha)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the input of the update path only."""
    targets: list[str] | Literal["all-linear"] = "all-linear"
    """Linear layers to adapt, by module name or name suffix (e.g. [query, value]), or every linear of the body."""
    tinit: int = Field(0, ge=0)
    """Optimizer steps at the full budget before pruning starts."""
    tfinal: int = Field(0, ge=0)
    """Last optimizer steps at the final ranks (fixed; importance no longer updated)."""
    deltaT: int = Field(1, gt=0)
    """Optimizer steps between maskings while the budget falls."""
    beta1: float = Field(0.85, gt=0, lt=1)
    """EMA coefficient of the sensitivity |w · grad|."""
    beta2: float = Field(0.85, gt=0, lt=1)
    """EMA coefficient of the uncertainty |sensitivity - its EMA|."""
    orth_reg_weight: float = Field(0.5, ge=0)
    """Weight of the orthogonality regulariser on P and Q."""

    @model_validator(mode="after")
    def _falling_budget(self) -> Config:
        if self.target_r >= self.init_r:
            raise ValueError(
                f"target_r ({self.target_r}) must be below init_r ({self.init_r}): AdaLoRA prunes each "
                "matrix from init_r towards an average of target_r (for fixed ranks use lora)"
            )
        return self


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if svd_layers(model):
        raise MethodError("adalora: the model already has AdaLoRA layers")
    for name, linear in target_linears(model, cfg.targets).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, SVDLinear(linear, cfg.init_r, cfg.alpha, cfg.dropout))
    model.adalora_config = cfg  # what on_step_end, loss_term and report read: they get the model only
    return model


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    return [p for m in svd_layers(model).values() for p in (m.lora_A, m.lora_E, m.lora_B)]


def loss_term(model: nn.Module) -> torch.Tensor:
    """orth_reg_weight · R(P, Q), a scalar (see `svd_lora.orthogonality`)."""
    return model.adalora_config.orth_reg_weight * svd_lora.orthogonality(list(svd_layers(model).values()))


def disabled(model: nn.Module) -> AbstractContextManager[None]:
    return base.switched_off(svd_layers(model).values())


def check_total_steps(cfg: Config, total_steps: int) -> None:
    if cfg.tinit + cfg.tfinal >= total_steps:
        raise MethodError(
            f"method.tinit + method.tfinal ({cfg.tinit} + {cfg.tfinal}) must be below the run's "
            f"{total_steps} optimizer steps, to leave steps where the rank budget falls; lower them "
            "or train longer"
        )


def on_step_end(model: nn.Module, step: int, total_steps: int) -> None:
    svd_lora.allocate(list(svd_layers(model).values()), step, total_steps, model.adalora_config)


def report(model: nn.Module) -> dict[str, Any]:
    """Total rank reached (budget) against the target and initial budgets, R(P, Q), and the rank of each matrix."""
    cfg, layers = model.adalora_config, svd_layers(model)
    ranks = {name: int(m.rank_mask.sum()) for name, m in layers.items()}
    with torch.no_grad():
        orthogonality = float(svd_lora.orthogonality(list(layers.values())))
    return {
        "budget": sum(ranks.values()),
        "target_budget": cfg.target_r * len(ranks),
        "initial_budget": cfg.init_r * len(ranks),
        "orthogonality": orthogonality,
        "ranks": ranks,
    }


METHOD = base.Method(
    name="adalora",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset({base.Claim.LINEARS}),
    apply=apply,
    trainable=trainable,
    disabled=disabled,
    merging=base.module_merging(lambda model: svd_layers(model).values()),
    saving=base.Saving(peft=base.Peft(svd_lora.peft_config)),
    hooks=base.Hooks(
        loss_term=loss_term,
        on_step_end=on_step_end,
        check_total_steps=check_total_steps,
        report=report,
        resume=base.Resume(svd_lora.training_state, svd_lora.load_training_state),
    ),
    about=base.About(
        "SVD-form updates P Λ Q whose ranks are reallocated by importance to a budget (ranks in method_report.json)",
        "Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning, arXiv:2303.10512",
        base.Recommended(1e-2, "the best of MiniLM / SST-2 runs at 1e-2, 3e-3 and 1e-3 (README)", {"alpha": 16}),
    ),
)
