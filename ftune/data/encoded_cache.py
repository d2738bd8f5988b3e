"""Tokenise once: a run's encoded examples kept on disk, so the next run of the same data starts training at once.

An entry is keyed by everything the examples depend on: the data files (resolved path, and the content: size and
sha256 of the bytes, ftune/data/fingerprint.py; never the modification time, which an edit may keep), the recipe's data
section (columns, max_length, labels, row limits, validation_fraction, ...), the task and objective, the tokenizer
(a hash of the files it saves), the base model's config where the task encodes with it, and the code that reads and
encodes (a hash of ftune/data/*.py and the task's module). Any change gives a new key, so a stale
entry is never read; old entries are left for `rm -rf` of the folder. Hub datasets are not cached (no cheap identity;
`datasets` keeps its own copy of the rows).

The format is safetensors (no pickle): per split and field, the values flattened into one array plus one offsets
array per level of list nesting; names, sources and counts in its JSON metadata. An entry that cannot be read is
encoded again and rewritten; one that cannot be written leaves the run uncached, with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ftune.data.encoded import Encoded

FORMAT = 1
Splits = tuple[list[str] | None, Encoded, Encoded | None]
"""Label names (None for a task without classes), the encoded training split and the validation split (or None)."""


def cache_root() -> Path:
    """$FTUNE_ENCODED_CACHE, else $FTUNE_CACHE/encoded, else ~/.cache/ftune/encoded."""
    if os.environ.get("FTUNE_ENCODED_CACHE"):
        return Path(os.environ["FTUNE_ENCODED_CACHE"]).expanduser()
    return Path(os.environ.get("FTUNE_CACHE", Path.home() / ".cache" / "ftune")).expanduser() / "encoded"


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the files `tokenizer.save_pretrained` writes (vocabulary, merges, special tokens, chat template),
    without the truncation and padding a fast tokenizer's last call left in its tokenizer.json."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if not path.is_file():
                continue
            content = path.read_bytes()
            if path.name == "tokenizer.json":
                state = json.loads(content) | {"truncation": None, "padding": None}
                content = json.dumps(state, sort_keys=True).encode()
            digest.update(path.name.encode() + b"\0" + content)
    return digest.hexdigest()


def code_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(set(files)):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def file_identity(path: Path) -> list[Any]:
    """[resolved path, size, sha256]: the content decides; the path too, because an entry keeps the source's name
    for the messages that cite its rows."""
    from ftune.data.fingerprint import file_fingerprint

    content = file_fingerprint(path)
    return [str(path.resolve()), content["size"], content["sha256"]]


def identity(data, task_file: Path, reads_conll: bool, tokenizer, settings: dict[str, Any]) -> dict[str, Any] | None:
    """What a recipe's encoded examples depend on: `data` (the recipe's data section), the data files it reads
    (None when a split reads a Hub dataset), the task's module `task_file`, the reading code, the tokenizer and
    `settings` (task, objective, model config: whatever else the caller's encoding reads)."""
    from ftune.data.sources import local_file

    files = {"train": local_file(data.train, "train", reads_conll)}
    if data.validation:
        files["validation"] = local_file(data.validation, "validation", reads_conll)
    if None in files.values():
        return None
    return {
        "files": {split: file_identity(path) for split, path in files.items()},
        "data": data.model_dump(mode="json", exclude={"packing", "cache"}),
        "code": code_digest([*Path(__file__).parent.glob("*.py"), task_file, task_file.parent / "base.py"]),
        "tokenizer": tokenizer_digest(tokenizer),
        **settings,
    }


def load_or_build(identity: dict[str, Any] | None, build: Callable[[], Splits]) -> tuple[Splits, str]:
    """The entry for `identity` if there is one, else `build()`, written as that entry. Returns (splits, what
    happened in a few words, for the console). `identity` None: not cacheable, build every time."""
    if identity is None:
        return build(), "encoded (not cached: a Hub dataset has no cheap identity)"
    key = hashlib.sha256(json.dumps({"format": FORMAT, **identity}, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root() / f"{key}.safetensors"
    if path.is_file():
        found = _read(path)
        if found is not None:
            return found, f"encoded examples read from {path}"
    splits = build()
    try:
        _write(path, splits)
    except (OSError, _Uncacheable) as e:
        return splits, f"encoded (not cached: {e})"
    return splits, f"encoded and cached at {path}"


class _Uncacheable(ValueError):
    """An example holds something other than numbers and lists of numbers."""


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


def _kind(values: list[Any]) -> str:
    types = set(map(type, values))
    for kind, allowed in (("bool", {bool}), ("int", {int}), ("float", {int, float})):
        if types <= allowed:
            return kind
    raise _Uncacheable(f"an example field holds {', '.join(sorted(t.__name__ for t in types - {int, float}))}")


def _columns(split: str, examples: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, fields = {}, {}
    if not examples or any(e.keys() != examples[0].keys() for e in examples):
        raise _Uncacheable("the examples do not all have the same fields")
    for key in examples[0]:
        level = [e[key] for e in examples]
        depth = _depth(level[0])
        for d in range(depth):
            if not all(isinstance(v, list) for v in level):
                raise _Uncacheable(f"field {key!r} is not nested alike in every example")
            arrays[f"{split}/{key}/offsets{d}"] = np.cumsum([0] + [len(v) for v in level], dtype=np.int64)
            level = [x for v in level for x in v]
        kind = _kind(level)
        dtype = {"bool": np.bool_, "int": np.int64, "float": np.float64}[kind]
        flat = np.asarray(level, dtype=dtype)
        if kind == "int" and flat.size and -(2**31) <= flat.min() and flat.max() < 2**31:
            flat = flat.astype(np.int32)  # token ids and labels: half the disk and read time
        arrays[f"{split}/{key}/values"] = flat
        fields[key] = {"depth": depth, "kind": kind}
    return arrays, fields


def _write(path: Path, splits: Splits) -> None:
    from safetensors.numpy import save_file

    names, *encoded = splits
    arrays, meta = {}, {"names": names, "splits": {}}
    for split, part in zip(("train", "validation"), encoded):
        if part is None:
            continue
        columns, fields = _columns(split, part.examples)
        arrays |= columns
        meta["splits"][split] = {
            "source": part.source,
            "dropped": part.dropped,
            "truncated": part.truncated,
            "size": len(part.examples),
            "fields": fields,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        partial = Path(f.name)
    try:
        save_file(arrays, str(partial), metadata={"ftune": json.dumps(meta)})
        os.replace(partial, path)  # atomic: a reader never sees half an entry
    finally:
        partial.unlink(missing_ok=True)


def _read(path: Path) -> Splits | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads(f.metadata()["ftune"])
            parts: dict[str, Encoded] = {}
            for split, info in meta["splits"].items():
                columns = {}
                for key, field in info["fields"].items():
                    items = f.get_tensor(f"{split}/{key}/values").tolist()
                    for d in reversed(range(field["depth"])):
                        cuts = f.get_tensor(f"{split}/{key}/offsets{d}").tolist()
                        items = [items[a:b] for a, b in pairwise(cuts)]
                    columns[key] = items
                examples = [dict(zip(columns, row)) for row in zip(*columns.values())]
                if len(examples) != info["size"]:
                    return None
                parts[split] = Encoded(examples, info["source"], info["dropped"], info["truncated"])
    except Exception:  # noqa: BLE001 - a truncated or foreign file is a miss: encoded again and rewritten
        return None
    return meta["names"], parts["train"], parts.get("validation")
