"""Methods applied together: the record several method configs make, for `compose` and the hybrids.

The parts go in in the order the model needs, whatever order the recipe lists them in (`STAGES`): dropped blocks
first, then methods that replace linear layers (LoRA's `all-linear` would otherwise adapt the adapters' own
projections), then methods that insert modules into the blocks, then a soft prompt, which wraps the whole model.
Two parts conflict when they rebuild the same part of the model (`Method.claims`); a part that trains nothing itself
(L2-SP) joins only methods that train the model's own weights. Every field of the combined record follows from the
parts' by its rule in `RULES` (tests/test_method_record.py fails for a field without one); peft has no equivalent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ftune.methods.base import Claim, Merging, Method, MethodConfig, Resume, Trains

STAGES = {Claim.BLOCKS: -1, Claim.LINEARS: 0, Claim.SUB_BLOCKS: 1, Claim.WHOLE_MODEL: 2}
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
    adders = [rec for rec in records if rec.trains is Trains.NOTHING and not rec.claims]
    # a part that trains nothing but rebuilds something (shrink drops blocks) is neither: it joins any trainer
    trainers = [rec for rec in records if rec.trains is not Trains.NOTHING]
    for rec in trainers:
        if Claim.EVERY_WEIGHT in rec.claims and len(trainers) > 1:
            raise ValueError(
                f"{rec.name} already trains every weight, so it combines with no other method; list it alone"
            )
    for rec in adders:
        if not trainers:
            raise ValueError(
                f"{rec.name} trains nothing itself; list it with a method that trains pretrained "
                f"weights, e.g. method: [{{name: full}}, {{name: {rec.name}}}]"
            )
        if other := next((r for r in trainers if r.trains is Trains.ADDED), None):
            raise ValueError(
                f"{rec.name} pulls trained pretrained weights toward their start, but {other.name} "
                "trains new weights; combine it with full, layers, bitfit or sparse"
            )
    for i, a in enumerate(records):
        for b in records[i + 1 :]:
            if shared := sorted(a.claims & b.claims):
                raise ValueError(f"{a.name} and {b.name} both rebuild the {shared[0]}; keep one of them")
            if a.saving.own_form and b.saving.own_form:  # the run saves one part's form, so the other's would be lost
                raise ValueError(
                    f"{a.name} and {b.name} each save their weights in a form of their own, which one "
                    "run cannot hold together; keep one of them"
                )


def _stage(method: Method) -> int:
    return min((STAGES[c] for c in method.claims if c in STAGES), default=1)


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a rule reads: the combined record's name and config class, and the parts with their configs, in apply
    order."""

    name: str
    config_cls: type[MethodConfig]
    pairs: list[tuple[Method, MethodConfig]]

    def each(self, path: str) -> list[Any]:
        """Every part's field at `path` ("hooks.report"), in apply order; None past a part's missing sub-record."""
        return [
            functools.reduce(lambda value, key: getattr(value, key, None), path.split("."), rec)
            for rec, _ in self.pairs
        ]

    def having(self, path: str) -> list[tuple[Method, MethodConfig, Any]]:
        """(record, config, field) of the parts whose field at `path` is set."""
        return [(rec, cfg, value) for (rec, cfg), value in zip(self.pairs, self.each(path)) if value is not None]


Rule = Callable[[Parts], Any]


def _calls(path: str, config_at: int | None = None, backwards: bool = False) -> Rule:
    """Each part's function at `path`, called with the same arguments in apply order (or reversed), the part's own
    config in place of argument `config_at` (the combined config); None when no part has one."""

    def rule(parts: Parts) -> Callable | None:
        calls = parts.having(path)[:: -1 if backwards else 1]

        def call(*args: Any) -> None:
            for _, cfg, f in calls:
                f(*(args if config_at is None else (*args[:config_at], cfg, *args[config_at + 1 :])))

        return call if calls else None

    return rule


def _apply(parts: Parts) -> Callable[[nn.Module, Any], nn.Module]:
    def apply(model: nn.Module, cfg: Any) -> nn.Module:
        for rec, part in parts.pairs:
            model = rec.apply(model, part)
        return model

    return apply


def _trainable(parts: Parts) -> Callable[[nn.Module, Any], list[nn.Parameter]]:
    def trainable(model: nn.Module, cfg: Any) -> list[nn.Parameter]:
        chosen = {
            id(p): p
            for rec, part in parts.pairs
            if rec.trains is not Trains.NOTHING
            for p in rec.trainable(model, part)
        }  # shared weights count once
        return list(chosen.values())

    return trainable


def _disabled(parts: Parts) -> Callable | None:
    """When every part can be switched off: all of them, unwound in reverse (also when a later part fails)."""

    @contextlib.contextmanager
    def disabled(model: nn.Module) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for switch in parts.each("disabled"):
                stack.enter_context(switch(model))
            yield

    return disabled if all(parts.each("disabled")) else None


def _merging(parts: Parts) -> Merging | None:
    """When every part merges: merged in apply order, unmerged in reverse."""
    if not all(parts.each("merging")):
        return None
    return Merging(_calls("merging.merge")(parts), _calls("merging.unmerge", backwards=True)(parts))


