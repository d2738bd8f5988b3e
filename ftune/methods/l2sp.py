"""L2-SP: pull the pretrained weights that train toward their starting point, and decay the new ones.

Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
arXiv:1802.01483, eq. 3: Ω(w) = α/2 ‖w_S - w0_S‖² + β/2 ‖w_new‖², w_S the pretrained weights that train, w0_S
their pretrained values, w_new the weights the source model did not have (the task head), with weight decay off for
them (Ω replaces it). The paper gives no default α, β; 0.01 and 0.01 are the trade-offs of the reference
implementation's examples (thuml/Transfer-Learning-Library, tllib/regularization/delta.py).

A part of a method list: it rebuilds nothing and trains nothing itself, and adds Ω to the loss (`loss_term`) over
what the other parts train: `method: [{name: full}, {name: l2sp, alpha: 0.01, beta: 0.01}]`, also with `layers`,
`bitfit` and `sparse` (whose trainable values are w - w0 on its mask, starting at zero). A method that trains new
weights inside the body (LoRA, adapters, prompts) is refused at validation (combine.check_compatible), and so is
l2sp alone. The new weights are found structurally: trainable parameters outside `model.base_model` other than the
output embeddings (for a classifier, its head). w0 is taken when training starts, for the trained weights only (a
copy of them: with `full`, one more copy of the model), and travels in checkpoints (`training_state`) so a resumed
run pulls toward the same point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ftune.errors import MethodError
from ftune.methods import base


class Config(base.MethodConfig):
    name: Literal["l2sp"] = "l2sp"
    alpha: float = Field(0.01, ge=0)
    """α: weight of α/2 ‖w - w0‖² over the pretrained weights that train."""
    beta: float = Field(0.01, ge=0)
    """β: weight of β/2 ‖w‖² over the new weights (the task head)."""


class Anchor(nn.Module):
    """α, β and, once training starts, w0 (non-persistent buffers: never in a saved model) of each pretrained weight
    that trains, by its name; `new`: the trained parameters outside the source model."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.started = False
        self.names: list[str] = []
        self.pulled: list[nn.Parameter] = []
        self.new: list[nn.Parameter] = []

    def start(self, model: nn.Module, w0: dict[str, torch.Tensor]) -> None:
        pulled, self.new = _split(model)
        self.names, self.pulled, self.started = [n for n, _ in pulled], [p for _, p in pulled], True
        for i, (name, p) in enumerate(pulled):
            self.register_buffer(f"w0_{i}", w0[name].to(p.device, p.dtype).clone(), persistent=False)

    def pairs(self) -> Iterable[tuple[nn.Parameter, torch.Tensor]]:
        return ((p, getattr(self, f"w0_{i}")) for i, p in enumerate(self.pulled))


def _split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[nn.Parameter]]:
    """(pretrained trainable (name, parameter), new trainable parameters): new ones lie outside the body and are not
    the output embeddings (a causal LM's output layer is pretrained)."""
    source = {id(p) for p in model.base_model.parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    source |= {id(p) for p in output.parameters()} if output is not None else set()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in trained if id(p) in source], [p for n, p in trained if id(p) not in source]


def _anchor(model: nn.Module) -> Anchor:
    return next(m for m in model.modules() if isinstance(m, Anchor))


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if any(isinstance(m, Anchor) for m in model.modules()):
        raise MethodError("l2sp: the model already has an L2-SP anchor")
    model.add_module("l2sp_anchor", Anchor(cfg.alpha, cfg.beta))
    return model


def calibrate(model: nn.Module, cfg: Config, batches: Any, loss_fn: Any) -> None:
    """w0: the trained pretrained weights as they are before the first step."""
    if not _split(model)[0]:
        raise MethodError(
            "l2sp: no pretrained weight trains in this model, so there is nothing to pull toward its "
            "start; combine it with full, layers, bitfit or sparse"
        )
    _anchor(model).start(model, {n: p.detach() for n, p in _split(model)[0]})


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    anchor = _anchor(model)
    return {f"w0.{name}": w0 for name, (_, w0) in zip(anchor.names, anchor.pairs())}


def load_training_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    _anchor(model).start(model, {k.removeprefix("w0."): v for k, v in state.items()})


def loss_term(model: nn.Module) -> torch.Tensor:
    """α/2 Σ ‖w - w0‖² + β/2 Σ ‖w_new‖², summed in fp32. A model trained outside ftune's loop (never calibrated)
    takes w0 on this first call, before any step."""
    anchor = _anchor(model)
    if not anchor.started:
        anchor.start(model, {n: p.detach() for n, p in _split(model)[0]})
    zero = torch.zeros((), device=next(model.parameters()).device)
    pulled = sum((torch.sum((p.float() - w0.float()) ** 2) for p, w0 in anchor.pairs()), zero)
    new = sum((torch.sum(p.float() ** 2) for p in anchor.new), zero)
    return anchor.alpha / 2 * pulled + anchor.beta / 2 * new


def decay_exempt(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter Ω covers (found structurally, so a resumed run builds the same optimizer groups before its
    checkpoint loads): weight decay would pull them toward zero on top of Ω."""
    pulled, new = _split(model)
    return [p for _, p in pulled] + new


def disabled(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()  # l2sp adds nothing to the forward


METHOD = base.Method(
    name="l2sp",
    config_cls=Config,
    trains=base.Trains.NOTHING,
    claims=frozenset(),
    apply=apply,
    trainable=base.only_with_others,
    disabled=disabled,
    merging=base.ALREADY_MERGED,
    hooks=base.Hooks(
        loss_term=loss_term,
        calibrate=calibrate,
        decay_exempt=decay_exempt,
        resume=base.Resume(training_state, load_training_state),
    ),
    about=base.About(
        "regulariser: α/2 ‖w - w0‖² on trained pretrained weights, β/2 ‖w‖² on the head (list it with full, ...)",
        "Li, Grandvalet & Davoine 2018, L2-SP, arXiv:1802.01483",
    ),
)
