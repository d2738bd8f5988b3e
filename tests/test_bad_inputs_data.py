"""Every bad input the recipe points at ends in one line on stderr that names the file, row or field (exit 1):
models (missing, without weights, a corrupt config, GGUF files), data files (missing, empty, unreadable, ragged, of an
unsupported type), label and text columns, CoNLL and token files, seq2seq data and models, and a method the model
cannot serve. Also: over-long rows are not an error but counted, and said (classification, SFT, eval).

Each case ends in one line on stderr that names the field, file or row, its exit code (2: recipe or usage, 1:
runtime), no traceback, and nothing on disk overwritten (tests/refusals.py); tests/test_bad_inputs.py checks the size
of the whole catalogue. The case environment: tests/bad_input_helpers.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import bad_input_helpers
from bad_input_helpers import Env, _garbage, _text, _tsv, runner
from conftest import recipe_doc
from ftune.cli import app

adapter_run = bad_input_helpers.adapter_run  # the fixture, where pytest finds it


def _bad_label(env: Env) -> list:
    rows = (env.cls / "validation.tsv").read_text().splitlines()
    rows[3] = rows[3].rsplit("\t", 1)[0] + "\t7"  # third data row (line 1 is the header)
    bad = _tsv(env.tmp / "validation.tsv", rows)
    return env.train(data={"validation": str(bad)})


def _weightless_model(env: Env) -> list:
    folder = env.tmp / "no-weights"
    folder.mkdir()
    shutil.copy(env.bert / "config.json", folder / "config.json")
    return env.train(model={"name": str(folder)})


def _cls_rows(env: Env, split: str = "train") -> list[str]:
    return (env.cls / f"{split}.tsv").read_text().splitlines()


def _empty_label_cell(env: Env) -> list:
    rows = _cls_rows(env)
    rows[2] = rows[2].rsplit("\t", 1)[0] + "\t"  # second data row: the label cell is empty
    return env.train(data={"train": str(_tsv(env.tmp / "train.tsv", rows))})


def _validation_without_text_column(env: Env) -> list:
    rows = _cls_rows(env, "validation")
    rows[0] = "text\tlabel"
    return env.train(data={"validation": str(_tsv(env.tmp / "validation.tsv", rows))})


def _model_with_corrupt_config(env: Env) -> list:
    folder = shutil.copytree(env.bert, env.tmp / "corrupt-config")
    (folder / "config.json").write_text('{"model_type": "bert", ')
    return env.train(model={"name": str(folder)})


def _token_train(env: Env, name: str, text: str) -> list:
    """A token_classification recipe training on a file `name` holding `text` (no validation)."""
    doc = env.doc()
    doc["task"], doc["data"] = "token_classification", {"train": str(_text(env.tmp / name, text)), "max_length": 32}
    return env.train(doc)


def _s2s_train(env: Env, rows: list[dict], model: Path | None = None) -> list:
    """A seq2seq recipe (document -> summary) on a tiny T5 built into the case's folder, training on `rows`."""
    from conftest import build_t5, s2s_recipe_doc

    data = env.tmp / "s2s"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return env.train(s2s_recipe_doc(model or build_t5(env.tmp / "t5"), data, env.tmp / "out"))


