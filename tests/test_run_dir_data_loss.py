"""Run directories under attack (issue 22), class data-loss: ftune never deletes a user's files. A user's project
folder as output_dir (their recipe.yaml, data, notes, folders named like ftune's, a run.json of another tool), and a
finished run with the user's own files beside it (or a record that claims them): refused whatever the flags, and
--overwrite deletes nothing it did not write. Also what the refusals leave possible: an old-format run is read and
replaced, and --overwrite removes a link out of the run, never its target.

Each catalogue case ends in one stderr line holding the named needles, its exit code, no traceback, and every file
involved byte-identical afterwards (tests/run_dir_helpers.py, tests/refusals.py); tests/test_run_dir_safety.py holds
the overview and the least number of cases per class.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import run_dir_helpers
from refusals import invoke, snapshot
from run_dir_helpers import Case, Env, _copy, _link, _outside, _record

env, finished_run = run_dir_helpers.env, run_dir_helpers.finished_run  # the fixtures, where pytest finds them


def _user_folder(env: Env, *extra: str) -> Path:
    """A user's project folder: their own recipe.yaml, data and notes (and folders named like ftune's, `extra`)."""
    folder = env.tmp / "project"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(env.recipe(folder).read_text())
    shutil.copy(env.cls / "train.tsv", folder / "train.tsv")
    (folder / "notes.md").write_text("my notes\n")
    for name in extra:
        (folder / name).mkdir()
        (folder / name / "mine.txt").write_text("mine\n")
    return folder


def _project_as_output_dir(env: Env, *flags: str, extra: tuple[str, ...] = ()) -> list:
    folder = _user_folder(env, *extra)
    return ["train", folder / "recipe.yaml", *flags]  # the user's recipe trains into its own folder


def _run_with(env: Env, make: Callable[[Path], object], *flags: str) -> list:
    """The finished run with something of the user's in it, trained over with `flags`."""
    copy = _copy(env)
    make(copy)
    return ["train", copy / "recipe.yaml", *flags]


def _user_file(name: str, text: str = "mine\n") -> Callable[[Path], object]:
    return lambda run: (run / name).write_text(text)


def _user_subfolder(name: str) -> Callable[[Path], object]:
    def make(run: Path) -> None:
        (run / name).mkdir()
        (run / name / "keep.txt").write_text("mine\n")

    return make


def _claimed(run: Path) -> None:
    """A record that lists the user's file among its own (a tampered or foreign run.json): still not ftune's."""
    (run / "notes.txt").write_text("mine\n")
    _record(run, files=[*json.loads((run / "run.json").read_text())["files"], "notes.txt"])


def _old_format(env: Env) -> Path:
    """The run as the release before the typed record wrote it: run.json without schema_version, files, fingerprints,
    and no lock file."""
    copy = _copy(env)
    record = json.loads((copy / "run.json").read_text())
    for key in ("schema_version", "files", "fingerprints"):
        record.pop(key, None)
    (copy / "run.json").write_text(json.dumps(record, indent=2))
    (copy / ".ftune.lock").unlink()
    return copy


def _foreign_record_folder(env: Env, *flags: str) -> list:
    folder = _user_folder(env)
    (folder / "run.json").write_text(json.dumps({"tool": "another trainer", "versions": {"other": "1.0"}}))
    return ["train", folder / "recipe.yaml", *flags]


def _recipe_only(env: Env) -> Path:
    folder = env.tmp / "recipe-only"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("model: {name: mine}\n")
    return folder


def _with_notes(run: Path) -> Path:
    (run / "notes.txt").write_text("mine\n")
    return run


