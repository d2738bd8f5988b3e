"""What the data checks accept is said: on the console at training time (rows cut under allow_truncation, a few
dropped rows, a few identical preference pairs, a class of data.labels no row has), and on stderr by `ftune eval`
(rows it could not score, rows it cut). A refused split is refused again when read from the encoded-data cache.
The refusals themselves: tests/test_data_checks.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import data_check_helpers
from conftest import recipe_doc, write_recipe
from data_check_helpers import _identical, _long_prompts, _read_jsonl, _relabel
from ftune.cli import app
from ftune.errors import DataError
from refusals import runner

env = data_check_helpers.env  # the fixture, where pytest finds it


def _console(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stderr + result.stdout


def test_allow_truncation_trains_and_says_so(env):
    result = runner.invoke(app, [str(a) for a in env.train("cls", max_length=5, allow_truncation=True)])
    said = _console(result)
    assert "data: train: 48 of 48 rows cut to data.max_length=5" in said
    assert "data: validation: 16 of 16 rows cut to data.max_length=5" in said
    record = json.loads((env.tmp / "out" / "run.json").read_text())
    assert record["train_rows_truncated"] == 48  # the record keeps the counts as before


def test_a_few_dropped_rows_are_said(env):
    said = _console(runner.invoke(app, [str(a) for a in _long_prompts(env, 1)]))  # 1 of 32: under the share
    assert "data: train: 1 of 32 rows dropped (data.max_length=128 leaves them no token to learn from)" in said
    assert "data: validation" not in said  # nothing cut there, nothing said


def test_a_few_identical_pairs_are_said(env):
    said = _console(runner.invoke(app, [str(a) for a in _identical(env, 1)]))
    assert "data: warning: " in said and "train.jsonl: 1 of 32 pairs have the same chosen and rejected" in said


def test_a_class_only_data_labels_names_is_said(env):
    said = _console(runner.invoke(app, [str(a) for a in env.train("cls", labels=["0", "1", "2"])]))
    assert "data: warning: class '2' (data.labels) is in no row of" in said
    assert json.loads((env.tmp / "out" / "run.json").read_text())["label_names"] == ["0", "1", "2"]


def test_checked_again_when_read_from_the_cache(env, monkeypatch):
    """A refused split is refused again when its encoded examples come from the encoded-data cache."""
    from ftune import assemble
    from ftune.recipe import load_recipe

    recipe = load_recipe(env.train("cls", drop_validation=True, train=_relabel(env, "train", "1"))[1])
    tokenizer = assemble.source_and_tokenizer(recipe)[1]
    calls, encode = [], assemble.encode_rows
    monkeypatch.setattr(assemble, "encode_rows", lambda *a, **k: calls.append(1) or encode(*a, **k))
    for _ in range(2):
        with pytest.raises(DataError, match="at least 2 classes"):
            assemble.encoded_splits(recipe, tokenizer)
    assert len(calls) == 1  # the second refusal read the examples from the cache


@pytest.fixture(scope="module")
def sft_run(tiny_llama, sft_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data-checks-sft-run")
    doc = recipe_doc("sft", tiny_llama, sft_data, root / "run", max_steps=1)
    assert runner.invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))]).exit_code == 0
    return root / "run"


def test_eval_says_which_rows_it_could_not_score(sft_run, tmp_path):
    rows = _read_jsonl(Path(json.loads((sft_run / "run.json").read_text())["train_source"]))[:4]
    rows[0]["instruction"] = " ".join(["repeat"] * 140)  # the prompt alone fills data.max_length=128: not scored
    rows[1]["output"] = " ".join(["good"] * 140)  # its response is cut
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = runner.invoke(app, ["eval", str(sft_run), "--data", str(path)])
    assert result.exit_code == 0, result.output
    assert (
        "note: 1 of 4 rows could not be scored: data.max_length=128 leaves them no token to score (dropped); "
        "the metrics cover the other 3" in result.stderr
    )
    assert "note: 1 of 4 rows were cut to data.max_length=128 tokens" in result.stderr
