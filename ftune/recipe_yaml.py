"""Reading a recipe's YAML safely: bounded in size, depth and expansion, with duplicate keys an error.

YAML's safe subset still lets a small file cost a lot: an alias chain (`&a [x, x]`, `&b [*a, *a]`, ... "billion
laughs") is a few hundred bytes whose value, walked as a tree (validation, error messages), is exponential; `[[[[`
thousands deep exceeds Python's recursion; and a mapping that names a key twice keeps the last one without a
word (two `train:` sections, `lr` twice in one). This reader, a `yaml.SafeLoader` (plain values only, never a
Python object a tag asks for), refuses each in one line naming the line:

- **Size**: a recipe file holds at most `MAX_BYTES` (1 MiB; real recipes are a few KiB).
- **Aliases**: anchors and aliases are allowed, but the document as expanded (every alias counted as a copy of its
  anchor's value) holds at most `MAX_NODES` values (20,000) and nests at most `MAX_DEPTH` levels (64), counted while
  composing, so a billion-laughs chain stops after a few thousand values. An alias inside its own anchor
  (`&a [*a]`) is refused.
- **Duplicate keys**: at any depth, named with both lines. Keys YAML reads as equal values count as one
  (`1`, `1.0` and `true` are one key to Python).
- **Merge keys** (`<<: *base`): refused. They are a YAML 1.1 extension (dropped in 1.2) where one key silently
  overrides another, the very thing duplicate keys are refused for; write the keys out (an alias can still stand
  for a whole value: `validation: *train_sources`).

Events come from libyaml's C parser when pyyaml has it (as `yaml.CSafeLoader`'s do), so a file near the size
limit is read in well under a second; the Python composer above it counts the nodes and depth. Without libyaml
the pure-Python parser is used: the same results, slower on large files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
import yaml.reader
from yaml.nodes import MappingNode, Node

from ftune.errors import RecipeError

MAX_BYTES = 1 << 20
"""Bytes a recipe file may hold (1 MiB)."""
MAX_NODES = 20_000
"""Values (scalars, lists, mappings) in a document with every alias expanded."""
MAX_DEPTH = 64
"""Nesting of lists and mappings, aliases expanded; a recipe is a few levels deep."""

_MERGE = "tag:yaml.org,2002:merge"


class _Refused(yaml.YAMLError):
    """A document this reader refuses; `line` is 0-based, as pyyaml's marks are."""

    def __init__(self, line: int, reason: str):
        super().__init__(reason)
        self.line, self.reason = line, reason


def read_text(path: Path) -> str:
    """The recipe file's text; RecipeError when it is larger than MAX_BYTES, not UTF-8, or unreadable."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)  # never more, whatever the file claims (it may grow, or be endless)
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_BYTES:
        raise RecipeError(
            f"{path}: larger than {MAX_BYTES // 2**20} MiB, the most a recipe may be (recipes are a "
            "few KiB); is this the right file?"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (not UTF-8); a recipe is a YAML mapping") from None


def parse(text: str, source: str, *, lines: bool = True) -> Any:
    """The value of the YAML document `text` (None when empty), as yaml.safe_load gives it within the module
    docstring's limits; anything else a RecipeError `"<source> line N: <why>"` (no line when `lines` is false)."""
    if len(text) > MAX_BYTES:
        raise RecipeError(f"{source}: longer than {MAX_BYTES // 2**20} MiB, the most a recipe may be")
    loader = None
    try:
        loader = _Loader(text)
        return loader.get_single_data()
    except _Refused as e:
        raise RecipeError(f"{source}{_at(e.line, lines)}: {e.reason}") from None
    except yaml.YAMLError as e:
        reason = one_line(str(getattr(e, "problem", None) or e))[:200]  # it may quote an anchor of any length
        raise RecipeError(f"{source}{_at(_line_of(e, text), lines)}: not valid YAML ({reason})") from None
    except Exception as e:  # noqa: BLE001 - a constructor's own error outside construct_object (the tagged types)
        raise RecipeError(f"{source}: not valid YAML ({one_line(str(e))[:120] or type(e).__name__})") from None
    finally:
        if loader is not None:
            loader.dispose()