def _loss_term(parts: Parts) -> Callable | None:
    terms = [f for _, _, f in parts.having("hooks.loss_term")]
    return (lambda model: sum((f(model) for f in terms[1:]), terms[0](model))) if terms else None


def _decay_exempt(parts: Parts) -> Callable | None:
    exempt = [f for _, _, f in parts.having("hooks.decay_exempt")]
    return (lambda model: list({id(p): p for f in exempt for p in f(model)}.values())) if exempt else None


def _report(parts: Parts) -> Callable | None:
    reports = [(rec.name, f) for rec, _, f in parts.having("hooks.report")]
    return (lambda model: {name: f(model) for name, f in reports}) if reports else None


def _resume(parts: Parts) -> Resume | None:
    """Each part's state under its name ("adalora.<key>"), loaded back into the part it came from."""
    own = [(rec.name + ".", r) for rec, _, r in parts.having("hooks.resume")]

    def save(model: nn.Module) -> dict[str, torch.Tensor]:
        return {prefix + k: v for prefix, r in own for k, v in r.save(model).items()}

    def load(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for prefix, r in own:
            r.load(model, {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})

    return Resume(save, load) if own else None


RULES: dict[str, Rule] = {
    "name": lambda parts: parts.name,
    "config_cls": lambda parts: parts.config_cls,
    "about.summary": lambda parts: " + ".join(parts.each("about.summary")),
    "about.paper": lambda parts: "; ".join(parts.each("about.paper")),
    "about.recommended": lambda parts: None,  # a list runs at the recipe's rate
    "trains": lambda parts: min(parts.each("trains"), key=list(Trains).index),  # new weights, else the model's, ...
    "claims": lambda parts: frozenset().union(*parts.each("claims")),
    "trainable": _trainable,  # the union, without the parts that train nothing themselves
    "apply": _apply,  # in apply order
    "disabled": _disabled,
    "merging": _merging,
    # a soft prompt wraps the model last, and its saved form covers every trainable weight inside the wrapper
    "saving.own_form": lambda parts: next((f for _, _, f in parts.having("saving.own_form")), None),
    "saving.fold": _calls("saving.fold"),
    "saving.peft": lambda parts: None,
    "hooks.loss_term": _loss_term,  # the sum of the parts' terms
    "hooks.on_step_end": _calls("hooks.on_step_end"),
    "hooks.check_total_steps": _calls("hooks.check_total_steps", config_at=0),
    "hooks.calibrate": _calls("hooks.calibrate", config_at=1),
    "hooks.decay_exempt": _decay_exempt,  # the union
    "hooks.report": _report,  # {part: its report}
    "hooks.resume": _resume,
    "runs_with.gradient_checkpointing": lambda parts: all(parts.each("runs_with.gradient_checkpointing")),
    "runs_with.quantized_base": lambda parts: all(parts.each("runs_with.quantized_base")),
    "runs_with.unused_parameters": lambda parts: any(parts.each("runs_with.unused_parameters")),
    "runs_with.prompt_site": lambda parts: None,  # `ftune predict` batches single soft prompts only
    "resolve": lambda parts: None,
}
"""How each field of the combined record follows from the parts (a rule for a sub-record covers its fields)."""


def combine(name: str, config_cls: type[MethodConfig], parts: Sequence[MethodConfig]) -> Method:
    """The record of `parts` applied together, for a config of `config_cls` (compose, a hybrid) and named `name`
    (e.g. "lora+bitfit"). Assumes `check_compatible(parts)`."""
    from ftune.methods import method_of

    pairs = sorted(((method_of(p), p) for p in parts), key=lambda pair: _stage(pair[0]))  # stable: recipe order
    return _build(Method, "", Parts(name, config_cls, pairs))


def _build(record: type, prefix: str, parts: Parts) -> Any:
    """`record` with each field from its rule, or, a sub-record without a rule of its own, from its fields' rules."""
    hints, values = typing.get_type_hints(record), {}
    for f in dataclasses.fields(record):
        if (path := prefix + f.name) in RULES:
            values[f.name] = RULES[path](parts)
        elif sub := sub_record(hints[f.name]):
            values[f.name] = _build(sub, path + ".", parts)
        else:
            raise TypeError(f"combine.RULES has no rule for Method.{path}")
    return record(**values)


def sub_record(hint: Any) -> type | None:
    """The record class a field holds (`About`, `Merging | None`), or None for a plain value."""
    records = [t for t in (hint, *typing.get_args(hint)) if isinstance(t, type) and dataclasses.is_dataclass(t)]
    return records[0] if records else None


def resolved_trainable(model: nn.Module, cfg: MethodConfig) -> list[nn.Parameter]:
    """`trainable` of the registry entry of a method built from others: what the record made for `cfg` trains."""
    from ftune.methods import method_of

    return list(method_of(cfg).trainable(model, cfg))


def keep_part_defaults(data: Any, defaults: dict[str, dict[str, Any]]) -> Any:
    """A hybrid's `model_validator(mode="before")`: a part the recipe gives in part (`adapter: {bottleneck: 16}`)
    keeps the hybrid's defaults for the rest (its placement, scaling), not the part method's own defaults."""
    if not isinstance(data, dict):
        return data
    given = {key: {**value, **data[key]} for key, value in defaults.items() if isinstance(data.get(key), dict)}
    return {**data, **given}
