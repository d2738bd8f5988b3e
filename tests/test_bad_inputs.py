"""Every bad input ends in one line on stderr that names the field, file or row, a clean exit code (2: recipe or
usage, 1: runtime), no traceback, and nothing on disk overwritten."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import recipe_doc, write_recipe
from typer.testing import CliRunner

from ftune.cli import app

runner = CliRunner()


@dataclass
class Env:
    """What a case builds its bad input from; `tmp` is the case's own folder."""

    bert: Path
    cls: Path
    run: Path  # a finished `full` run (tiny BERT), shared: cases must never change it
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
def full_run(tiny_bert, cls_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs-run")
    doc = recipe_doc("cls", tiny_bert, cls_data, root / "run", method={"name": "full"}, max_steps=2)
    result = runner.invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return root / "run"


def _copy_run(env: Env, *, keep_checkpoints: bool = True) -> Path:
    """A private copy of the shared run whose recipe.yaml points at the copy (so --resume accepts the recipe)."""
    copy = shutil.copytree(env.run, env.tmp / "copy")
    if not keep_checkpoints:
        shutil.rmtree(copy / "checkpoints")
    doc = yaml.safe_load((copy / "recipe.yaml").read_text()) | {"output_dir": str(copy)}
    write_recipe(copy / "recipe.yaml", doc)
    return copy


def _tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


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


def _not_a_run(env: Env) -> list:
    (env.tmp / "out").mkdir()
    (env.tmp / "out" / "notes.txt").write_text("mine\n")
    return env.train()


def _resume_without_checkpoint(env: Env) -> list:
    return ["train", _copy_run(env, keep_checkpoints=False) / "recipe.yaml", "--resume"]


def _resume_other_recipe(env: Env) -> list:
    return ["train", _copy_run(env) / "recipe.yaml", "--resume", "--set", "train.lr=0.5"]


def _merge_into_non_empty(env: Env) -> list:
    (env.tmp / "merged").mkdir()
    (env.tmp / "merged" / "keep.txt").write_text("mine\n")
    return ["merge", env.run, env.tmp / "merged"]


def _plain_dir(env: Env) -> list:
    (env.tmp / "plain-dir").mkdir()
    (env.tmp / "plain-dir" / "recipe.yaml").write_text("not: a run\n")
    return ["eval", env.tmp / "plain-dir"]


# id: (arguments built from Env, exit code, substrings the one stderr line must hold)
CASES: dict[str, tuple[Callable[[Env], list], int, list[str]]] = {
    "unknown-key": (lambda e: e.train(train={"lrr": 0.1}), 2, ["train.lrr", "unknown key", "'lr'"]),
    "unknown-key-by-set": (lambda e: e.train(None, "--set", "data.max_lenght=8"), 2, ["data.max_lenght", "'max_length'"]),
    "wrong-type": (lambda e: e.train(train={"batch_size": "abc"}), 2, ["train.batch_size", "'abc'"]),
    "unknown-method": (lambda e: e.train(method={"name": "lorra"}), 2, ["method.name", "'lorra'", "'lora'"]),
    "negative-lr": (lambda e: e.train(train={"lr": -1e-3}), 2, ["train.lr", "-0.001"]),
    "lora-r-zero": (lambda e: e.train(method={"r": 0}), 2, ["method.r"]),
    "batch-size-zero": (lambda e: e.train(train={"batch_size": 0}), 2, ["train.batch_size"]),
    "malformed-yaml": (
        lambda e: ["train", _tsv(e.tmp / "broken.yaml", ["model:", "  name: [unclosed", "task: causal_lm"])],
        2, ["broken.yaml", "line", "YAML"],
    ),
    "recipe-missing": (lambda e: ["train", e.tmp / "nope.yaml"], 2, ["nope.yaml", "no such recipe"]),
    "set-without-equals": (lambda e: e.train(None, "--set", "train.lr"), 2, ["--set", "train.lr", "key=value"]),
    "set-into-a-value": (lambda e: e.train(None, "--set", "train.lr.x=1"), 2, ["train.lr.x", "'lr'"]),
    "model-path-missing": (lambda e: e.train(model={"name": "/no/such/model"}), 1, ["model.name", "/no/such/model"]),
    "model-without-weights": (_weightless_model, 1, ["model.name", "no-weights"]),
    "data-file-missing": (
        lambda e: e.train(data={"train": str(e.tmp / "absent.tsv")}), 1, ["data.train", "absent.tsv"],
    ),
    "label-column-missing": (
        lambda e: e.train(data={"label_column": "labelz"}), 1, ["train.tsv", "'labelz'", "data.label_column"],
    ),
    "label-outside-classes": (_bad_label, 1, ["validation.tsv row 3", "7"]),
    "empty-dataset": (
        lambda e: e.train(data={"train": str(_tsv(e.tmp / "train.tsv", ["sentence\tlabel"]))}),
        1, ["train.tsv", "no rows"],
    ),
    "empty-jsonl": (
        lambda e: e.train(data={"train": str(_tsv(e.tmp / "train.jsonl", [""]))}), 1, ["train.jsonl", "no rows"],
    ),
    "malformed-jsonl": (
        lambda e: e.train(data={"train": str(_tsv(e.tmp / "train.jsonl", ['{"sentence": ']))}),
        1, ["train.jsonl", "cannot be read", "JSON parse error"],
    ),
    "output-dir-holds-a-run": (lambda e: e.train(e.doc() | {"output_dir": str(e.run)}), 1, ["output_dir", "--overwrite"]),
    "output-dir-not-a-run": (_not_a_run, 1, ["output_dir", "not an ftune run"]),
    "resume-without-run": (lambda e: e.train(None, "--resume"), 1, ["--resume", "no run"]),
    "resume-without-checkpoint": (_resume_without_checkpoint, 1, ["--resume", "no complete checkpoint"]),
    "resume-other-recipe": (_resume_other_recipe, 1, ["--resume", "recipe differs"]),
    "export-peft-of-full": (lambda e: ["export", e.run, e.tmp / "peft", "--format", "peft"], 1, ["peft", "full"]),
    "merge-into-non-empty": (_merge_into_non_empty, 1, ["merged", "not empty"]),
    "eval-not-a-run": (_plain_dir, 1, ["plain-dir", "not a finished ftune run"]),
    "eval-data-missing": (
        lambda e: ["eval", e.run, "--data", e.tmp / "absent.jsonl"], 1, ["absent.jsonl", "--data"],
    ),
}


def _snapshot(*roots: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for root in roots for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_bert, cls_data, full_run, tmp_path):
    build, code, needles = CASES[case]
    env = Env(tiny_bert, cls_data, full_run, tmp_path)
    args = [str(a) for a in build(env)]
    before = _snapshot(tmp_path, full_run, cls_data)

    result = runner.invoke(app, args)

    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _snapshot(tmp_path, full_run, cls_data) == before  # nothing written, nothing overwritten


def test_overwrite_replaces_a_run(full_run, tiny_bert, cls_data, tmp_path):
    """The refusal above is lifted by --overwrite: the old run is replaced by the new one."""
    env = Env(tiny_bert, cls_data, full_run, tmp_path)
    copy = _copy_run(env)
    (copy / "metrics.jsonl").write_text("")  # an old run's file, to see it replaced
    recipe = env.recipe(env.doc(max_steps=1) | {"output_dir": str(copy)})
    result = runner.invoke(app, ["train", str(recipe), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((copy / "recipe.yaml").read_text())["train"]["max_steps"] == 1
    assert (copy / "metrics.jsonl").read_text().strip()
    assert [p.name for p in (copy / "checkpoints").iterdir()] == ["step-00000001"]
