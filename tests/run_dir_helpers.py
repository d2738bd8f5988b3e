"""What the run-directory safety catalogues share (tests/test_run_dir_*.py): the case environment (Env and its `env`
fixture, which ends the lock holders, unmounts and restores write bits after each case), the shared finished run, and
the building blocks that copy and tamper with that run.

A test module binds the fixtures it needs as module attributes (`env = run_dir_helpers.env`): pytest finds fixtures
in the module, and an import would read as unused to the linter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import recipe_doc, write_recipe
from refusals import check_refusal

MARKER = "MARKER"
"""What a payload (remote code, an unpickled object) creates in the case's folder if it ever runs."""


@dataclass
class Env:
    bert: Path
    cls: Path
    run: Path  # a finished `full` run (tiny BERT, 2 steps, a checkpoint), shared: cases copy it, never change it
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    holder: int = 0  # pid of the process holding a lock, for needles ("{holder}")
    procs: list[subprocess.Popen] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def recipe(self, out: Path | str, name: str = "recipe.yaml", **train) -> Path:
        """A new recipe (1 step) training into `out`."""
        doc = recipe_doc("cls", self.bert, self.cls, Path("x"), method={"name": "full"}, max_steps=1, **train)
        return write_recipe(self.tmp / name, doc | {"output_dir": str(out)})

    def train(self, out: Path | str, *flags: str) -> list:
        return ["train", self.recipe(out), *flags]


@pytest.fixture(scope="module")
def finished_run(full_run) -> Path:
    assert (full_run / "checkpoints" / "step-00000002" / "state.json").is_file()
    return full_run


@pytest.fixture
def env(tiny_bert, cls_data, finished_run, tmp_path, monkeypatch):
    environment = Env(tiny_bert, cls_data, finished_run, tmp_path, monkeypatch)
    yield environment
    for proc in environment.procs:
        proc.kill()
        proc.wait()
    for mount in reversed(environment.mounts):
        subprocess.run(["umount", "-l", str(mount)], check=False)
    for folder in tmp_path.rglob("*"):  # what a case made read-only, so pytest can remove it
        if folder.is_dir() and not folder.is_symlink() and not os.access(folder, os.W_OK):
            folder.chmod(0o755)


def _copy(env: Env, name: str = "copy") -> Path:
    """A private copy of the finished run whose recipe.yaml names the copy (so --resume and --overwrite accept it)."""
    copy = shutil.copytree(env.run, env.tmp / name, symlinks=True)
    doc = yaml.safe_load((copy / "recipe.yaml").read_text()) | {"output_dir": str(copy)}
    write_recipe(copy / "recipe.yaml", doc)
    return copy


def _record(run: Path, **changes) -> Path:
    record = json.loads((run / "run.json").read_text()) | changes
    (run / "run.json").write_text(json.dumps(record, indent=2))
    return run


def _replace(path: Path, make: Callable[[Path], object]) -> None:
    """Remove `path` (file or folder) and make something else there."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    make(path)


def _link(path: Path, target: Path | str) -> None:
    _replace(path, lambda p: p.symlink_to(target))


def _fifo(path: Path) -> None:
    _replace(path, os.mkfifo)


def _outside(env: Env, path: Path) -> Path:
    """A copy of `path` (a file or folder of the run) outside the run, in the case's folder."""
    target = env.tmp / "outside" / path.name
    target.parent.mkdir(exist_ok=True)
    shutil.copytree(path, target) if path.is_dir() else shutil.copy(path, target)
    return target


def _rows(env: Env) -> Path:
    path = env.tmp / "rows.jsonl"
    path.write_text('{"sentence": "good film"}\n')
    return path


def _command(env: Env, run: Path, command: str) -> list:
    return {
        "eval": ["eval", run],
        "predict": ["predict", run, "--input", _rows(env)],
        "merge": ["merge", run, env.tmp / "merged"],
        "export": ["export", run, env.tmp / "exported", "--format", "hf"],
        "plot": ["plot", run, "--out", env.tmp / "plot.png"],
        "resume": ["train", run / "recipe.yaml", "--resume"],
        "overwrite": ["train", run / "recipe.yaml", "--overwrite"],
    }[command]


def _file_link(env: Env, name: str) -> Path:
    copy = _copy(env)
    _link(copy / name, _outside(env, copy / name))
    return copy


def _special(env: Env, name: str, kind: str) -> Path:
    """The run's `name` replaced by a FIFO with no writer, or a link to /dev/zero, or a sparse file of 300 MB."""
    copy = _copy(env)
    path = copy / name
    if kind == "fifo":
        _fifo(path)
    elif kind == "zero":
        _link(path, "/dev/zero")
    else:
        with open(path, "ab") as f:
            f.truncate(300 << 20)
    return copy


# id: (class, arguments built from Env, exit code, needles the one stderr line holds: "{holder}", "{tmp}" filled in)
Case = tuple[str, Callable[[Env], list], int, list[str]]


def refused(case: tuple, env, monkeypatch) -> None:
    """One case of a run-directory catalogue: (class, build, exit code, needles) refused in one line, nothing outside
    the run touched, no code from the run executed."""
    monkeypatch.chdir(env.tmp)  # relative paths a case might write land in its own folder, under the snapshot
    _, build, code, needles = case
    args = build(env)  # first: a case may start the process that holds the lock (env.holder)
    needles = [needle.format(holder=env.holder, tmp=env.tmp) for needle in needles]
    check_refusal(args, code, needles, env.tmp, env.run, env.cls, env.bert)  # nothing outside the run touched
    assert not (env.tmp / MARKER).exists(), "code from the run (or a pickle) ran"
