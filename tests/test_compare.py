"""`ftune compare` on the tiny BERT and data from conftest: two methods (lora, bitfit) on a 6-step budget.

The table (comparison.md, comparison.json) must agree with each run's own files; the Pareto plot must be a PNG of the
size it was drawn at; an interrupted comparison (one method finished, one stopped after a checkpoint) must reuse the
first and resume the second without training either again; bad input is one line, before anything is written.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune.cli import app
from ftune.compare import plan as planning
from ftune.compare.run import compare
from ftune.errors import RecipeError, RunDirError
from ftune.methods import METHODS
from ftune.recipe import load_recipe

BUDGET = "6steps"  # evaluations (and checkpoints) every ceil(6 / 4) = 2 steps


@pytest.fixture(scope="module")
def recipe(tiny_bert, cls_data, tmp_path_factory) -> Path:
    doc = recipe_doc(
        "cls", tiny_bert, cls_data, tmp_path_factory.mktemp("unused") / "run", best_metric="accuracy", log_every=1
    )
    return write_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml", doc)


@pytest.fixture(scope="module")
def compared(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    return compare(recipe, "lora,bitfit", False, BUDGET, out, [], memory_limit="64GB"), out


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_table_agrees_with_each_run(compared):
    result, out = compared
    assert not result.failed and [r["method"] for r in result.rows] == ["lora", "bitfit"]
    written = json.loads((out / "comparison.json").read_text())
    assert written["rows"] == result.rows and written["budget"] == "6 steps" and written["metric"] == "accuracy"
    for row in written["rows"]:
        run = out / row["method"]
        final = json.loads((run / "metrics.json").read_text())
        scores = [e["validation"]["accuracy"] for e in _log(run) if "validation" in e]
        assert len(scores) == 3  # steps 2 and 4, and the final evaluation
        assert row["steps"] == final["step"] == 6
        assert row["lr"] == METHODS[row["method"]].about.recommended.lr
        assert row["trainable_params"] == final["trainable_params"]
        assert row["trainable_pct"] == pytest.approx(100 * final["trainable_params"] / final["total_params"])
        assert row["saved_bytes"] == (run / "method.safetensors").stat().st_size
        assert row["final_accuracy"] == final["validation"]["accuracy"] and row["best_accuracy"] == max(scores)
        measured = json.loads((run / "compare.json").read_text())
        assert row["peak_memory_bytes"] == measured["peak_memory_bytes"] > 0
        assert row["forward_relative"] == pytest.approx(
            measured["forward"]["method_ms"] / measured["forward"]["base_ms"]
        )
        assert row["forward_merged"] is True  # both methods fold into the base weights
        assert row["tokens_per_s"] > 0 and row["wall_seconds"] > 0
    markdown = (out / "comparison.md").read_text()
    for column in (
        "method",
        "trainable params",
        "% of model",
        "saved",
        "peak memory",
        "train tokens/s",
        "wall s",
        "best accuracy",
        "final accuracy",
        "forward vs base",
    ):
        assert f"| {column} |" in markdown or f"| {column}" in markdown
    for row in result.rows:
        assert f"| {row['method']} | {row['lr']:g} | {row['trainable_params']:,} |" in markdown
    assert any("from this comparison only" in line for line in result.recommendation)
    assert "within 59.60 GiB peak memory" in "\n".join(result.recommendation)  # 64 GB


def test_recipes_written_for_each_method(compared):
    _, out = compared
    for method in ("lora", "bitfit"):
        ran = load_recipe(out / "recipes" / f"{method}.yaml")
        assert (ran.method.name, ran.train.lr, ran.train.max_steps) == (method, METHODS[method].about.recommended.lr, 6)
        assert (ran.train.eval_every, ran.train.save_every) == (2, 2)


def test_pareto_plot_is_a_png(compared):
    result, out = compared
    data = (out / "pareto.png").read_bytes()
    assert out / "pareto.png" in result.files
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 500)  # figsize 12 x 5 inches at 100 dpi


def test_frontier_by_hand():
    from ftune.compare.pareto import frontier

    points = [(10, 0.8), (100, 0.9), (50, 0.7), (100, 0.85), (5, 0.8)]
    assert frontier(points, larger_is_better=True) == [4, 1]  # (10, 0.8) ties (5, 0.8) at a higher cost
    assert frontier([(1, 0.5), (2, 0.4)], larger_is_better=False) == [0, 1]  # a loss: lower is better


def test_interrupted_comparison_reuses_and_resumes(recipe, tmp_path, capsys, monkeypatch):
    """lora finished (in this process, so compare only times its forward); bitfit stopped right after its step-4
    checkpoint. compare must train neither from the start: lora's files stay, bitfit resumes from step 4."""
    from ftune.run import train as train_module

    out = tmp_path / "out"
    recipes, _ = planning.plan(load_recipe(recipe), "lora,bitfit", False, planning.parse_budget(BUDGET), out)
    train_module.train(recipes["lora"])
    save = train_module._save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(run):
        save(run)
        if run.pos.step == 4:
            raise Killed

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_module.train(recipes["bitfit"])
    monkeypatch.undo()
    lora_files = {p.name: p.stat().st_mtime_ns for p in (out / "lora").iterdir() if p.is_file()}
    capsys.readouterr()

    result = compare(recipe, "lora,bitfit", False, BUDGET, out, [])
    err = capsys.readouterr().err
    assert not result.failed
    lr = {name: METHODS[name].about.recommended.lr for name in ("lora", "bitfit")}
    assert f"lora (lr {lr['lora']:g}, 6 steps): timing a forward" in err
    assert f"bitfit (lr {lr['bitfit']:g}, 6 steps): resuming from its last checkpoint" in err
    assert "resuming from" in err and "(step 4)" in err and err.count("parameters train") == 1  # bitfit only
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "lora").iterdir() if p.is_file() and p.name != "compare.json"
    } == {k: v for k, v in lora_files.items() if k != "compare.json"}
    resumes = json.loads((out / "bitfit" / "run.json").read_text())["resumes"]
    assert [r["from"] for r in resumes] == ["checkpoints/step-00000004"]
    assert [e["step"] for e in _log(out / "bitfit") if "loss" in e] == [1, 2, 3, 4, 5, 6]

    again = compare(recipe, "lora,bitfit", False, BUDGET, out, [])
    err = capsys.readouterr().err
    assert err.count("finished before: reused") == 2 and "parameters train" not in err
    assert again.rows == result.rows


