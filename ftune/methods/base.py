"""The method interface: a `Method` is a small record of functions and flags, not a class to inherit from.

Every method file in this package defines a pydantic `Config` and a `METHOD = Method(...)` record. The training
loop, `eval`, `merge` and `export` only ever talk to a method through this record. Its required fields say what the
method is; the groups after them (`Merging`, `Saving`, `Hooks`, `RunsWith`) default to "nothing special". Several
methods applied together make one record by the rules in `combine.RULES`, one per field.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
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


class Trains(StrEnum):
    """What the parameters a method trains are, in the order `combine` ranks them (the first any part has)."""

    ADDED = "new weights"
    """Modules the method adds (LoRA factors, adapters, prompts); switched off, the model is the base model."""
    EXISTING = "the model's weights"
    """Weights the model has, in place (full, layers, bitfit, head) or as a sparse difference (sparse); L2-SP may
    pull them toward their start."""
    NOTHING = "nothing itself"
    """No weight: a part of a method list only (L2-SP's loss term, shrink's dropped blocks); alone it is refused."""


class Claim(StrEnum):
    """A part of the model a method rebuilds, which no other method of the same run may rebuild too."""

    BLOCKS = "block list"
    """The stack of transformer blocks (shrink drops some)."""
    LINEARS = "linear layers"
    """The body's linears, replaced by wrappers (LoRA, AdaLoRA)."""
    SUB_BLOCKS = "sub-block outputs"
    """The attention and feed-forward outputs, wrapped (adapters, AdapterFusion)."""
    WHOLE_MODEL = "whole model"
    """The model itself, wrapped (soft prompts)."""
    EVERY_WEIGHT = "every weight"
    """Every weight trains (full, sparse): no other method trains beside it."""


@dataclass(frozen=True)
class Recommended:
    """How to run a method when nothing better is known: `ftune compare` trains each method so, and
    tests/test_learns.py checks that the training loss falls so on a tiny model."""

    lr: float
    """AdamW peak learning rate for the method's default config (with `options`)."""
    source: str
    """Where `lr` (and `options`) come from: the paper, peft, or a recipe or measurement the README names."""
    options: dict[str, Any] = field(default_factory=dict)
    """Method options that differ from the config's defaults for such a run (`layers` has no default block count)."""


@dataclass(frozen=True)
class About:
    """What `ftune methods` and `ftune compare` show."""

    summary: str
    """One line for `ftune methods`."""
    paper: str
    """The paper the method follows."""
    recommended: Recommended | None = None
    """The settings a run of the method starts from. None: it cannot run alone from its defaults (a part that trains
    nothing itself, such as l2sp, or a config that needs the user's inputs, such as adapter_fusion's stage-1 runs)."""


@dataclass(frozen=True)
class Merging:
    """Folding the method into the base weights (`ftune merge`, export, hot-swap)."""

    merge: Callable[[nn.Module], None]
    """Folds the method into the base weights in place: the same function with the method's own path off."""
    unmerge: Callable[[nn.Module], None]
    """Undoes `merge` exactly (up to float rounding)."""


@dataclass(frozen=True)
class Peft:
    """The method as a peft adapter, for `ftune export --format peft`."""

    config: Callable[[nn.Module, Any], dict[str, Any]]
    """`(model, cfg)`: the method's part of peft's adapter_config.json."""
    weights: Callable[[nn.Module], tuple[dict[str, torch.Tensor], list[str]]] | None = None
    """The tensors named as peft saves them, and the modules peft saves beside them (the head). None: peft's tuner
    layout, `base_model.model.<name>` for each trainable parameter."""