class _Loader(yaml.SafeLoader):
    """SafeLoader with bounded composition and checked mappings (the module docstring)."""

    def __init__(self, text: str):
        super().__init__(text)
        # libyaml's parser streams the same events as pyyaml's own, much faster (yaml.CSafeLoader uses it too)
        self._c_events = yaml.cyaml.CParser(text) if yaml.__with_libyaml__ else None
        self._expanded = 0  # values so far, each alias counted as a copy of its anchor's value
        self._depth = 0  # levels of the node being composed
        self._reach = 0  # the deepest level reached so far, aliases expanded
        self._extent: dict[str, tuple[int, int]] = {}  # anchor -> (values, levels) of its finished value

    def check_event(self, *choices):
        return self._c_events.check_event(*choices) if self._c_events else super().check_event(*choices)

    def peek_event(self):
        return self._c_events.peek_event() if self._c_events else super().peek_event()

    def get_event(self):
        return self._c_events.get_event() if self._c_events else super().get_event()

    def dispose(self):
        if self._c_events:
            self._c_events.dispose()
        super().dispose()

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            return self._alias(event)
        self._depth += 1
        self._grow(1, self._depth, event)
        before, outer, self._reach = self._expanded - 1, self._reach, self._depth
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._extent[event.anchor] = (self._expanded - before, self._reach - self._depth)
        self._reach = max(outer, self._reach)
        return node

    def _alias(self, event: yaml.AliasEvent) -> Node:
        if event.anchor in self.anchors and event.anchor not in self._extent:
            raise _Refused(
                event.start_mark.line,
                f"alias *{event.anchor[:40]} is used inside its own anchor; a value cannot contain itself",
            )
        values, levels = self._extent.get(event.anchor, (1, 1))  # an undefined alias: the composer says so
        self._grow(values, self._depth + levels, event)
        return super().compose_node(None, None)

    def _grow(self, values: int, reach: int, event: yaml.Event) -> None:
        self._expanded += values
        self._reach = max(self._reach, reach)
        if self._expanded > MAX_NODES:
            raise _Refused(
                event.start_mark.line,
                f"more than {MAX_NODES:,} values, each alias counted as a copy "
                "of its anchor's (a recipe has a few hundred; aliases that multiply are refused)",
            )
        if reach > MAX_DEPTH:
            raise _Refused(
                event.start_mark.line,
                f"nested deeper than {MAX_DEPTH} levels (aliases expanded); a recipe is a few levels deep",
            )

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line
            if key_node.tag == _MERGE:
                raise _Refused(
                    line,
                    "merge keys (<<) are not supported; write the keys out (an alias *name can "
                    "still stand for a whole value)",
                )
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first_line:
                    raise _Refused(line, f"duplicate key {_short(key)} (first at line {first_line[key] + 1}); keep one")
                first_line[key] = line
            except TypeError:  # a list or mapping as a key: SafeConstructor refuses it below
                pass
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as e:  # noqa: BLE001 - a tagged scalar it cannot read (!!int x, !!binary ###): name the line
            raise _Refused(node.start_mark.line, f"not valid YAML ({one_line(str(e))[:120] or type(e).__name__})")


def _line_of(error: yaml.YAMLError, text: str) -> int | None:
    """0-based line of pyyaml's error: its problem mark, or for a character the reader refuses, its position."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return mark.line
    return text.count("\n", 0, error.position) if isinstance(error, yaml.reader.ReaderError) else None


def _at(line: int | None, lines: bool) -> str:
    return f" line {line + 1}" if lines and line is not None else ""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if len(str(value)) <= limit else repr(str(value)[:limit]) + "..."
    return text if len(text) <= limit + 10 else text[:limit] + "..."


def one_line(text: str) -> str:
    return " ".join(text.split())


def kind_of(value: Any) -> str:
    """What a YAML document's top value is, in the words a recipe's author knows."""
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), type(value).__name__)
