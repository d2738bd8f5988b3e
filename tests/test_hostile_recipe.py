"""Hostile recipes through the CLI (issue 22): alias chains, duplicate keys, deep nesting, huge values and files are
each refused in one line naming the file and line (or explained in a short line); and `~` in a path is the home
directory wherever a recipe or a command names one.

Catalogue cases (HOSTILE) run through the CLI with the checks of tests/test_bad_inputs.py: exit code, one stderr line
holding the needles, no traceback, nothing on disk changed. HOME is a folder of the test's own throughout. The reader
itself, and what hostile input costs it in time and memory: tests/test_hostile_recipe_reader.py.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import recipe_doc, write_recipe
from ftune.cli import app
from ftune.errors import RecipeError
from ftune.recipe import validate_recipe
from hostile_recipe_helpers import _deep_block, _flow_mapping, _laughs, _laughs_flow, _laughs_mappings
from refusals import runner
from refusals import snapshot as _snapshot

# --- the catalogue: through the CLI ---------------------------------------------------------------------------------


@dataclass
class Env:
    tmp: Path
    home: Path  # $HOME during the case
    valid: str  # a complete recipe (tiny BERT, classification data) as YAML text: it would train

    def recipe(self, text: str, name: str = "recipe.yaml") -> Path:
        (path := self.tmp / name).write_text(text)
        return path

    def train(self, text: str, *extra: str) -> list:
        return ["train", self.recipe(text), *extra]

    def needles(self, needles: list[str]) -> list[str]:
        """`needles` with {home} and the valid recipe's 1-based lines filled in: {train} (the section), {lr},
        {lr_next} (the line after it), {next} (the first line after the recipe)."""
        line = {
            k: next(i for i, s in enumerate(self.valid.splitlines(), 1) if s.startswith(start))
            for k, start in (("train", "train:"), ("lr", "  lr:"))
        }
        return [
            n.format(home=self.home, lr_next=line["lr"] + 1, next=len(self.valid.splitlines()) + 1, **line)
            for n in needles
        ]


def _set(env: Env, key: str, value: str) -> list:
    return ["validate", env.recipe(env.valid), "--set", f"{key}={value}"]


def _in_home(env: Env, name: str, text: str = "mine\n") -> Path:
    path = env.home / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _dir_in_home(env: Env, name: str) -> str:
    (env.home / name).mkdir(parents=True)
    _in_home(env, f"{name}/keep.txt")
    return f"~/{name}"


# id: (arguments built from Env, exit code, substrings the one stderr line must hold)
HOSTILE: dict[str, tuple[Callable[[Env], list], int, list[str]]] = {
    # aliases
    "alias-billion-laughs": (lambda e: e.train(e.valid + _laughs()), 2, ["recipe.yaml line", "more than 20,000"]),
    "alias-laughs-mappings": (lambda e: e.train(e.valid + _laughs_mappings()), 2, ["recipe.yaml", "20,000 values"]),
    "alias-laughs-by-set": (lambda e: _set(e, "train.lr", _laughs_flow()), 2, ["--set train.lr", "20,000 values"]),
    "alias-in-own-anchor": (lambda e: e.train(e.valid + "extra: &x {a: *x}\n"), 2, ["recipe.yaml line", "*x"]),
    "alias-merge-key": (
        lambda e: e.train(e.valid + "base: &b {seed: 1}\nmore:\n  <<: *b\n"),
        2,
        ["recipe.yaml line", "merge keys (<<)"],
    ),
    "alias-undefined": (
        lambda e: e.train(e.valid.replace("lr: 0.01", "lr: *rate")),
        2,
        ["recipe.yaml line", "undefined alias"],
    ),
    # duplicate keys
    "duplicate-train-section": (
        lambda e: e.train(e.valid + "train:\n  lr: 0.5\n"),
        2,
        ["line {next}:", "'train'", "first at line {train})"],
    ),
    "duplicate-lr": (
        lambda e: e.train(e.valid.replace("  lr: 0.01\n", "  lr: 0.01\n  lr: 0.5\n")),
        2,
        ["line {lr_next}:", "duplicate key 'lr'", "first at line {lr})"],
    ),
    "duplicate-model-name": (
        lambda e: e.train(e.valid.replace("model:\n", "model:\n  name: other\n")),
        2,
        ["recipe.yaml line", "duplicate key 'name'"],
    ),
    "duplicate-by-set": (lambda e: _set(e, "method", "{name: lora, r: 4, r: 8}"), 2, ["--set method", "'r'"]),
    # nesting
    "nesting-flow": (
        lambda e: e.train(e.valid.replace("lr: 0.01", "lr: " + "[" * 5000 + "]" * 5000)),
        2,
        ["recipe.yaml line {lr}:"],
    ),
    "nesting-block": (
        lambda e: e.train(e.valid + "x:\n" + textwrap.indent(_deep_block(80), "  ")),
        2,
        ["recipe.yaml line", "deeper than 64"],
    ),
    "nesting-through-aliases": (
        lambda e: e.train(e.valid + "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n"),
        2,
        ["recipe.yaml line", "deeper than 64"],
    ),
    "nesting-by-set": (lambda e: _set(e, "train.lr", "[" * 100 + "]" * 100), 2, ["--set train.lr", "deeper than 64"]),
    # size
    "size-over-the-limit": (
        lambda e: e.train(e.valid + "#" * (1 << 20) + "\n"),
        2,
        ["recipe.yaml", "larger than 1 MiB"],
    ),
    "size-huge-flow-mapping": (
        lambda e: e.train(e.valid + "extra: " + _flow_mapping(60_000) + "\n"),
        2,
        ["recipe.yaml line", "more than 20,000 values"],
    ),
    "size-10k-list-wrong-type": (
        lambda e: e.train(e.valid.replace("lr: 0.01", f"lr: {list(range(10_000))}")),
        2,
        ["train.lr", "[0, 1, 2, 3, 4, 5, ...]"],
    ),
    "size-long-string-wrong-type": (
        lambda e: e.train(e.valid.replace("lr: 0.01", "lr: " + "x" * 500_000)),
        2,
        ["train.lr", "xxx...xxx"],
    ),
    "size-long-output-dir": (lambda e: _set(e, "output_dir", "runs/" + "a/" * 5000), 2, ["output_dir", "10,005"]),
    # ~ paths
    "tilde-output-dir-is-home": (lambda e: _set(e, "output_dir", "'~'"), 2, ["output_dir", "your home directory"]),
    "tilde-output-dir-is-home-slash": (lambda e: _set(e, "output_dir", "~/."), 2, ["your home directory"]),
    "tilde-recipe-missing": (lambda e: ["train", "~/nope.yaml"], 2, ["{home}/nope.yaml", "no such recipe"]),
    "tilde-output-dir-not-a-run": (
        lambda e: e.train(e.valid.replace(str(e.tmp / "out"), _dir_in_home(e, "taken"))),
        1,
        ["output_dir", "{home}/taken", "not an ftune run"],
    ),
    "tilde-data-missing": (lambda e: e.train(e.valid.replace(f"{e.tmp}/cls", "~/absent")), 1, ["data.train", "absent"]),
    "tilde-eval-data-missing": (
        lambda e: ["eval", "~/run", "--data", "~/absent.jsonl"],
        1,
        ["--data", "{home}/absent.jsonl"],
    ),
    "tilde-predict-input-missing": (
        lambda e: ["predict", "~/run", "--input", "~/rows.jsonl"],
        1,
        ["--input", "{home}/rows.jsonl"],
    ),
    "tilde-merge-into-non-empty": (
        lambda e: ["merge", "~/run", _dir_in_home(e, "merged")],
        1,
        ["{home}/merged", "not empty"],
    ),
    "tilde-export-onto-a-file": (
        lambda e: ["export", "~/run", "~/" + _in_home(e, "out.txt").name],
        1,
        ["{home}/out.txt", "not a directory"],
    ),
}


def test_the_hostile_catalogue_is_large():
    assert len(HOSTILE) >= 25


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input(case, tiny_bert, cls_data, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # a path written relative (a folder named `~`) lands under the snapshot
    data = shutil.copytree(cls_data, tmp_path / "cls")
    valid = yaml.safe_dump(recipe_doc("cls", tiny_bert, data, tmp_path / "out"), sort_keys=False)
    build, code, needles = HOSTILE[case]
    env = Env(tmp_path, home, valid)
    args = [str(a) for a in build(env)]
    before = _snapshot(tmp_path, tiny_bert)

    result = runner.invoke(app, args)

    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert result.exit_code == code, result.output[:2000]
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[:2000]
    assert len(lines[0]) < 400, lines[0][:500]
    for needle in env.needles(needles):
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _snapshot(tmp_path, tiny_bert) == before  # nothing written, nothing overwritten


# --- `~` is the home directory --------------------------------------------------------------------------------------


def test_output_dir_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    doc = {
        "model": {"name": "m"},
        "task": "sequence_classification",
        "data": {"train": "t.tsv"},
        "method": {"name": "lora"},
    }
    assert validate_recipe(doc | {"output_dir": "~/runs/x"}).output_dir == str(tmp_path / "runs" / "x")
    assert validate_recipe(doc | {"output_dir": "runs//x/"}).output_dir == "runs//x/"  # otherwise as written
    with pytest.raises(RecipeError, match=r"^recipe: output_dir: is not a usable path \(RuntimeError\)$"):
        validate_recipe(doc | {"output_dir": "~no-such-user-here/x"})


def test_tilde_is_home_everywhere(tiny_bert, cls_data, tmp_path, monkeypatch):
    """`~/...` in a recipe (model, data, output_dir, a teacher) and in the commands' paths is $HOME/...: every file
    lands under HOME, none in a folder named `~`."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_bert, home / "models" / "bert")
    shutil.copytree(cls_data, home / "data")
    doc = recipe_doc("cls", Path("~/models/bert"), Path("~/data"), Path("~/runs/teacher"), max_steps=1)
    write_recipe(home / "teacher.yaml", doc)
    write_recipe(
        home / "student.yaml",
        doc | {"objective": {"name": "distill", "teacher": "~/runs/teacher"}, "output_dir": "~/runs/student"},
    )
    (home / "rows.jsonl").write_text('{"sentence": "a good movie"}\n')
    for args in (
        ["train", "~/teacher.yaml"],
        ["train", "~/student.yaml"],
        ["eval", "~/runs/teacher", "--data", "~/data/validation.tsv"],
        ["predict", "~/runs/teacher", "--input", "~/rows.jsonl", "--output", "~/predictions.jsonl"],
        ["merge", "~/runs/teacher", "~/merged"],
        ["export", "~/runs/teacher", "~/peft", "--format", "peft"],
        ["plot", "~/runs/teacher", "--out", "~/loss.png"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output[-3000:])
    for written in (
        "runs/teacher/recipe.yaml",
        "runs/student/recipe.yaml",
        "predictions.jsonl",
        "merged/config.json",
        "peft/adapter_config.json",
        "loss.png",
    ):
        assert (home / written).is_file(), written
    assert not [p for p in tmp_path.rglob("~*")], "a folder named ~"
    stored = yaml.safe_load((home / "runs" / "teacher" / "recipe.yaml").read_text())
    assert stored["output_dir"] == str(home / "runs" / "teacher")
