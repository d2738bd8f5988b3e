"""End to end through the `ftune` CLI (typer's CliRunner, in-process) on the tiny models and data from conftest.

Click >= 8.2 always captures stderr apart from stdout (there is no `mix_stderr` any more): `result.stdout` is what
a pipe would get (the JSON), `result.stderr` the progress and errors, `result.output` both interleaved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune.cli import app
from ftune.methods import METHODS

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception  # show the real traceback, not a bare exit code 1
    return result


def train(recipe: Path, *extra):
    result = invoke("train", recipe, *extra)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def cls_run(tiny_bert, cls_data, tmp_path_factory):
    """One classification run shared by this module: 4 steps of LoRA on the tiny BERT, lr set from the CLI."""
    root = tmp_path_factory.mktemp("cli-cls")
    recipe = write_recipe(root / "recipe.yaml", recipe_doc("cls", tiny_bert, cls_data, root / "run"))
    result = train(recipe, "--set", "train.lr=0.005")
    return root / "run", recipe, result


@pytest.fixture(scope="module")
def sft_run(tiny_llama, sft_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-sft")
    recipe = write_recipe(root / "recipe.yaml", recipe_doc("sft", tiny_llama, sft_data, root / "run"))
    return root / "run", recipe, train(recipe)


def _check_run_dir(run: Path, result, seed: int = 0) -> None:
    for name in ("recipe.yaml", "run.json", "metrics.jsonl", "metrics.json", "method.safetensors", "method.json"):
        assert (run / name).is_file(), name
    assert (run / "tokenizer").is_dir() and any((run / "tokenizer").iterdir())
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000004"]

    record = json.loads((run / "run.json").read_text())
    assert {"torch", "transformers", "python", "ftune"} <= record["versions"].keys()
    assert record["seed"] == seed and "git_sha" in record

    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [e for e in logged if "loss" in e]
    assert [e["step"] for e in losses] == [1, 2, 3, 4]  # log_every=1, max_steps=4
    assert all(math.isfinite(e["loss"]) for e in losses)

    final = json.loads((run / "metrics.json").read_text())
    assert final["step"] == 4 and final["validation"]
    assert json.loads(result.stdout) == final  # stdout is exactly the final metrics, progress went to stderr
    assert json.loads((run / "method.json").read_text())["step"] == 4


def test_train_classification(cls_run):
    run, _, result = cls_run
    _check_run_dir(run, result)
    assert "accuracy" in json.loads((run / "metrics.json").read_text())["validation"]


def test_train_sft(sft_run):
    run, _, result = sft_run
    _check_run_dir(run, result)
    assert "perplexity" in json.loads((run / "metrics.json").read_text())["validation"]


def test_set_override_is_saved(cls_run):
    run, recipe, _ = cls_run
    assert yaml.safe_load(recipe.read_text())["train"]["lr"] == 1e-2  # the file itself is untouched
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["lr"] == 0.005


def test_validate(cls_run):
    _, recipe, _ = cls_run
    result = invoke("validate", recipe, "--set", "train.batch_size=4")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)  # the parameter counts are YAML comments
    assert resolved["train"]["batch_size"] == 4
    assert resolved["method"]["name"] == "lora" and resolved["task"] == "sequence_classification"
    assert "trainable parameters" in result.stdout


def test_methods_lists_the_registry():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert listed == set(METHODS)
    assert "PydanticUndefined" not in result.stdout  # defaults from a factory are shown as values
    for line in result.stdout.splitlines():
        method = METHODS[line.split()[0]]
        if method.about.recommended:
            assert line.endswith(f"recommended lr {method.about.recommended.lr:g}"), line


def test_schema():
    result = invoke("schema")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert {"model", "task", "data", "method", "train", "output_dir"} <= schema["properties"].keys()


@pytest.mark.parametrize("which", ["cls", "sft"])
def test_eval_reproduces_final_validation(which, cls_run, sft_run):
    run = (cls_run if which == "cls" else sft_run)[0]
    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    expected = json.loads((run / "metrics.json").read_text())["validation"]
    assert scored.keys() - {"source"} == expected.keys()
    for key, value in expected.items():
        assert scored[key] == pytest.approx(value, abs=1e-6), key


def test_eval_data_file(cls_run, cls_data):
    run = cls_run[0]
    result = invoke("eval", run, "--data", cls_data / "train.tsv")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["source"] == str(cls_data / "train.tsv")
    assert scored["examples"] == 48


def test_loss_falls(tiny_llama, cls_data, tmp_path):
    """LoRA on the learnable sentiment data: the loss must fall well below its start, not drift by noise.

    The tiny Llama, not the tiny BERT: conftest's BERT tokenizer maps every word to [UNK] under transformers 5
    (`BertTokenizerFast(vocab_file=...)` is ignored), so no classifier on it can learn.
    """
    doc = recipe_doc("cls", tiny_llama, cls_data, tmp_path / "run", max_steps=30, log_every=5, lr=1e-2)
    del doc["data"]["validation"]
    train(write_recipe(tmp_path / "recipe.yaml", doc))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6
    assert losses[-1] < 0.75 * losses[0], losses
