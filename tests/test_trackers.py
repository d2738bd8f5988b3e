"""train.report_to: TensorBoard's event file holds exactly metrics.jsonl's values; an unknown tracker name gets a
did-you-mean from the recipe; a tracker whose package is missing is refused in one line before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune import rundir, trackers
from ftune.cli import app
from ftune.errors import RecipeError
from ftune.recipe import validate_recipe
from ftune.run.train import train


def test_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(trackers.TRACKERS) == {t.value for t in LoggerType} - {"all"}


def test_tensorboard_events_equal_metrics_jsonl(tiny_bert, cls_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(
        validate_recipe(
            recipe_doc("cls", tiny_bert, cls_data, out, max_steps=4, eval_every=2, report_to=["tensorboard"])
        )
    )
    expected = {}  # tag -> {step: value}, written out from metrics.jsonl by hand
    for line in (out / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "validation" in entry:
            values = {f"validation/{k}": v for k, v in entry["validation"].items()}
        else:
            values = {f"train/{k}": v for k, v in entry.items() if k != "step"}
        for tag, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # a scalar store takes numbers
                expected.setdefault(tag, {})[entry["step"]] = value
    assert {"train/loss", "train/lr", "train/tokens_per_s", "validation/accuracy", "validation/loss"} <= set(expected)

    events = EventAccumulator(str(out / rundir.TRACKING / "run")).Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert set(logged) == set(expected)
    for tag, by_step in expected.items():
        assert set(logged[tag]) == set(by_step), tag
        for step, value in by_step.items():  # event files store float32
            assert np.float32(logged[tag][step]) == np.float32(value), (tag, step)


def _scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / rundir.TRACKING / out.name)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_resumed_run_logs_each_step_once(tiny_bert, cls_data, tmp_path):
    """Resumed from step 2 after logging to step 4: TensorBoard drops the events past 2, as metrics.jsonl drops its
    lines, so each step has one value, metrics.jsonl's."""
    import shutil

    out = tmp_path / "run"
    recipe = validate_recipe(
        recipe_doc(
            "cls", tiny_bert, cls_data, out, max_steps=4, save_every=2, keep_checkpoints=2, report_to=["tensorboard"]
        )
    )
    train(recipe)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed before the last checkpoint
    train(recipe, resume=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in lines if "validation" not in e}
    logged = _scalars(out)["train/loss"]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert all(np.float32(value) == np.float32(losses[step]) for step, value in logged)


def test_unknown_tracker_gets_did_you_mean(tiny_bert, cls_data, tmp_path):
    with pytest.raises(RecipeError) as caught:
        validate_recipe(recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", report_to=["tensorbord"]))
    assert "train.report_to: unknown tracker 'tensorbord' (did you mean 'tensorboard'?)" in str(caught.value)


def test_one_name_is_a_list(tiny_bert, cls_data, tmp_path):
    recipe = validate_recipe(recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", report_to="tensorboard"))
    assert recipe.train.report_to == ["tensorboard"]
    assert validate_recipe(recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run")).train.report_to == []


def test_missing_tracker_package_is_one_line_and_nothing_written(tiny_bert, cls_data, tmp_path):
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = next((name for name in trackers.TRACKERS if name not in available), None)
    if missing is None:
        pytest.skip("every tracker's package is installed here")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_doc("cls", tiny_bert, cls_data, out, report_to=[missing]))
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    package = trackers.TRACKERS[missing]
    assert f"train.report_to: {missing} needs the {package} package" in lines[0]
    assert f"pip install {package}" in lines[0]
    assert not out.exists()
