"""The method interface: a `Method` is a small record of functions, not a class to inherit from.

Every method file in this package defines a pydantic `Config` and a `METHOD = Method(...)` record. The training
loop, `eval`, `merge` and `export` only ever talk to a method through this record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ftune.errors import MethodError


class MethodConfig(BaseModel):
    """Fields every method shares. Each method adds its own, with a `name` literal as the union tag."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    train_head: bool = True
    """Also train the task head (a new classifier) and any weight the checkpoint did not provide."""


def keep_model(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """`apply` of methods that only choose which existing weights train."""
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's weights: every parameter that trains, by its name in the (possibly wrapped) model."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class Recommended:
    """How to run a method when nothing better is known: `ftune compare` trains each method so, and
    tests/test_learns.py checks that the training loss falls so on a tiny model.

    Attributes:
        lr: AdamW peak learning rate for the method's default config (with `options`).
        source: where `lr` (and `options`) come from: the paper, peft, or a measurement named in the README.
        options: method options that differ from the config's defaults for such a run (e.g. `layers` has no default
            block count); empty for most methods.
    """

    lr: float
    source: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """Everything ftune needs to know about one fine-tuning method.

    Attributes:
        name: registry key; equals the `name` literal of `config_cls`.
        config_cls: the method's pydantic config (one member of the recipe's `method` union).
        apply: edits or wraps the model (e.g. LoRA wraps linears) and returns the module to train; the default
            leaves the model as it is (full, head, bitfit, layers). It must not change `requires_grad`.
        trainable: the parameters the method trains, found structurally (module types, the block list, the
            head), never by parameter-name substrings. `attach` freezes everything else.
        merge: folds the method into the base weights in place, so the model computes the same function with the
            method's own path switched off. None: the method cannot be merged (`ftune merge` refuses).
        unmerge: undoes `merge` exactly (up to float rounding).
        on_step_end: `(model, step, total_steps)`, called after optimizer step `step` (1-based) of the run's
            `total_steps`, before `zero_grad`: AdaLoRA's budget schedule reads the gradients and needs the run's
            length, which the loop knows (a config field would have to follow epochs and batch size by hand).
            None for most methods.
        check_total_steps: `(cfg, total_steps)` refuses (MethodError) a config that cannot work over the run's
            optimizer steps (AdaLoRA's tinit + tfinal must leave steps for the budget to fall); called by the loop
            before anything is written. None for most methods.
        peft_config: the method's part of a peft `adapter_config.json`, for `ftune export --format peft`.
            None: peft has no equivalent.
        report: what the method learned that is worth reading after a run (AdapterFusion's attention over
            adapters per layer); saved as method_report.json after the final evaluation. None for most methods.
        saved_weights: what method.safetensors holds. Default: the trainable parameters by name. A method that trains
            through a reparameterisation (prefix tuning's MLP) returns the tensors it produces instead.
        fold: turns a freshly attached model into the form `saved_weights` describes (drops the reparameterisation
            for the tensors it produced), in place; `load_run` calls it before loading method.safetensors.
        training_state: tensors besides the weights that an exact resume needs (AdaLoRA's importance averages and
            rank masks); saved in every checkpoint. None for most methods.
        load_training_state: restores what `training_state` returned.
        gradient_checkpointing: False when the method cannot run under activation recomputation (prefixes held in
            an attention cache would be extended twice); the recipe then refuses train.gradient_checkpointing.
        quantized_base: True when every parameter the method trains lies outside the base weights, so the base may
            be loaded 4- or 8-bit quantised (QLoRA); the recipe refuses model.quantization otherwise.
        prompt_site: where a soft-prompt method's vectors enter, "input" (virtual tokens) or "layers" (key/value
            prefixes); runs with the same site share one batch in `ftune predict`. None for other methods.
        peft_weights: the tensors of `ftune export --format peft`, named as peft saves them, and the modules peft
            saves beside them (the head). None: peft's tuner layout, `base_model.model.<name>` for each trainable.
        claims: the parts of the model the method rebuilds, which no other method in the same run may rebuild too
            ("linear layers", "sub-block outputs", "whole model" for a wrapper, "every weight" for full
            fine-tuning); `compose` refuses two methods with a claim in common, and applies linear replacers first
            and wrappers last.
        resolve: a method built from other methods (compose, mam_adapter, unipelt) returns the record that serves
            one config, made from its parts' records; `method_of(cfg)` calls it. None for single methods.
        disabled: `with method.disabled(model):` the model `attach` returned computes exactly the base model's
            outputs (the reference model of preference tuning, as peft's `disable_adapter()`), without copying any
            weight: each module the method added skips its own path, so it also draws no dropout or other random
            numbers (Houlsby adapters also swap in their norms' pretrained values, kept by `apply`). On exit, also
            by an exception, every switch is as it was. The task head (`train_head`) is no part of the method and
            stays as it is. Refuses (MethodError) a merged model. None: the method trains base weights in place
            (full, layers, bitfit; head trains the output layer of a causal LM), which only a copy could undo.
        loss_term: a regulariser the method adds to the training loss, a scalar tensor on the graph of the trainable
            parameters (AdaLoRA's orthogonality of P and Q, AdapterFusion's pull of V towards the identity), with
            its weight from the method config. The loop calls it on the model `attach` returned (not a DDP
            wrapper) once per micro-batch in training mode, after that micro-batch's forward, and adds
            `loss_term(model) / grad_accum` to the micro-batch's loss before backward, so the term counts once per
            optimizer step whatever grad_accum is. It depends on the weights only (not on the batch); evaluation
            losses leave it out. None: no regulariser (most methods).
        unused_parameters: True when some of the method's parameters may get no gradient in a step (AdapterDrop
            skips the lowest blocks' adapters, a random number of them per batch); DDP is then told to look for them,
            else it waits for their gradients forever.
        calibrate: `(model, cfg, batches, loss_fn)`, data-dependent choices made before training: sparse
            fine-tuning's mask (from squared gradients or a short full fine-tune), L2-SP's w0. `batches` iterates the
            whole training set's micro-batches, again on each pass (every process the same rows, on the host: the
            method moves them to the model's device); `loss_fn(model, batch)` is the objective's (sum, count). Called by setup.prepare once the model is attached (trainable parameters
            set) and before the optimizer is made, in a fresh training run only: a resumed run gets the same state
            from its checkpoint (weights, `load_training_state`), a reloaded run (eval, merge) from
            method.safetensors. It must leave no gradients behind. None for most methods.
        decay_exempt: `model -> parameters` that the optimizer must not weight-decay (L2-SP's, which its penalty
            regularises instead); found structurally, so a resumed run makes the same parameter groups. None: all
            trainable parameters decay with train.weight_decay.
        summary: one line for `ftune methods`.
        paper: the paper the method follows.
        recommended: the learning rate (and options) a run of the method starts from, with their source. None:
            the method cannot run alone from its defaults (a part that trains nothing itself, such as l2sp, or a
            config that needs the user's inputs, such as adapter_fusion's stage-1 runs).
    """

    name: str
    config_cls: type[MethodConfig]
    trainable: Callable[[nn.Module, Any], Iterable[nn.Parameter]]
    summary: str
    paper: str
    apply: Callable[[nn.Module, Any], nn.Module] = keep_model
    merge: Callable[[nn.Module], None] | None = None
    unmerge: Callable[[nn.Module], None] | None = None
    on_step_end: Callable[[nn.Module, int, int], None] | None = None
    check_total_steps: Callable[[Any, int], None] | None = None
    peft_config: Callable[[nn.Module, Any], dict[str, Any]] | None = None
    report: Callable[[nn.Module], dict[str, Any]] | None = None
    saved_weights: Callable[[nn.Module], dict[str, torch.Tensor]] = trainable_state_dict
    fold: Callable[[nn.Module], None] | None = None
    training_state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    load_training_state: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None
    gradient_checkpointing: bool = True
    quantized_base: bool = False
    prompt_site: Literal["input", "layers"] | None = None
    peft_weights: Callable[[nn.Module], tuple[dict[str, torch.Tensor], list[str]]] | None = None
    claims: frozenset[str] = frozenset()
    resolve: Callable[[Any], Method] | None = None
    disabled: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None
    loss_term: Callable[[nn.Module], torch.Tensor] | None = None
    unused_parameters: bool = False
    calibrate: Callable[[nn.Module, Any, Iterable[dict[str, torch.Tensor]], Callable], None] | None = None
    decay_exempt: Callable[[nn.Module], list[nn.Parameter]] | None = None
    recommended: Recommended | None = None


def set_trainable(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Train exactly `params`; freeze every other parameter of `model`. The one place trainability is set."""
    chosen = {id(p) for p in params}
    if not chosen:
        raise MethodError("the method selected no trainable parameters in this model")
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once; a quantised weight counts its logical shape."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(_logical_numel(p) for p in model.parameters())


def _logical_numel(p: nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit weights per byte; its quant_state keeps the shape the weight has
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


@contextlib.contextmanager
def switched_off(modules: Iterable[nn.Module], flag: str = "enabled") -> Iterator[None]:
    """`Method.disabled` for methods whose modules skip their own path while `flag` is False (LoRALinear.enabled,
    PrefixedModel.prefixes_on, ...): clears it on each of `modules` for the block, then gives each its own value back.
    A merged module holds its update inside the base weight, which no flag can take out: refused."""
    modules = list(modules)
    if any(getattr(m, "merged", False) for m in modules):
        raise MethodError("the method is merged into the base weights, so it cannot be switched off; unmerge first")
    before = [getattr(m, flag) for m in modules]
    for m in modules:
        setattr(m, flag, False)
    try:
        yield
    finally:
        for m, value in zip(modules, before):
            setattr(m, flag, value)


def only_with_others(model: nn.Module, cfg: MethodConfig) -> list[nn.Parameter]:
    """`trainable` of a method that trains nothing itself and only adds to what the other parts of a method list
    train (L2-SP's loss term; it may join `full`). A composite skips it; alone it is refused (MethodError)."""
    raise MethodError(f"{cfg.name} trains nothing itself; list it with a method that trains pretrained weights")


def fold_nothing(model: nn.Module) -> None:
    """Merge/unmerge for methods whose trained weights already are the model's weights (full, head, bitfit)."""


def unwrap_merged(model: nn.Module) -> nn.Module:
    """Replace every merged wrapper (a module with `merged=True` and a `base_layer`) by its folded base layer; drop
    every merged parametrisation (a sparse difference, whose W already holds it) and the merged module that held the
    difference, so the model has plain weights under their own names."""
    from torch.nn.utils import parametrize

    for name, module in list(model.named_modules()):
        if getattr(module, "merged", False) and isinstance(getattr(module, "base_layer", None), nn.Module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base_layer)
    for module in list(model.modules()):
        for tensor in list(getattr(module, "parametrizations", {}) if parametrize.is_parametrized(module) else {}):
            if all(getattr(p, "merged", False) for p in module.parametrizations[tensor]):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
    for name, module in list(model.named_modules()):
        if getattr(module, "merged", False) and getattr(module, "saved_buffers", None):
            parent_name, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent_name) if parent_name else model, child)
    return model
