"""Fuzzing the recipe parser: whatever document or text arrives, `validate_recipe` and `load_recipe` either accept it
or raise a RecipeError whose message is one line. Never another exception, never a traceback for the user.

Three sources of input: mutations of a valid recipe (keys deleted, added, renamed, values replaced by anything,
method names real or not), arbitrary nested documents, and arbitrary text and bytes written as the recipe file
(with YAML's sharp edges mixed in: tabs, open brackets, anchors, aliases, tags).
"""

from __future__ import annotations

import copy
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftune.errors import RecipeError
from ftune.methods import METHODS
from ftune.recipe import DataSpec, HubSource, ModelSpec, Recipe, TrainSpec, load_recipe, validate_recipe

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID: dict[str, Any] = {
    "model": {"name": "models/tiny-bert"},
    "task": "sequence_classification",
    "data": {
        "train": "data/train.tsv",
        "validation": ["data/validation.tsv", {"hub": "glue", "config": "sst2", "split": "validation"}],
        "text_column": "sentence",
        "max_length": 32,
    },
    "method": {"name": "lora", "r": 4, "alpha": 8},
    "train": {"max_steps": 4, "batch_size": 8, "lr": "3e-4", "seed": 0},
    "output_dir": "runs/fuzz",
}

KNOWN_KEYS = sorted(
    {k for model in (Recipe, ModelSpec, DataSpec, TrainSpec, HubSource) for k in model.model_fields}
    | {k for m in METHODS.values() for k in m.config_cls.model_fields}
)
METHOD_NAMES = [*METHODS, "lorra", "LoRA", "", "full ", "adapter-drop"]

KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10), st.integers(-3, 3), st.none(), st.booleans())
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=16),
    st.sampled_from(METHOD_NAMES),
    st.sampled_from(["3e-4", "1e400", "-1", "0", "nan", ".inf", "", " ", "/", ".", "~", "a\nb", "\x00", "..", "[x]"]),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8
)


def _dicts(node: Any) -> list[dict]:
    """Every mapping in a document (the root first)."""
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found += _dicts(value)
    elif isinstance(node, list):
        for value in node:
            found += _dicts(value)
    return found


@st.composite
def methods(draw) -> dict:
    name = draw(st.sampled_from(METHOD_NAMES))
    fields = list(METHODS[name].config_cls.model_fields) if name in METHODS else KNOWN_KEYS
    chosen = draw(st.lists(st.sampled_from(fields), max_size=3, unique=True))
    return {"name": name} | {k: draw(SCALARS) for k in chosen if k != "name"}


@st.composite
def mutated_recipes(draw) -> dict:
    doc = copy.deepcopy(VALID)
    doc["method"] = draw(methods())
    for _ in range(draw(st.integers(0, 5))):
        nodes = _dicts(doc)
        node = nodes[draw(st.integers(0, len(nodes) - 1))]
        op = draw(st.sampled_from(["delete", "add", "rename", "retype"]))
        keys = list(node)
        if op == "add" or not keys:
            node[draw(KEYS)] = draw(VALUES)
            continue
        key = keys[draw(st.integers(0, len(keys) - 1))]
        if op == "delete":
            del node[key]
        elif op == "rename":
            node[draw(KEYS)] = node.pop(key)
        else:
            node[key] = draw(VALUES)
    return doc


def _check(call) -> None:
    """Accepted, or a one-line RecipeError; anything else fails the property."""
    try:
        call()
    except RecipeError as e:
        message = str(e)
        assert message and len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, repr(message)
        assert "Traceback" not in message


def test_the_valid_recipe_is_valid():
    assert validate_recipe(copy.deepcopy(VALID)).method.name == "lora"


@FUZZ
@given(doc=st.one_of(mutated_recipes(), mutated_recipes(), VALUES))
def test_validate_recipe_accepts_or_explains(doc):
    _check(lambda: validate_recipe(doc))


# `--set` overrides: dotted keys (real and not), values YAML may or may not parse
OVERRIDES = st.lists(
    st.builds(
        lambda key, sep, value: key + sep + value,
        st.one_of(
            st.sampled_from(
                [
                    "train.lr",
                    "method.r",
                    "data.train",
                    "model",
                    "trian.lr",
                    "train.lr.x",
                    "output_dir",
                    "",
                    ".",
                    "a..b",
                    "method.name",
                ]
            ),
            st.text(max_size=8),
        ),
        st.sampled_from(["=", "", "=="]),
        st.one_of(st.sampled_from(["3e-4", "[1", "{a: 1}", "!!int x", "null", "", "lora", "- a"]), st.text(max_size=8)),
    ),
    max_size=3,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(doc=st.one_of(mutated_recipes(), VALUES), overrides=OVERRIDES)
def test_load_recipe_of_a_dumped_document(folder, doc, overrides):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _check(lambda: load_recipe(path, overrides))


# text that is nearly YAML: recipe lines, broken up and mixed with YAML's special characters
YAMLISH = st.lists(
    st.one_of(
        st.sampled_from(yaml.safe_dump(VALID, sort_keys=False).splitlines()),
        st.sampled_from(
            [
                "\t",
                "  ",
                "- ",
                ": ",
                "[",
                "]",
                "{",
                "}",
                "&a ",
                "*a",
                "!!float ",
                "!!int ",
                "!!binary ",
                "!!timestamp ",
                "!!python/object:os.system ",
                "? ",
                "---",
                "...",
                "%YAML 1.1",
                "'",
                '"',
                "#",
                "2020-13-45",
                "0x1g",
                "|",
                ">",
            ]
        ),
        st.text(alphabet=string.printable, max_size=12),
    ),
    max_size=12,
).map("".join)


@FUZZ
@given(text=st.one_of(YAMLISH, st.text(max_size=60)), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_load_recipe_of_any_text(folder, text, raw):
    path = folder / "recipe.yaml"
    if raw is None:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(raw)
    _check(lambda: load_recipe(path))


@pytest.mark.parametrize(
    "text",
    [
        "&a [*a]",  # a list that contains itself
        "model: &m {name: *m}\ntask: causal_lm\n",  # a mapping that contains itself
        "[" * 3000 + "]" * 3000,  # nesting deeper than the parser's recursion
        "train: {lr: !!float fast}\n",
        "train: {seed: !!int x}\n",
        "output_dir: 2020-13-45\n",
        "output_dir: !!timestamp x\n",
        "model: {name: !!binary '###'}\n",
    ],
)
def test_load_recipe_known_sharp_edges(folder, text):
    path = folder / "edge.yaml"
    path.write_text(text)
    _check(lambda: load_recipe(path))
