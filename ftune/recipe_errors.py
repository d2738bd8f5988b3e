"""Pydantic's validation errors, explained in one line in the recipe's own terms: the dotted field a user wrote,
did-you-mean for unknown keys and unknown registry names (methods, objectives).

A user's value is only ever shown through `shown`, a bounded repr (reprlib: a few items of a list or mapping, a
few levels, the head of a long string), so a huge or deeply nested value in a wrong-typed field costs a short
message, never a walk of the whole value.
"""

from __future__ import annotations

import difflib
import reprlib
from typing import Any

from pydantic import BaseModel

from ftune.methods import METHODS
from ftune.objectives import OBJECTIVES


def explain(error: dict[str, Any], doc: dict[str, Any], root: type[BaseModel]) -> str:
    """One line for pydantic's `error` on the recipe document `doc`, validated as `root`."""
    loc = _user_loc(error["loc"], doc)
    kind = error["type"]
    field = _dotted(loc) or "recipe"
    if kind == "union_tag_invalid":
        tag = str(error.get("ctx", {}).get("tag", ""))
        what, names = _registry_at(loc)
        return f"{field}.name: unknown {what} {shown(tag)}{_did_you_mean(tag, names)}; `ftune methods` lists them"
    if kind == "union_tag_not_found":
        return f"{field}.name: missing; one of {', '.join(_registry_at(loc)[1])}"
    if kind == "extra_forbidden" and loc:
        return f"{field}: unknown key{_did_you_mean(loc[-1], _known_keys(loc[:-1], doc, root))}"
    if kind == "missing":
        return f"{field}: required but missing"
    if kind == "value_error":  # our own validators: their message is the explanation, the input is the section
        reason = _short(str(error.get("ctx", {}).get("error", error["msg"])), _REASON_LIMIT)
        return reason if not loc else f"{field}: {reason}"
    return f"{field}: {error['msg']} (got {shown(error.get('input'))})"


class _Bounded(reprlib.Repr):
    """reprlib's limits, and bytes (YAML's !!binary) cut before they are shown like strings are."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 6, 6, 6
        self.maxstring, self.maxlong, self.maxother = 60, 40, 60

    def repr_bytes(self, value: bytes, level: int) -> str:
        return repr(value[: self.maxstring]) + ("..." if len(value) > self.maxstring else "")


_REPR = _Bounded()
_REASON_LIMIT = 1000  # a validator's own message, which may quote the value: far above any message ftune writes


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)` in at most `limit` characters, built from the parts shown only (the module docstring)."""
    try:
        return _short(_REPR.repr(value), limit)
    except Exception:  # noqa: BLE001 - a value whose own __repr__ fails: its type is enough to go on
        return f"<{type(value).__name__}>"


def _user_loc(loc: tuple[Any, ...], doc: Any) -> list[Any]:
    """The keys a user wrote, from pydantic's error location: walk the document and drop the union members
    pydantic adds ("str", "HubSource", "lora"), the list index of a single value it wrapped into a list, and the
    `methods` key of a method list, which the recipe writes as `method: [...]`."""
    path, node = [], doc
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
        elif isinstance(part, int) or _is_member_tag(part) or (part == "methods" and isinstance(node, list)):
            continue
        else:
            node = None
        path.append(part)
    return path


def _dotted(loc: list[Any]) -> str:
    """`method[1].r`: keys joined by dots, list positions in brackets."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + _show_key(part)
    return text


def _show_key(part: Any) -> str:
    text = str(part) if isinstance(part, str | int) else ""
    return text if text and len(text) <= 60 and all(c.isalnum() or c in "_-" for c in text) else shown(part, 60)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_member_tag(part: Any) -> bool:
    text = str(part)
    return (
        text in METHODS
        or text in OBJECTIVES
        or text in {"str", "int", "float", "bool"}
        or text[:1].isupper()
        or "[" in text
    )


def _known_keys(parent: list[Any], doc: dict[str, Any], root: type[BaseModel]) -> list[str]:
    """The keys the section at `parent` accepts: walk the schema beside the document, and where a field holds any
    method, take the config of the method the document names there."""
    candidates, node = [root], doc
    for part in parent:
        if not isinstance(part, int):
            model = _chosen(candidates, node)
            field = model.model_fields.get(part) if model else None
            if field is None:
                return []
            candidates = _models_in(field.annotation)
        node = (
            node.get(part)
            if isinstance(node, dict)
            else (node[part] if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node) else None)
        )
    model = _chosen(candidates, node)
    return list(model.model_fields) if model else []


def _chosen(candidates: list[type[BaseModel]], node: Any) -> type[BaseModel] | None:
    if len(candidates) == 1:
        return candidates[0]
    name = node.get("name") if isinstance(node, dict) else None  # a union member is chosen by its `name`
    return next((m for m in candidates if "name" in m.model_fields and m.model_fields["name"].default == name), None)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _did_you_mean(word: str, choices: Any) -> str:
    word, choices = str(word)[:100], list(choices)  # a name is short: a huge word is matched by its head
    close = [c for c in choices if word.startswith(c) or c.startswith(word)]
    close = close or difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _registry_at(loc: list[Any]) -> tuple[str, list[str]]:
    """Which registry a tagged union at `loc` draws from: the objective section, else methods."""
    return ("objective", list(OBJECTIVES)) if loc[:1] == ["objective"] else ("method", list(METHODS))
