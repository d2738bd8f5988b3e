"""train.best_mode inferred from train.best_metric (ftune/recipe.py), kept where set, and stored resolved in the run's
recipe.yaml."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune.cli import app
from ftune.recipe import TrainSpec, dump_recipe, validate_recipe

runner = CliRunner()


@pytest.mark.parametrize(
    ("metric", "mode"),
    [
        ("loss", "min"),
        ("perplexity", "min"),
        ("eval_loss", "min"),
        ("rmse", "min"),
        ("accuracy", "max"),
        ("f1", "max"),
        ("rewards/accuracies", "max"),
        (None, "max"),
    ],
)
def test_best_mode_is_inferred(metric, mode):
    assert TrainSpec(best_metric=metric).best_mode == mode
    assert TrainSpec(best_metric=metric, best_mode=None).best_mode == mode


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_best_mode_set_is_kept(metric):
    assert TrainSpec(best_metric=metric, best_mode="max").best_mode == "max"
    assert TrainSpec(best_metric=metric, best_mode="min").best_mode == "min"


def test_resolved_best_mode_is_in_the_stored_recipe(tiny_llama, sft_data, tmp_path):
    """The run's recipe.yaml holds the mode used; loading it again (--resume compares the dumps) gives the same text,
    and the kept weights are the lowest loss's."""
    doc = recipe_doc("sft", tiny_llama, sft_data, tmp_path / "out", max_steps=2, eval_every=1, best_metric="loss")
    recipe = validate_recipe(doc)
    assert "best_mode: min" in dump_recipe(recipe)
    assert dump_recipe(validate_recipe(yaml.safe_load(dump_recipe(recipe)))) == dump_recipe(recipe)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    stored = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert stored["train"]["best_mode"] == "min"
    again = runner.invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--resume"])
    assert "recipe differs" not in again.output
