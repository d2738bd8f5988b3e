"""Tokenise once (data.cache): the second run of the same data reads the encoded examples from disk without reading
or encoding the data, and any change to the data, tokenizer or encoding settings encodes afresh."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from safetensors.torch import load_file

from conftest import recipe_doc
from ftune import assemble
from ftune.data import encoded_cache
from ftune.data.sources import local_file
from ftune.recipe import HubSource, validate_recipe
from ftune.run.train import train
from ftune.tasks import Encoded


def _train(doc: dict) -> str:
    out = io.StringIO()
    train(validate_recipe(doc), overwrite=True, console=Console(file=out, width=400))
    return out.getvalue()


def _counting_encode(monkeypatch) -> list[int]:
    calls, real = [], assemble.encode_rows
    monkeypatch.setattr(assemble, "encode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _refuse(*args, **kwargs):
    raise AssertionError("the data was read or encoded again")


@pytest.fixture()
def data(cls_data, tmp_path) -> Path:
    return Path(shutil.copytree(cls_data, tmp_path / "data"))  # a private copy: tests touch it


def test_the_second_run_reads_the_cache_and_trains_the_same(tiny_bert, data, tmp_path, monkeypatch):
    doc = recipe_doc("cls", tiny_bert, data, tmp_path / "run", max_steps=2)
    first = _train(doc)
    assert "encoded and cached at" in first
    weights = load_file(tmp_path / "run" / "method.safetensors")

    monkeypatch.setattr(assemble, "encode_rows", _refuse)
    monkeypatch.setattr(assemble, "read_split", _refuse)
    second = _train(doc)
    assert "encoded examples read from" in second
    again = load_file(tmp_path / "run" / "method.safetensors")
    assert all((again[k] == v).all() for k, v in weights.items())


def test_what_the_cache_returns_equals_a_fresh_encoding(tiny_bert, data, tmp_path):
    recipe = validate_recipe(recipe_doc("cls", tiny_bert, data, tmp_path / "run"))
    _, tokenizer = assemble.source_and_tokenizer(recipe)
    (names, train_set, val_set), note = assemble.encoded_splits(recipe, tokenizer)
    assert "cached at" in note
    (names2, train2, val2), note = assemble.encoded_splits(recipe, tokenizer)
    assert "read from" in note
    assert (names2, train2, val2) == (names, train_set, val_set)  # dataclass equality: examples, source, counts
    rows = assemble.read_split(recipe, "train")
    assert train2.examples == assemble.encode_rows(recipe, rows, tokenizer, names).examples


@pytest.mark.parametrize("change", ["data file", "max_length", "labels"])
def test_a_change_to_what_encoding_reads_encodes_again(change, tiny_bert, data, tmp_path, monkeypatch):
    doc = recipe_doc("cls", tiny_bert, data, tmp_path / "run", max_steps=1)
    _train(doc)
    calls = _counting_encode(monkeypatch)
    if change == "data file":
        with open(data / "train.tsv", "a") as f:
            f.write("the plot was good\t1\n")
    elif change == "max_length":
        doc["data"]["max_length"] = 16
    else:
        doc["data"]["labels"] = ["negative", "positive"]
    assert "encoded and cached at" in _train(doc)
    assert calls


def test_a_damaged_entry_is_encoded_again_and_rewritten(tiny_bert, data, tmp_path, monkeypatch):
    doc = recipe_doc("cls", tiny_bert, data, tmp_path / "run", max_steps=1)
    _train(doc)
    (entry,) = Path(os.environ["FTUNE_ENCODED_CACHE"]).glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    calls = _counting_encode(monkeypatch)
    assert "encoded and cached at" in _train(doc)
    assert calls
    assert "read from" in _train(doc)


def test_cache_off_writes_nothing(tiny_bert, data, tmp_path):
    doc = recipe_doc("cls", tiny_bert, data, tmp_path / "run", max_steps=1)
    doc["data"]["cache"] = False
    assert "data.cache: false" in _train(doc)
    assert not list(Path(os.environ["FTUNE_ENCODED_CACHE"]).glob("*"))


def test_a_hub_dataset_first_has_no_file_identity(data):
    hub = HubSource(hub="nyu-mll/glue", config="sst2", split="train")
    assert local_file([hub, str(data / "train.tsv")], "train") is None
    assert local_file([str(data / "missing.tsv"), str(data)], "train") == data / "train.tsv"
    calls = []
    _, note = encoded_cache.load_or_build(None, lambda: calls.append(1) or (None, None, None))
    assert calls and "not cached" in note


def test_nested_float_and_bool_fields_round_trip():
    train_set = Encoded(
        [
            {"input_ids": [[1, 2, 3], [4]], "labels": [[-100, 2, 3], [4]], "weight": 0.25, "keep": True},
            {"input_ids": [[5], [6, 7]], "labels": [[5], [-100, 7]], "weight": 1, "keep": False},
        ],
        "train.jsonl",
        dropped=2,
        truncated=1,
    )
    built = (["a", "b"], train_set, None)
    assert "cached at" in encoded_cache.load_or_build({"case": "round trip"}, lambda: built)[1]
    (names, again, validation), note = encoded_cache.load_or_build({"case": "round trip"}, _refuse)
    assert "read from" in note and names == ["a", "b"] and validation is None
    assert again == train_set
    assert [type(e["weight"]) for e in again.examples] == [float, float]  # a float field stays float throughout


def test_an_example_that_is_not_numbers_is_not_cached():
    odd = (None, Encoded([{"input_ids": [1], "text": "words"}], "x"), None)
    splits, note = encoded_cache.load_or_build({"case": "odd"}, lambda: odd)
    assert splits is odd and "not cached: an example field holds str" in note


@pytest.mark.parametrize("pairs", [False, True])
def test_chunked_tokenising_equals_one_call(tiny_bert, pairs):
    from transformers import AutoTokenizer

    from ftune.tasks.base import token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = [" ".join(["good"] * (i % 13) + ["bad"] * (i % 5)) for i in range(50)]
    seconds = texts[::-1] if pairs else None
    limit = 20 if pairs else 9
    whole = tokenizer(texts, seconds, truncation=True, max_length=limit)["input_ids"]
    assert token_ids(tokenizer, texts, seconds, chunk=7, truncation=True, max_length=limit) == whole
    assert max(map(len, whole)) == limit and min(map(len, whole)) < limit  # some rows cut, some not
