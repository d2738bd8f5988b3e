"""What the bad-input catalogues share (tests/test_bad_inputs_*.py): the case environment Env (a case's recipe, built
from the tiny BERT and classification data, trained into the case's own folder), the shared finished `adapter` run,
the small writers of bad files, and the cases that are bad inputs only without CUDA.

A test module binds the fixture as a module attribute (`adapter_run = bad_input_helpers.adapter_run`): pytest finds
fixtures in the module, and an import would read as unused to the linter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune.cli import app
from refusals import check_refusal

runner = CliRunner()


@dataclass
class Env:
    """What a case builds its bad input from; `tmp` is the case's own folder."""

    bert: Path
    cls: Path
    run: Path  # a finished `full` run (tiny BERT), shared: cases must never change it
    adapter: Path  # a finished `adapter` run (tiny BERT), shared as well
    tmp: Path

    def doc(self, **train) -> dict:
        return recipe_doc("cls", self.bert, self.cls, self.tmp / "out", **train)

    def recipe(self, doc: dict | None = None, **section_updates: dict) -> Path:
        doc = doc or self.doc()
        for section, values in section_updates.items():
            doc[section] = doc[section] | values if isinstance(doc[section], dict) else values
        return write_recipe(self.tmp / "recipe.yaml", doc)

    def train(self, doc: dict | None = None, *extra: str, **section_updates: dict) -> list:
        return ["train", self.recipe(doc, **section_updates), *extra]


@pytest.fixture(scope="module")
def adapter_run(tiny_bert, cls_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs-adapter-run")
    method = {"name": "adapter", "bottleneck": 4}
    doc = recipe_doc("cls", tiny_bert, cls_data, root / "run", method=method, max_steps=1)
    result = runner.invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return root / "run"


def _tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _garbage(env: Env, name: str, size: int = 512) -> str:
    path = env.tmp / name
    path.write_bytes(bytes(range(256)) * (size // 256))
    return str(path)


CPU_ONLY = {"fp16-on-cpu"}  # cases that are bad inputs only on a machine without CUDA


def refused(name: str, case: tuple, env: Env, monkeypatch) -> None:
    """One case of the bad-input catalogue: (build, exit code, needles) refused in one line, nothing written."""
    if name in CPU_ONLY and torch.cuda.is_available():
        pytest.skip("a bad input only without CUDA")
    monkeypatch.chdir(env.tmp)  # relative paths a case might write land in its own folder, under the snapshot
    build, code, needles = case
    check_refusal(build(env), code, needles, env.tmp, env.run, env.adapter, env.cls)
