"""Run directories under attack (issue 22), as `ftune compare` reads them: a comparison's run folder tampered with
(metrics.json, metrics.jsonl or compare.json made a FIFO, a link to /dev/zero or out of the run, or not ftune's)
ends in one error line naming the file, exit 1, no traceback; compare never hangs on it nor reads past it, and the
run and what lies outside it stay unchanged. Untouched, the finished run is reused (exit 0).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune.cli import app
from refusals import invoke, snapshot
from run_dir_helpers import _fifo, _link

runner = CliRunner()


@pytest.fixture(scope="module")
def comparison(tiny_bert, cls_data, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, --out folder) of a finished one-method comparison."""
    root = tmp_path_factory.mktemp("safety-compare")
    recipe = write_recipe(root / "recipe.yaml", recipe_doc("cls", tiny_bert, cls_data, root / "unused", max_steps=2))
    result = runner.invoke(
        app, ["compare", str(recipe), "--methods", "lora", "--budget", "2steps", "--out", str(root / "cmp")]
    )
    assert result.exit_code == 0, result.output
    return recipe, root / "cmp"


COMPARE_TAMPERS: dict[str, tuple[Callable[[Path, Path], object] | None, int, list[str]]] = {
    "untouched": (None, 0, []),
    "metrics-fifo": (lambda run, out: _fifo(run / "metrics.json"), 1, ["metrics.json", "not a regular file"]),
    "metrics-dev-zero": (lambda run, out: _link(run / "metrics.json", "/dev/zero"), 1, ["metrics.json", "/dev/zero"]),
    "metrics-link-out": (
        lambda run, out: _link(run / "metrics.json", out / "metrics.json"),
        1,
        ["metrics.json", "links out"],
    ),
    "metrics-not-ftune": (
        lambda run, out: (run / "metrics.json").write_text('{"step": 1}'),
        1,
        ["metrics.json", "not what ftune writes"],
    ),
    "log-fifo": (lambda run, out: _fifo(run / "metrics.jsonl"), 1, ["metrics.jsonl", "a named pipe"]),
    "log-dev-zero": (lambda run, out: _link(run / "metrics.jsonl", "/dev/zero"), 1, ["metrics.jsonl", "links out"]),
    "measurements-link-out": (
        lambda run, out: _link(run / "compare.json", out / "compare.json"),
        1,
        ["compare.json", "links out"],
    ),
}


@pytest.mark.parametrize("tamper", list(COMPARE_TAMPERS))
def test_compare_reads_its_runs_as_data(tamper, comparison, tmp_path):
    """A comparison's run folder tampered with: compare never hangs on it nor reads past it; it ends with an error
    line naming the file (exit 1, no traceback), the run and what lies outside it unchanged. Untouched, the finished
    run is reused (exit 0)."""
    recipe, finished = comparison
    out = tmp_path / "cmp"
    shutil.copytree(finished, out, symlinks=True)
    run = out / "lora"
    stored = run / "recipe.yaml"
    stored.write_text(stored.read_text().replace(str(finished), str(out)))  # the copy's own output_dir
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("metrics.json", "compare.json"):
        shutil.copy(run / name, outside / name)
    make, code, needles = COMPARE_TAMPERS[tamper]
    if make:
        make(run, outside)
    before = snapshot(run, outside)

    result = invoke(["compare", recipe, "--methods", "lora", "--budget", "2steps", "--out", out])

    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == (1 if code else 0), result.stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert snapshot(run, outside) == before
