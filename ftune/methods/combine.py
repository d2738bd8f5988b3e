"""Methods applied together: the record several method configs make, for `compose` and the hybrids.

The parts go in in the order the model needs, whatever order the recipe lists them in: methods that replace linear
layers first (LoRA's `all-linear` would otherwise adapt the adapters' own projections), then methods that insert
modules into the blocks, then a soft prompt, which wraps the whole model. What trains is the union of what each part
trains. Two parts conflict when they rebuild the same part of the model (`Method.claims`). Everything else follows
from the parts: the run saves what a soft-prompt part saves (its folded prompt and every other trainable weight) or
else every trainable weight; merge works when every part merges; gradient checkpointing and a quantised base are
allowed when every part allows them; switching off (`disabled`) works when every part can be switched off, and
switches them all off; the loss term is the sum of the parts' terms; calibration runs each part's in apply order, and
the parameters exempt from weight decay are the union of the parts'. A part that trains nothing itself (L2-SP) may
join `full`, and only methods that train pretrained weights. peft has no equivalent format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ftune.methods.base import Method, MethodConfig, only_with_others, trainable_state_dict

STAGES = {"block list": -1, "linear layers": 0, "sub-block outputs": 1, "whole model": 2}
"""Apply order by claim; a method that claims nothing (head, layers, bitfit) only picks weights: stage 1. Dropping
blocks (shrink) goes first, so every other part is built on the blocks that remain."""


def check_compatible(parts: Sequence[MethodConfig]) -> None:
    """Refuse (ValueError, shown as a recipe error) parts that repeat a method or rebuild the same part of the model."""
    from ftune.methods import method_of

    records = [method_of(p) for p in parts]
    names = [r.name for r in records]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"{name} is listed twice; give each method one section")
    # a part that rebuilds nothing and trains nothing itself (L2-SP) only adds to what the others train
    adders = [rec for rec in records if rec.trainable is only_with_others and not rec.claims]
    # a part that trains nothing but rebuilds something (shrink drops blocks) is neither: it joins any trainer
    trainers = [rec for rec in records if rec.trainable is not only_with_others]
    for rec in trainers:
        if "every weight" in rec.claims and len(trainers) > 1:
            raise ValueError(f"{rec.name} already trains every weight, so it combines with no other method; "
                             "list it alone")
    for rec in adders:
        if not trainers:
            raise ValueError(f"{rec.name} trains nothing itself; list it with a method that trains pretrained "
                             f"weights, e.g. method: [{{name: full}}, {{name: {rec.name}}}]")
        # pretrained weights train in place (no `disabled`: full, layers, bitfit) or as a sparse difference
        if other := next((r for r in trainers if r.disabled is not None and "every weight" not in r.claims), None):
            raise ValueError(f"{rec.name} pulls trained pretrained weights toward their start, but {other.name} "
                             "trains new weights; combine it with full, layers, bitfit or sparse")
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            if shared := sorted(a.claims & b.claims):
                raise ValueError(f"{a.name} and {b.name} both rebuild the {shared[0]}; keep one of them")
            if trainable_state_dict is not a.saved_weights and trainable_state_dict is not b.saved_weights:
                # the run saves one part's form (`combine`), so the other's extra tensors would be lost
                raise ValueError(f"{a.name} and {b.name} each save their weights in a form of their own, which one "
                                 "run cannot hold together; keep one of them")


def _stage(method: Method) -> int:
    return min((STAGES[c] for c in method.claims if c in STAGES), default=1)


def combine(name: str, config_cls: type[MethodConfig], parts: Sequence[MethodConfig]) -> Method:
    """The record of `parts` applied together, for a config of `config_cls` (compose, a hybrid) and named `name`
    (e.g. "lora+bitfit"). Assumes `check_compatible(parts)`."""
    from ftune.methods import method_of

    pairs = sorted(((method_of(p), p) for p in parts), key=lambda pair: _stage(pair[0]))  # stable: recipe order
    records = [rec for rec, _ in pairs]

    def apply(model: nn.Module, cfg: Any) -> nn.Module:
        for rec, part in pairs:
            model = rec.apply(model, part)
        return model

    def trainable(model: nn.Module, cfg: Any) -> list[nn.Parameter]:
        chosen = {id(p): p for rec, part in pairs if rec.trainable is not only_with_others
                  for p in rec.trainable(model, part)}  # shared weights count once
        return list(chosen.values())

    def merge(model: nn.Module) -> None:
        for rec in records:
            rec.merge(model)

    def unmerge(model: nn.Module) -> None:
        for rec in reversed(records):
            rec.unmerge(model)

    def on_step_end(model: nn.Module, step: int, total_steps: int) -> None:
        for rec in records:
            if rec.on_step_end:
                rec.on_step_end(model, step, total_steps)

    def check_total_steps(cfg: Any, total_steps: int) -> None:
        for rec, part in pairs:
            if rec.check_total_steps:
                rec.check_total_steps(part, total_steps)

    def report(model: nn.Module) -> dict[str, Any]:
        return {rec.name: rec.report(model) for rec in records if rec.report}

    def fold(model: nn.Module) -> None:
        for rec in records:
            if rec.fold:
                rec.fold(model)

    def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{rec.name}.{k}": v for rec in records if rec.training_state
                for k, v in rec.training_state(model).items()}

    def load_training_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for rec in records:
            if rec.load_training_state:
                own = f"{rec.name}."
                rec.load_training_state(model, {k[len(own):]: v for k, v in state.items() if k.startswith(own)})

    @contextlib.contextmanager
    def disabled(model: nn.Module) -> Iterator[None]:
        with contextlib.ExitStack() as stack:  # unwinds in reverse, also when entering a later part fails
            for rec in records:
                stack.enter_context(rec.disabled(model))
            yield

    def calibrate(model: nn.Module, cfg: Any, batches: Any, loss_fn: Any) -> None:
        for rec, part in pairs:
            if rec.calibrate:
                rec.calibrate(model, part, batches, loss_fn)

    def decay_exempt(model: nn.Module) -> list[nn.Parameter]:
        exempt = {id(p): p for rec in records if rec.decay_exempt for p in rec.decay_exempt(model)}
        return list(exempt.values())

    def loss_term(model: nn.Module) -> torch.Tensor:
        terms = [rec.loss_term(model) for rec in records if rec.loss_term]
        return sum(terms[1:], terms[0])

    # a soft prompt wraps the model last, and its saved form covers every trainable weight inside the wrapper
    saving = [rec.saved_weights for rec in records if rec.saved_weights is not trainable_state_dict]
    mergeable = all(rec.merge for rec in records)
    return Method(
        name=name, config_cls=config_cls, apply=apply, trainable=trainable,
        merge=merge if mergeable else None, unmerge=unmerge if mergeable else None,
        on_step_end=on_step_end if any(r.on_step_end for r in records) else None,
        check_total_steps=check_total_steps if any(r.check_total_steps for r in records) else None,
        report=report if any(r.report for r in records) else None,
        saved_weights=saving[-1] if saving else trainable_state_dict,
        fold=fold if any(r.fold for r in records) else None,
        training_state=training_state if any(r.training_state for r in records) else None,
        load_training_state=load_training_state if any(r.load_training_state for r in records) else None,
        gradient_checkpointing=all(r.gradient_checkpointing for r in records),
        quantized_base=all(r.quantized_base for r in records),
        unused_parameters=any(r.unused_parameters for r in records),
        disabled=disabled if all(r.disabled for r in records) else None,
        loss_term=loss_term if any(r.loss_term for r in records) else None,
        calibrate=calibrate if any(r.calibrate for r in records) else None,
        decay_exempt=decay_exempt if any(r.decay_exempt for r in records) else None,
        claims=frozenset().union(*(r.claims for r in records)),
        summary=" + ".join(r.summary for r in records), paper="; ".join(r.paper for r in records),
    )


def resolved_trainable(model: nn.Module, cfg: MethodConfig) -> list[nn.Parameter]:
    """`trainable` of the registry entry of a method built from others: what the record made for `cfg` trains."""
    from ftune.methods import method_of

    return list(method_of(cfg).trainable(model, cfg))


def keep_part_defaults(data: Any, defaults: dict[str, dict[str, Any]]) -> Any:
    """A hybrid's `model_validator(mode="before")`: a part the recipe gives in part (`adapter: {bottleneck: 16}`)
    keeps the hybrid's defaults for the rest (its placement, scaling), not the part method's own defaults."""
    if not isinstance(data, dict):
        return data
    return {**data, **{key: {**value, **data[key]} for key, value in defaults.items() if isinstance(data.get(key), dict)}}
