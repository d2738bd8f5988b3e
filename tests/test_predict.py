"""Multi-task inference: soft-prompt runs on one frozen base, loaded once, answer a batch that mixes their tasks,
row by row equal to each run alone (`ftune eval`'s model)."""

from __future__ import annotations

import functools
import io
import json
import random

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from conftest import FILLER, recipe_doc
from ftune.assemble import load_run
from ftune.cli import app
from ftune.errors import RunDirError
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.serve.predict import load_tasks, predict


@pytest.fixture(scope="module")
def three_class_data(tmp_path_factory):
    """A second task with another label set (3 classes, by sentence length)."""
    folder, rng = tmp_path_factory.mktemp("three"), random.Random(3)
    for split, n in (("train", 36), ("validation", 9)):
        rows = ["sentence\tlabel"] + [
            f"{' '.join(rng.sample(FILLER, 2 + i % 3))}\t{['short', 'medium', 'long'][i % 3]}" for i in range(n)
        ]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def runs(tiny_bert, cls_data, three_class_data, tmp_path_factory):
    root, out = tmp_path_factory.mktemp("multi"), {}
    plans = {
        "sentiment": (cls_data, {"name": "prompt_tuning", "n_tokens": 4}),
        "length": (three_class_data, {"name": "p_tuning", "n_tokens": 6, "encoder_hidden": 16}),
        "sentiment-prefix": (cls_data, {"name": "prefix_tuning", "n_tokens": 3, "mlp_hidden": 16}),
        "length-v2": (three_class_data, {"name": "p_tuning_v2", "n_tokens": 5}),
    }
    for name, (data, method) in plans.items():
        train(
            validate_recipe(recipe_doc("cls", tiny_bert, data, root / name, method, lr=3e-2)),
            console=Console(file=io.StringIO()),
        )
        out[name] = root / name
    return out


def _rows():
    rng = random.Random(7)
    return [
        {"task": ("sentiment", "length")[i % 2], "sentence": " ".join(rng.sample(FILLER, 1 + i % 5))} for i in range(10)
    ]


@functools.cache
def _loaded(run):
    return load_run(run)


def _alone(run, sentence):
    _, model, tokenizer = _loaded(run)
    batch = tokenizer([sentence], return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]


@pytest.mark.parametrize(
    "pair", [("sentiment", "length"), ("sentiment-prefix", "length-v2")], ids=["prompts", "prefixes"]
)
def test_mixed_batch_equals_each_task_alone(pair, runs):
    multi, tasks, tokenizer = load_tasks([runs[pair[0]], runs[pair[1]]])
    rows = [r | {"task": pair[("sentiment", "length").index(r["task"])]} for r in _rows()]
    predictions = predict(multi, tasks, tokenizer, rows, batch_size=16)  # one batch holding both tasks
    assert {p["task"] for p in predictions} == set(pair)
    for row, p in zip(rows, predictions):
        alone = _alone(runs[row["task"]], row["sentence"])
        assert len(p["logits"]) == len(alone)  # each row keeps its own task's label set (2 or 3 classes)
        assert (torch.tensor(p["logits"]) - alone).abs().max() <= 1e-5, row
        assert p["label"] in tasks[[t.name for t in tasks].index(row["task"])].labels


def test_cli_predict(runs, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(runs["sentiment"]),
            str(runs["length"]),
            "--input",
            str(source),
            "--output",
            str(tmp_path / "out.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["task"] for line in lines] == [r["task"] for r in _rows()]
    again = CliRunner().invoke(
        app, ["predict", str(runs["sentiment"]), "--input", str(source), "--output", str(tmp_path / "out.jsonl")]
    )
    assert again.exit_code != 0 and "exists" in again.output  # never overwrites


def test_refusals(runs, tmp_path):
    with pytest.raises(RunDirError, match="input prompts with layer prefixes"):
        load_tasks([runs["sentiment"], runs["length-v2"]])
    multi, tasks, tokenizer = load_tasks([runs["sentiment"], runs["length"]])
    with pytest.raises(Exception, match="task 'nope' is none of"):
        predict(multi, tasks, tokenizer, [{"task": "nope", "sentence": "good"}])