@pytest.mark.parametrize(
    ("methods", "every", "budget", "message"),
    [
        ("lorra", False, BUDGET, "--methods: unknown method 'lorra'; did you mean 'lora'?"),
        ("lora,lora", False, BUDGET, "--methods: lora is listed twice"),
        ("l2sp", False, BUDGET, "--methods: l2sp trains nothing itself"),
        ("adapter_fusion", False, BUDGET, "--methods: adapter_fusion needs method.adapters from you"),
        (None, False, BUDGET, "give --methods (e.g. --methods lora,adapter) or --all"),
        ("lora", True, BUDGET, "give --methods (e.g. --methods lora,adapter) or --all, not both"),
        ("lora", False, "0steps", "--budget '0steps': must be above zero"),
        ("lora", False, "fast", "--budget 'fast': expected a number and a unit"),
        ("lora", False, "200 parsecs", "--budget '200 parsecs': expected a number and a unit"),
        ("lora", False, "1.5steps", "--budget '1.5steps': optimizer steps are a whole number"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(recipe, tmp_path, methods, every, budget, message):
    with pytest.raises(RecipeError) as caught:
        compare(recipe, methods, every, budget, tmp_path / "out", [])
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_method_refused_for_the_recipe(recipe, tmp_path):
    """A recipe that recomputes activations refuses prefix methods: named, one line; with --all, left out."""
    with pytest.raises(
        RecipeError,
        match=r"^--methods: prefix_tuning does not apply to this recipe: .*"
        r"train\.gradient_checkpointing",
    ):
        compare(recipe, "lora,prefix_tuning", False, BUDGET, tmp_path / "out", ["train.gradient_checkpointing=true"])
    assert not (tmp_path / "out").exists()
    base = load_recipe(recipe, ["train.gradient_checkpointing=true"])
    recipes, left_out = planning.plan(base, None, True, planning.parse_budget(BUDGET), tmp_path / "out")
    assert {"prefix_tuning", "p_tuning_v2", "mam_adapter", "unipelt"} <= left_out.keys()
    assert "train.gradient_checkpointing" in left_out["prefix_tuning"]
    assert {"l2sp", "adapter_fusion", "compose"} <= left_out.keys() and "lora" in recipes
    assert not (tmp_path / "out").exists()


def test_other_budget_in_the_same_folder_is_refused(compared, recipe):
    _, out = compared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match=r"lora: holds a run of another recipe or budget"):
        compare(recipe, "lora,bitfit", False, "8steps", out, [])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_memory_limit_must_be_a_size(recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"--memory-limit '2 parsecs': expected a size above zero with a unit"):
        compare(recipe, "lora", False, BUDGET, tmp_path / "out", [], memory_limit="2 parsecs")


def test_cli_bad_method_is_one_line(recipe, tmp_path):
    result = CliRunner().invoke(app, ["compare", str(recipe), "--methods", "lorra", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    expected = f"error: --methods: unknown method 'lorra'; did you mean 'lora'? known: {', '.join(METHODS)}"
    assert result.output.strip().splitlines() == [expected]
    assert not (tmp_path / "o").exists()


def test_budgets_parse_to_train_fields():
    assert planning.parse_budget("200steps").train_fields(4) == {"max_steps": 200, "eval_every": 50}
    assert planning.parse_budget("1 epoch").train_fields(4) == {"epochs": 1.0, "max_steps": None}
    assert planning.parse_budget("600s").train_fields(4) == {"max_seconds": 600.0}
    assert str(planning.parse_budget("0.5epochs")) == "0.5 epochs"


def test_time_budget_stops_training_and_evaluates(tiny_bert, cls_data, tmp_path):
    """train.max_seconds: the run stops after the step that reaches it, then evaluates and saves as at the end."""
    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", max_steps=1000, max_seconds=1e-6, eval_every=500)
    result = train(validate_recipe(doc))
    assert result["step"] == 1 and "accuracy" in result["validation"]
    log = _log(tmp_path / "run")
    assert [e["step"] for e in log] == [1, 1] and "loss" in log[0] and "validation" in log[1]
    assert (tmp_path / "run" / "method.safetensors").is_file()


def test_all_leaves_out_a_method_the_model_refuses(recipe, tmp_path, monkeypatch):
    """With --all, a worker that exits with REFUSED (a MethodError before anything was written, e.g. BitFit on a model
    without biases) leaves its method out with the reason; with --methods it is a failure."""
    from ftune.compare import run as running
    from ftune.compare.worker import REFUSED

    monkeypatch.setattr(running, "launch", lambda recipe_file, flags: (REFUSED, "bitfit: the model has no biases"))
    every = compare(recipe, None, True, BUDGET, tmp_path / "all", [])
    assert every.rows == [] and not every.failed
    assert every.left_out["bitfit"] == "does not apply to this model: bitfit: the model has no biases"
    named = compare(recipe, "bitfit", False, BUDGET, tmp_path / "named", [])
    assert named.failed == {"bitfit": "bitfit: the model has no biases"} and "bitfit" not in named.left_out
    assert "- failed: bitfit: bitfit: the model has no biases" in (tmp_path / "named" / "comparison.md").read_text()