CASES: dict[str, Case] = {
    # a user's project folder (their own recipe.yaml, data, notes) as output_dir: never a run, whatever the flags
    "project-folder": (
        "data-loss",
        lambda e: _project_as_output_dir(e),
        1,
        ["project", "not an ftune run", "run.json", "choose another output_dir"],
    ),
    "project-folder-overwrite": (
        "data-loss",
        lambda e: _project_as_output_dir(e, "--overwrite"),
        1,
        ["project", "not an ftune run", "run.json"],
    ),
    "project-folder-resume": (
        "data-loss",
        lambda e: _project_as_output_dir(e, "--resume"),
        1,
        ["--resume", "project", "no run to resume"],
    ),
    "project-folder-with-ftune-names-overwrite": (
        "data-loss",
        lambda e: _project_as_output_dir(e, "--overwrite", extra=("checkpoints", "tokenizer")),
        1,
        ["project", "not an ftune run", "run.json"],
    ),
    "project-folder-with-foreign-run-json-overwrite": (
        "data-loss",
        lambda e: _foreign_record_folder(e, "--overwrite"),
        1,
        ["run.json", "not an ftune run record", "names no ftune version"],
    ),
    "recipe-yaml-alone-overwrite": (
        "data-loss",
        lambda e: e.train(_recipe_only(e), "--overwrite"),
        1,
        ["recipe-only", "not an ftune run", "recipe.yaml", "no run.json"],
    ),
    # a finished run with the user's own files beside it: --overwrite names the first and deletes nothing
    "run-with-notes-overwrite": (
        "data-loss",
        lambda e: _run_with(e, _user_file("notes.txt"), "--overwrite"),
        1,
        ["notes.txt", "ftune did not write", "move it away"],
    ),
    "run-with-subfolder-overwrite": (
        "data-loss",
        lambda e: _run_with(e, _user_subfolder("data"), "--overwrite"),
        1,
        ["holds data,", "ftune did not write"],
    ),
    "run-with-hidden-file-overwrite": (
        "data-loss",
        lambda e: _run_with(e, _user_file(".env"), "--overwrite"),
        1,
        ["holds .env,", "ftune did not write"],
    ),
    "run-with-file-in-tokenizer-name-overwrite": (
        "data-loss",
        lambda e: _run_with(e, _user_file("tokenizer.model"), "--overwrite"),
        1,
        ["tokenizer.model", "ftune did not write"],
    ),
    "run-record-claims-a-user-file-overwrite": (
        "data-loss",
        lambda e: _run_with(e, _claimed, "--overwrite"),
        1,
        ["notes.txt", "ftune did not write"],
    ),
    "run-with-notes-without-overwrite": (
        "data-loss",
        lambda e: _run_with(e, _user_file("notes.txt")),
        1,
        ["holds another run", "--overwrite"],
    ),
    "old-format-run-without-overwrite": (
        "data-loss",
        lambda e: ["train", _old_format(e) / "recipe.yaml"],
        1,
        ["holds another run", "--overwrite"],
    ),
    "old-format-run-with-notes-overwrite": (
        "data-loss",
        lambda e: ["train", _with_notes(_old_format(e)) / "recipe.yaml", "--overwrite"],
        1,
        ["notes.txt", "ftune did not write"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_dir_refusal(case, env, monkeypatch):
    run_dir_helpers.refused(CASES[case], env, monkeypatch)


# --- what the refusals leave possible ----------------------------------------------------------------------------


def test_an_old_format_run_is_read_and_replaced(env):
    """A run.json as the release before the typed record wrote it (no schema_version, files, fingerprints): still a
    run. It loads, and --overwrite replaces it (the catalogue shows it refused without --overwrite)."""
    old = _old_format(env)
    result = invoke(["eval", old])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["examples"] == 16

    result = invoke(["train", old / "recipe.yaml", "--overwrite", "--set", "train.seed=7"])
    assert result.exit_code == 0, result.output
    record = json.loads((old / "run.json").read_text())
    assert record["schema_version"] >= 1 and record["seed"] == 7 and "run.json" in record["files"]
    assert yaml.safe_load((old / "recipe.yaml").read_text())["train"]["seed"] == 7


def test_overwrite_removes_a_link_out_never_its_target(env):
    """A run whose checkpoints/ (and loss.png) are links to folders and files outside it: --overwrite removes the
    links, and what they point to stays as it was."""
    copy = _copy(env)
    for name in ("checkpoints", "loss.png"):
        _link(copy / name, _outside(env, copy / name))
    outside = snapshot(env.tmp / "outside")
    result = invoke(["train", copy / "recipe.yaml", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert snapshot(env.tmp / "outside") == outside
    assert not (copy / "checkpoints").is_symlink() and (copy / "checkpoints" / "step-00000002").is_dir()