def _prefix_without_cache(env: Env) -> list:
    """Prefix tuning on a tiny DistilBERT (BERT's vocabulary), whose forward takes no attention cache."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    folder = env.tmp / "distilbert"
    torch.manual_seed(0)
    vocab = (env.bert / "vocab.txt").read_text().split()
    DistilBertForMaskedLM(
        DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    ).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (env.bert / name).is_file():
            shutil.copy(env.bert / name, folder / name)
    doc = env.doc() | {"model": {"name": str(folder)}, "method": {"name": "prefix_tuning", "n_tokens": 4}}
    return env.train(doc)


# id: (arguments built from Env, exit code, substrings the one stderr line must hold)
CASES: dict[str, tuple[Callable[[Env], list], int, list[str]]] = {
    "model-path-missing": (lambda e: e.train(model={"name": "/no/such/model"}), 1, ["model.name", "/no/such/model"]),
    "model-without-weights": (_weightless_model, 1, ["model.name", "no-weights"]),
    "data-file-missing": (
        lambda e: e.train(data={"train": str(e.tmp / "absent.tsv")}),
        1,
        ["data.train", "absent.tsv"],
    ),
    "label-column-missing": (
        lambda e: e.train(data={"label_column": "labelz"}),
        1,
        ["train.tsv", "'labelz'", "data.label_column"],
    ),
    "label-outside-classes": (_bad_label, 1, ["validation.tsv row 3", "7"]),
    "empty-dataset": (
        lambda e: e.train(data={"train": str(_tsv(e.tmp / "train.tsv", ["sentence\tlabel"]))}),
        1,
        ["train.tsv", "no rows"],
    ),
    "empty-jsonl": (
        lambda e: e.train(data={"train": str(_tsv(e.tmp / "train.jsonl", [""]))}),
        1,
        ["train.jsonl", "no rows"],
    ),
    "malformed-jsonl": (
        lambda e: e.train(data={"train": str(_tsv(e.tmp / "train.jsonl", ['{"sentence": ']))}),
        1,
        ["train.jsonl", "cannot be read", "JSON parse error"],
    ),
    # data files
    "parquet-garbage": (
        lambda e: e.train(data={"train": _garbage(e, "train.parquet")}),
        1,
        ["train.parquet", "cannot be read as parquet"],
    ),
    "csv-ragged-rows": (
        lambda e: e.train(
            data={"train": str(_text(e.tmp / "train.csv", "sentence,label\ngood film,1\nbad film,0,x\n"))}
        ),
        1,
        ["train.csv", "cannot be read as csv", "line 3"],
    ),
    "csv-short-row": (
        lambda e: e.train(data={"train": str(_text(e.tmp / "train.csv", "sentence,label\ngood film,1\nbad film\n"))}),
        1,
        ["train.csv row 2", "'label'", "empty"],
    ),
    "unsupported-extension": (
        lambda e: e.train(data={"train": str(_text(e.tmp / "train.txt", "good film\t1\n"))}),
        1,
        ["train.txt", "unsupported file type", ".jsonl"],
    ),
    "label-cell-empty": (_empty_label_cell, 1, ["train.tsv row 2", "'label'", "empty"]),
    "label-outside-data-labels": (
        lambda e: e.train(data={"labels": ["neg"]}),
        1,
        ["train.tsv row 2", "label 1", "data.labels"],
    ),
    "text-column-missing-in-validation": (
        _validation_without_text_column,
        1,
        ["validation.tsv", "'sentence'", "data.text_column"],
    ),
    # models
    "model-corrupt-config": (_model_with_corrupt_config, 1, ["model.name", "corrupt-config", "config"]),
    "gguf-file-missing": (
        lambda e: e.train(model={"gguf_file": str(e.tmp / "absent.gguf")}),
        1,
        ["model.gguf_file", "absent.gguf"],
    ),
    "gguf-path-missing": (
        lambda e: e.train(model={"name": str(e.tmp / "absent.gguf")}),
        1,
        ["model.name", "absent.gguf"],
    ),
    # token classification
    "conll-line-without-tag": (
        lambda e: _token_train(e, "train.txt", "good NN B-PER\nfilm NN O\n\nbad\n"),
        1,
        ["train.txt line 4", "one column"],
    ),
    "token-tags-length-mismatch": (
        lambda e: _token_train(
            e,
            "train.jsonl",
            '{"tokens": ["good"], "ner_tags": ["O"]}\n{"tokens": ["good", "film"], "ner_tags": ["O"]}\n',
        ),
        1,
        ["train.jsonl row 2", "2 tokens but 1 tags"],
    ),
    "token-integer-tags-without-labels": (
        lambda e: _token_train(e, "train.jsonl", '{"tokens": ["good"], "ner_tags": [1]}\n'),
        1,
        ["train.jsonl row 1", "integer ids", "data.labels"],
    ),
    # seq2seq
    "seq2seq-without-target-column": (
        lambda e: _s2s_train(e, [{"document": "the movie was good"}]),
        1,
        ["train.jsonl", "no column 'summary'", "data.target_column"],
    ),
    "seq2seq-on-an-encoder": (
        lambda e: _s2s_train(e, [{"document": "good", "summary": "good"}], e.bert),
        1,
        ["model.name", "decoder_start_token_id", "not an encoder-decoder model"],
    ),
    "prefix-tuning-without-attention-cache": (
        _prefix_without_cache,
        1,
        ["DistilBertForSequenceClassification", "takes no attention cache"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_bert, cls_data, full_run, adapter_run, tmp_path, monkeypatch):
    bad_input_helpers.refused(case, CASES[case], Env(tiny_bert, cls_data, full_run, adapter_run, tmp_path), monkeypatch)


# Over-long rows are not an error: they are cut to data.max_length, and counted so the run record can say so.


def _cls_rows_of(texts: list[str], pairs: list[str] | None = None):
    from ftune.data.sources import Rows

    rows = [{"sentence": t, "label": i % 2} | ({"pair": pairs[i]} if pairs else {}) for i, t in enumerate(texts)]
    return Rows(rows, "rows.tsv")


def test_classification_counts_truncated_rows(tiny_bert):
    from transformers import AutoTokenizer

    from ftune.tasks.sequence_classification import encode_classification

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    # [CLS] + words + [SEP]: 5, exactly 8 (fits, not cut), 22 and 9 tokens (cut)
    texts = ["good film was", "good film was a plot and", " ".join(["good"] * 20), "good film was a plot and very"]
    examples, truncated = encode_classification(
        _cls_rows_of(texts),
        tokenizer,
        "sentence",
        None,
        "label",
        ["0", "1"],
        8,
    )
    assert [len(e["input_ids"]) for e in examples] == [5, 8, 8, 8]
    assert truncated == 2
    # sentence pairs: the pair's length counts as well
    examples, truncated = encode_classification(
        _cls_rows_of(["good", "good film"], ["bad", " ".join(["bad"] * 10)]),
        tokenizer,
        "sentence",
        "pair",
        "label",
        ["0", "1"],
        8,
    )
    assert truncated == 1 and [len(e["input_ids"]) for e in examples] == [5, 8]


def test_sft_counts_truncated_and_dropped_rows(tiny_llama):
    from transformers import AutoTokenizer

    from ftune.data.sources import Rows
    from ftune.tasks import IGNORE_INDEX
    from ftune.tasks.causal_lm import encode_sft

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    row = {"instruction": "repeat the word", "input": "good", "output": "yes"}
    (probe,), _, _ = encode_sft(Rows([row], "x"), tokenizer, "instruction", "input", "output", "alpaca", 1000)
    prompt = probe["labels"].count(IGNORE_INDEX)
    rows = [
        row,  # response + EOS: exactly fills prompt + 2
        row | {"output": "yes yes yes"},  # cut, kept
        row | {"instruction": "repeat the word please say the answer"},
    ]  # the prompt alone is too long: dropped
    examples, dropped, truncated = encode_sft(
        Rows(rows, "x"), tokenizer, "instruction", "input", "output", "alpaca", prompt + 2
    )
    assert (len(examples), dropped, truncated) == (2, 1, 1)
    assert all(len(e["input_ids"]) == prompt + 2 for e in examples)


def test_examples_carry_the_counts(tiny_bert, cls_data, tmp_path):
    from transformers import AutoTokenizer

    from ftune import assemble
    from ftune.recipe import validate_recipe

    long_rows = ["sentence\tlabel"] + [f"{' '.join(['good'] * (3 + 4 * i))}\t{i % 2}" for i in range(6)]
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "out")
    doc["data"] |= {"train": str(_tsv(tmp_path / "train.tsv", long_rows)), "max_length": 12}
    recipe = validate_recipe(doc)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    encoded = assemble.encode_rows(recipe, assemble.read_split(recipe, "train"), tokenizer, ["0", "1"])
    # 2 + 3, 7, 11, 15, 19, 23 words: the last four exceed 12 tokens
    assert (encoded.truncated, encoded.dropped, len(encoded.examples)) == (4, 0, 6)


def test_eval_reports_truncated_rows(full_run, tmp_path):
    long_rows = ["sentence\tlabel"] + [f"{' '.join(['good'] * 40)}\t1", "good film\t0"]
    result = runner.invoke(app, ["eval", str(full_run), "--data", str(_tsv(tmp_path / "long.tsv", long_rows))])
    assert result.exit_code == 0, result.output
    assert "note: 1 of 2 rows were cut to data.max_length=32" in result.stderr
    assert '"examples": 2' in result.stdout
