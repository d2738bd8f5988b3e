"""The Method record (ftune/methods/base.py) and `combine`'s table (ftune/methods/combine.py): every field of the
record and of its sub-records has one aggregation rule, every rule names a field, an author must state what a method
trains and which parts of the model it claims, and the registered records say it in the closed types."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from typing import Literal

import pytest

from ftune.methods import METHODS, combine, lora, method_of
from ftune.methods.base import Claim, Method, MethodConfig, Trains


def _fields(record: type, prefix: str = "") -> Iterator[tuple[str, bool]]:
    """(dotted path, whether it holds a sub-record) of every field of `record` and, recursively, of its sub-records."""
    hints = typing.get_type_hints(record)
    for f in dataclasses.fields(record):
        sub = combine.sub_record(hints[f.name])
        yield prefix + f.name, sub is not None
        if sub:
            yield from _fields(sub, f"{prefix}{f.name}.")


def _uncovered() -> list[str]:
    """The fields without a rule: neither their own nor one for a sub-record that holds them."""

    def covered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in combine.RULES for i in range(1, len(parts) + 1))

    return [path for path, holds_record in _fields(Method) if not holds_record and not covered(path)]


def test_every_field_has_an_aggregation_rule():
    uncovered = _uncovered()
    assert not uncovered, f"combine.RULES has no rule for Method.{uncovered[0]}: add how the parts' values combine"


def test_every_rule_names_a_field():
    paths = {path for path, _ in _fields(Method)}
    assert not set(combine.RULES) - paths, f"rules for no field: {sorted(set(combine.RULES) - paths)}"


def test_a_missing_rule_is_named_by_the_test_and_by_combine(monkeypatch):
    monkeypatch.delitem(combine.RULES, "hooks.report")
    assert _uncovered() == ["hooks.report"]
    with pytest.raises(TypeError, match=r"no rule for Method\.hooks\.report"):
        combine.combine("lora+bitfit", MethodConfig, [lora.Config(), METHODS["bitfit"].config_cls()])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_record_states_what_it_trains_and_claims(name):
    method = METHODS[name]
    assert isinstance(method.trains, Trains)
    assert isinstance(method.claims, frozenset) and all(isinstance(c, Claim) for c in method.claims)
    # new weights can be switched off (resolved composites: their parts' switches)
    assert method.trains is not Trains.ADDED or method.disabled or method.resolve
    assert method.trains is not Trains.NOTHING or method.about.recommended is None  # no run of its own


def test_trains_and_claims_have_no_default():
    """Leaving them out is an error, not a silent "nothing": an empty `claims` is a choice the author writes."""
    base = {"name": "x", "config_cls": MethodConfig, "about": None, "trainable": lambda model, cfg: []}
    for missing in ("trains", "claims"):
        given = {"trains": Trains.ADDED, "claims": frozenset()}
        del given[missing]
        with pytest.raises(TypeError, match=missing):
            Method(**base, **given)


def test_a_new_linear_replacer_cannot_join_lora(monkeypatch):
    """A VeRA-like method that states its claim is refused beside LoRA, with the part both rebuild."""

    class Config(MethodConfig):
        name: Literal["vera"] = "vera"

    vera = dataclasses.replace(METHODS["lora"], name="vera", config_cls=Config)
    monkeypatch.setitem(METHODS, "vera", vera)
    with pytest.raises(ValueError, match="vera and lora both rebuild the linear layers"):
        combine.check_compatible([Config(), lora.Config()])


def test_a_combined_record_follows_its_parts():
    record = method_of(METHODS["compose"].config_cls(methods=[{"name": "lora"}, {"name": "bitfit"}]))
    assert (record.name, record.trains, record.claims) == ("lora+bitfit", Trains.ADDED, {Claim.LINEARS})
    assert record.merging is not None and record.disabled is None  # bitfit merges trivially but cannot switch off
    assert record.saving.peft is None and record.about.summary.count(" + ") == 1
    assert record.runs_with.quantized_base is False  # bitfit trains the base's own biases