@dataclass(frozen=True)
class Saving:
    """What a run writes for the method, and how a fresh model reads it back."""

    own_form: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    """What method.safetensors holds when it is more or other than the trainable parameters by name: what a
    reparameterisation produces (prefix tuning's MLP), or extra tensors (a sparse mask's indices). None: those
    parameters. One run holds one own form."""
    fold: Callable[[nn.Module], None] | None = None
    """Turns a freshly attached model into the form `own_form` describes, in place (drops the reparameterisation);
    `load_run` calls it before loading method.safetensors."""
    peft: Peft | None = None
    """The method as a peft adapter; None: peft has no equivalent."""

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What method.safetensors holds."""
        return (self.own_form or trainable_state_dict)(model)


@dataclass(frozen=True)
class Resume:
    """Tensors besides the weights that an exact resume needs (AdaLoRA's importance averages and rank masks)."""

    save: Callable[[nn.Module], dict[str, torch.Tensor]]
    """The tensors, saved in every checkpoint."""
    load: Callable[[nn.Module, dict[str, torch.Tensor]], None]
    """Restores what `save` returned."""


@dataclass(frozen=True, kw_only=True)
class Hooks:
    """Calls the training loop makes into the method besides forward and backward; None for most methods."""

    loss_term: Callable[[nn.Module], torch.Tensor] | None = None
    """A regulariser: a scalar on the graph of the trainable parameters that depends on the weights only, weighted
    by the config (AdaLoRA's orthogonality of P and Q). The loop calls it on the model `attach` returned (not a DDP
    wrapper) after each training micro-batch's forward and adds `loss_term(model) / grad_accum` to that loss, so it
    counts once per optimizer step; evaluation losses leave it out."""
    on_step_end: Callable[[nn.Module, int, int], None] | None = None
    """`(model, step, total_steps)`: after optimizer step `step` (1-based) of the run's `total_steps`, before
    `zero_grad` (AdaLoRA's budget schedule reads the gradients and spans the run)."""
    check_total_steps: Callable[[Any, int], None] | None = None
    """`(cfg, total_steps)`: refuses (MethodError) a config that cannot work over the run's optimizer steps
    (AdaLoRA's tinit + tfinal), before anything is written."""
    calibrate: Callable[[nn.Module, Any, Iterable[dict[str, torch.Tensor]], Callable], None] | None = None
    """`(model, cfg, batches, loss_fn)`: choices made from the data once the model is attached and before the
    optimizer is made, in a fresh run only (sparse's mask, L2-SP's w0; a resumed or reloaded run reads them back).
    `batches` iterates the whole training set's micro-batches, on the host, again on each pass (the same rows on
    every process); `loss_fn(model, batch)` is the objective's (sum, count). It must leave no gradients behind."""
    decay_exempt: Callable[[nn.Module], list[nn.Parameter]] | None = None
    """`model -> parameters` the optimizer must not weight-decay (what L2-SP's penalty regularises instead), found
    structurally so a resumed run makes the same parameter groups."""
    report: Callable[[nn.Module], dict[str, Any]] | None = None
    """What the method learned (AdapterFusion's attention over adapters per layer): method_report.json, written
    after the final evaluation."""
    resume: Resume | None = None
    """State besides the weights for an exact resume; None: the weights suffice."""


@dataclass(frozen=True, kw_only=True)
class RunsWith:
    """Run settings the method allows; the recipe refuses the others with the reason."""

    gradient_checkpointing: bool = True
    """False when activation recomputation would break it (prefixes in an attention cache would be extended twice)."""
    quantized_base: bool = False
    """True when everything the method trains lies outside the base weights, so they may load 4- or 8-bit (QLoRA)."""
    unused_parameters: bool = False
    """True when some of its parameters may get no gradient in a step (AdapterDrop skips the lowest blocks'
    adapters): DDP is told to look for them, else it waits for their gradients forever."""
    prompt_site: Literal["input", "layers"] | None = None
    """Where a soft prompt enters: virtual tokens ("input") or key/value prefixes ("layers"); runs with one site
    share a batch in `ftune predict`. None for other methods."""


@dataclass(frozen=True, kw_only=True)
class Method:
    """Everything ftune needs to know about one fine-tuning method: the fields without a default say what it is; the
    groups after them default to "nothing special"."""

    name: str
    """Registry key; equals the `name` literal of `config_cls`."""
    config_cls: type[MethodConfig]
    """The method's pydantic config (one member of the recipe's `method` union)."""
    about: About
    """Summary, paper and recommended settings."""
    trains: Trains
    """What the parameters it trains are: new weights, the model's own, or nothing itself."""
    claims: frozenset[Claim]
    """The parts of the model it rebuilds (empty: none, as head, bitfit, l2sp). `compose` refuses two methods with a
    claim in common and applies the parts in claim order (`combine.STAGES`)."""
    trainable: Callable[[nn.Module, Any], Iterable[nn.Parameter]]
    """The parameters it trains, found structurally (module types, the block list, the head), never by parameter
    name substrings; `attach` freezes everything else."""
    apply: Callable[[nn.Module, Any], nn.Module] = keep_model
    """Edits or wraps the model (LoRA wraps linears) and returns the module to train, without changing
    `requires_grad`. Default: the model as it is (full, head, bitfit, layers)."""
    disabled: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None
    """`with method.disabled(model):` the model `attach` returned computes exactly the base model's outputs (the
    reference of preference tuning, as peft's `disable_adapter()`), copying no weight: each module the method added
    skips its own path and draws no random numbers. On exit, also by an exception, every switch is as it was. The
    task head is no part of the method. Refuses (MethodError) a merged model. None: only a copy could undo it."""
    merging: Merging | None = None
    """How it folds into the base weights; None: it cannot be merged (`ftune merge` refuses)."""
    saving: Saving = Saving()
    """What method.safetensors holds, and the peft format; default: the trainable parameters, no peft equivalent."""
    hooks: Hooks = Hooks()
    """Calls from the training loop: loss term, step end, step check, calibration, decay exemption, report, resume."""
    runs_with: RunsWith = RunsWith()
    """Run settings it allows: gradient checkpointing, a quantised base, unused parameters under DDP, prompt site."""
    resolve: Callable[[Any], Method] | None = None
    """A method built from others (compose, mam_adapter, unipelt) returns the record serving one config, made by
    `combine` from its parts' records; `method_of(cfg)` calls it. None for single methods."""


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
    """`Method.disabled` of methods whose modules skip their own path while `flag` is False (LoRALinear.enabled,
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
    """`trainable` of a method that trains nothing itself (`Trains.NOTHING`: L2-SP's loss term, shrink): a method
    list skips it; alone it is refused (MethodError)."""
    raise MethodError(f"{cfg.name} trains nothing itself; list it with a method that trains pretrained weights")


def fold_nothing(model: nn.Module) -> None:
    """Merge/unmerge for methods whose trained weights already are the model's weights (full, head, bitfit)."""


ALREADY_MERGED = Merging(fold_nothing, fold_nothing)
"""`merging` of methods whose trained weights already are the model's weights (full, head, bitfit, l2sp)."""


def module_merging(modules: Callable[[nn.Module], Iterable[nn.Module]]) -> Merging:
    """`merging` of a method whose modules fold themselves: `merge()`, `unmerge()` on each of `modules(model)`."""

    def each(call: str) -> Callable[[nn.Module], None]:
        def on_each(model: nn.Module) -> None:
            for m in modules(model):
                getattr(m, call)()

        return on_each

    return Merging(each("merge"), each("unmerge"))


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
