"""loss.png: drawn in every run dir at each evaluation and at the end, a valid PNG of the figure's size; a plotting
failure is one warning line, never the end of a run; `ftune plot` overlays runs and refuses bad input in one line."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import recipe_doc
from ftune.cli import app
from ftune.recipe import validate_recipe
from ftune.run import plots
from ftune.run.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_SIZE = (round(plots.SIZE_INCHES[0] * plots.DPI), round(plots.SIZE_INCHES[1] * plots.DPI))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the PNG header: the signature, then the IHDR chunk (length 13) with two big-endian ints."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    return struct.unpack(">II", data[16:24])


def _train(model, data, out, **options):
    console = io.StringIO()
    doc = recipe_doc("cls", model, data, out, eval_every=2, **options)
    train(validate_recipe(doc), console=Console(file=console, width=200))
    return out, console.getvalue()


@pytest.fixture(scope="module")
def two_runs(tiny_bert, cls_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("plot-runs")
    return [_train(tiny_bert, cls_data, root / "a")[0], _train(tiny_bert, cls_data, root / "b", lr=3e-2, seed=1)[0]]


def _validation_steps(run: Path) -> list[int]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["step"] for e in lines if "validation" in e]


def test_loss_png_is_redrawn_at_each_evaluation(tiny_bert, cls_data, tmp_path, monkeypatch):
    drawn = []  # at each redraw: the evaluations logged so far, and the PNG then on disk

    def recording(run_dir):
        failure = real(run_dir)
        drawn.append((_validation_steps(run_dir), (run_dir / plots.PLOT).read_bytes()))
        return failure

    real = plots.refresh
    monkeypatch.setattr(plots, "refresh", recording)
    run, _ = _train(tiny_bert, cls_data, tmp_path / "run", max_steps=4)  # evaluations at step 2 and at the end (4)
    assert [steps for steps, _ in drawn] == [[2], [2, 4]]
    assert drawn[0][1] != drawn[1][1]  # redrawn with the new evaluation, not left as it was
    assert drawn[1][1] == (run / plots.PLOT).read_bytes()
    assert png_size(drawn[1][1]) == EXPECTED_SIZE


def test_loss_png_of_a_finished_run_has_the_figure_size_and_ink(two_runs):
    from matplotlib.image import imread

    data = (two_runs[0] / plots.PLOT).read_bytes()
    assert png_size(data) == EXPECTED_SIZE
    pixels = imread(io.BytesIO(data))
    assert pixels.shape[:2] == EXPECTED_SIZE[::-1]
    assert (pixels[..., :3] < 0.5).any()  # axes, text and curves drawn, not a blank canvas


def test_a_plotting_failure_is_one_warning_line_and_training_goes_on(tiny_bert, cls_data, tmp_path, monkeypatch):
    def broken(runs, metric):
        raise RuntimeError("no font")

    monkeypatch.setattr(plots, "draw", broken)
    run, printed = _train(tiny_bert, cls_data, tmp_path / "run", max_steps=4)
    warnings = [line for line in printed.splitlines() if "loss.png" in line]
    assert warnings == ["warning: loss.png not redrawn (RuntimeError: no font)"] * 2  # step 2 and the end
    assert (run / "metrics.json").is_file() and not (run / plots.PLOT).exists()


def test_plot_command_overlays_two_runs(two_runs, tmp_path):
    out = tmp_path / "both.png"
    result = CliRunner().invoke(app, ["plot", *map(str, two_runs), "--out", str(out), "--metric", "loss"])
    assert result.exit_code == 0, result.output
    assert png_size(out.read_bytes()) == EXPECTED_SIZE
    curves = [plots.read_curves(r) for r in two_runs]
    assert [s for s, _ in curves[0].validation] == [2, 4] and curves[0].train != curves[1].train


def test_plot_command_of_one_run_redraws_its_own_png(two_runs):
    own = two_runs[1] / plots.PLOT
    own.write_bytes(b"stale")
    result = CliRunner().invoke(app, ["plot", str(two_runs[1])])
    assert result.exit_code == 0, result.output
    assert png_size(own.read_bytes()) == EXPECTED_SIZE


@pytest.mark.parametrize(
    "case, message, code",
    [
        ("not_a_run", "not an ftune run dir (no run.json)", 1),
        ("several_without_out", "--out: name the PNG file to write when plotting several runs", 2),
        ("out_exists", "exists; choose a new file", 1),
        (
            "unknown_metric",
            "--metric: 'bleu' is not a validation metric of these runs; use one of loss, accuracy, macro_f1, mcc, "
            + "examples",
            2,
        ),
    ],
)
def test_plot_command_bad_input_is_one_line(case, message, code, two_runs, tmp_path):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"keep me")
    args = {
        "not_a_run": [str(tmp_path), "--out", str(tmp_path / "x.png")],
        "several_without_out": [*map(str, two_runs)],
        "out_exists": [*map(str, two_runs), "--out", str(taken)],
        "unknown_metric": [*map(str, two_runs), "--out", str(tmp_path / "x.png"), "--metric", "bleu"],
    }[case]
    before = {p: p.read_bytes() for p in [taken, *(r / plots.PLOT for r in two_runs)]}
    result = CliRunner().invoke(app, ["plot", *args])
    assert result.exit_code == code
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "x.png").exists()
    assert {p: p.read_bytes() for p in before} == before
