"""Run directories under attack (issue 22). ftune must never delete a user's files, never train into a folder another
process trains in, refuse a place it cannot write, and read a run someone else handed over as data only: no code
from it runs (remote code, pickles), nothing outside it is read or written (symbolic links), no size it claims is
believed (safetensors headers, run.json), and none of its files can hang a reader (a FIFO, /dev/zero).

Each catalogue case ends in one stderr line holding the named needles, its exit code, no traceback, and every file
involved byte-identical afterwards: the case's own folder (which holds whatever it planted outside the run, and the
marker a payload would write), the shared finished run, the base model and the data. Classes:
  data-loss    user folders as output_dir, user files beside a run, records that would claim them
  lock         a run another process still trains in (the lock held by a stand-in process)
  environment  read-only parents, files in the way, dangling links, `~`
  hostile      tampered runs under eval, predict, merge, export, plot and train --resume/--overwrite
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import recipe_doc, write_recipe
from refusals import check_refusal, invoke, snapshot
from typer.testing import CliRunner

from ftune.cli import app

runner = CliRunner()
MARKER = "MARKER"
"""What a payload (remote code, an unpickled object) creates in the case's folder if it ever runs."""

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, (sys.argv[2] if len(sys.argv) > 2 else f"{os.getpid()}\\n").encode())
print("held", flush=True)
time.sleep(600)
"""
"""A stand-in for a training process: holds `.ftune.lock` (flock) with its pid in it, as ftune's lock does."""


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


# --- building blocks ---------------------------------------------------------------------------------------------


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


def _recipe_of(run: Path, **model) -> Path:
    doc = yaml.safe_load((run / "recipe.yaml").read_text())
    doc["model"] |= model
    write_recipe(run / "recipe.yaml", doc)
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


def _evil_model(env: Env, folder: Path) -> Path:
    """The tiny BERT with an `auto_map` naming code in its folder; importing that code writes MARKER."""
    shutil.copytree(env.bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForSequenceClassification": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(env.tmp / MARKER)!r}, 'w').write('remote code ran')\n"
                                    "from transformers import BertConfig as EvilConfig\n"
                                    "from transformers import BertForSequenceClassification as EvilModel\n")
    return folder


def _evil_tokenizer(env: Env, run: Path) -> Path:
    """The run's tokenizer/ names a tokenizer class in code it ships beside it; importing that writes MARKER."""
    folder = run / "tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config |= {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil_tok.py").write_text(f"open({str(env.tmp / MARKER)!r}, 'w').write('run code ran')\n"
                                        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    return run


class _Payload:
    """Unpickling this makes a folder MARKER: proof that a file was unpickled as objects."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _hold(env: Env, folder: Path, content: str | None = None) -> int:
    """Start a process holding `folder`'s lock (its pid written into it, or `content`); returns its pid."""
    extra = [] if content is None else [content]
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder / ".ftune.lock"), *extra],
                            stdout=subprocess.PIPE, text=True)
    env.procs.append(proc)
    assert proc.stdout.readline().strip() == "held"
    env.holder = proc.pid
    return proc.pid


def _mount(env: Env, folder: Path, *, read_only: bool = True, prepare: Callable[[Path], object] | None = None) -> Path:
    """A small tmpfs at `folder` (read-only, after `prepare` made what it needs in it); skipped without mount."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=False,
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    env.mounts.append(folder)
    if prepare:
        prepare(folder)
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return folder


def _rows(env: Env) -> Path:
    path = env.tmp / "rows.jsonl"
    path.write_text('{"sentence": "good film"}\n')
    return path


def _command(env: Env, run: Path, command: str) -> list:
    return {"eval": ["eval", run], "predict": ["predict", run, "--input", _rows(env)],
            "merge": ["merge", run, env.tmp / "merged"],
            "export": ["export", run, env.tmp / "exported", "--format", "hf"],
            "plot": ["plot", run, "--out", env.tmp / "plot.png"],
            "resume": ["train", run / "recipe.yaml", "--resume"],
            "overwrite": ["train", run / "recipe.yaml", "--overwrite"]}[command]


def _home(env: Env) -> Path:
    home = env.tmp / "home"
    home.mkdir(exist_ok=True)
    env.monkeypatch.setenv("HOME", str(home))
    return home


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


# --- data loss ---------------------------------------------------------------------------------------------------


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


# --- the lock ----------------------------------------------------------------------------------------------------


def _locked_run(env: Env, command: str, content: str | None = None) -> list:
    copy = _copy(env)
    _hold(env, copy, content)
    if command in ("train", "resume", "overwrite"):
        return ["train", copy / "recipe.yaml", *{"train": [], "resume": ["--resume"],
                                                  "overwrite": ["--overwrite"]}[command]]
    return _command(env, copy, command)


def _locked_fresh_folder(env: Env) -> list:
    """A folder holding only a lock someone holds: a run starting there, before it wrote anything."""
    folder = env.tmp / "starting"
    folder.mkdir()
    _hold(env, folder)
    return env.train(folder)


# --- environment -------------------------------------------------------------------------------------------------


def _read_only(env: Env, below: str, *, existing: bool = False, preflight: bool = True, flags: tuple = ()) -> list:
    mount = env.tmp / "ro"
    _mount(env, mount, prepare=(lambda m: (m / "run").mkdir()) if existing else None)
    if not preflight:  # the second line of defence: making the folder, then opening its lock
        from ftune.run import preflight as checks

        env.monkeypatch.setattr(checks, "free_space", lambda *a, **k: None)
    return env.train(mount / below, *flags)


def _chmod_parent(env: Env) -> list:
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o555 folder anyway; the read-only mount cases cover root")
    parent = env.tmp / "locked-parent"
    parent.mkdir()
    parent.chmod(0o555)  # given back its write bit when the case ends (the env fixture)
    return env.train(parent / "run")


def _file(env: Env, name: str = "taken") -> Path:
    path = env.tmp / name
    path.write_text("a file of the user's\n")
    return path


def _dangling(env: Env, chain: bool = False) -> Path:
    link = env.tmp / "dangling"
    if chain:
        (env.tmp / "middle").symlink_to(env.tmp / "nowhere")
        link.symlink_to(env.tmp / "middle")
    else:
        link.symlink_to(env.tmp / "nowhere")
    return link


def _tilde(env: Env, make: Callable[[Path], object], command: str = "train", *flags: str) -> list:
    home = _home(env)
    make(home)
    if command == "train":
        return ["train", env.recipe("~/out"), *flags]
    return [command, "~/out"]


# --- hostile runs ------------------------------------------------------------------------------------------------


def _remote_code(env: Env, *, inside: bool = False) -> Path:
    """A run whose recipe says model.trust_remote_code: true, its base a folder with code (outside it, or inside)."""
    copy = _copy(env)
    model = _evil_model(env, copy / "model" if inside else env.tmp / "evil-model")
    _recipe_of(copy, name=str(model), trust_remote_code=True)
    return _record(copy, model_source=str(model))


def _record_model_inside(env: Env, via_link: bool = False) -> Path:
    """A plain run whose record says its base model was a folder inside the run (directly, or by a link to it)."""
    copy = _copy(env)
    shutil.copytree(env.bert, copy / "model")
    where = copy / "model"
    if via_link:
        where = env.tmp / "model-link"
        where.symlink_to(copy / "model")
    return _record(copy, model_source=str(where))


def _weights_link(env: Env) -> Path:
    copy = _copy(env)
    _link(copy / "method.safetensors", _outside(env, copy / "method.safetensors"))
    return copy


def _tokenizer_file_link(env: Env) -> Path:
    copy = _copy(env)
    _link(copy / "tokenizer" / "tokenizer.json", _outside(env, copy / "tokenizer" / "tokenizer.json"))
    return copy


def _tokenizer_folder_link(env: Env) -> Path:
    copy = _copy(env)
    _link(copy / "tokenizer", _outside(env, copy / "tokenizer"))
    return copy


def _file_link(env: Env, name: str) -> Path:
    copy = _copy(env)
    _link(copy / name, _outside(env, copy / name))
    return copy


def _header(env: Env, claimed: int, size: int | None = None, where: str = "method.safetensors") -> Path:
    """method.safetensors (or `where`) whose first 8 bytes claim a `claimed`-byte header; `size`: a sparse file of
    that size, so the claim fits the file."""
    copy = _copy(env)
    path = copy / where
    raw = path.read_bytes()
    with open(path, "wb") as f:
        f.write(claimed.to_bytes(8, "little") + raw[8:])
        if size:
            f.truncate(size)
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


def _record_text(env: Env, text: str) -> Path:
    copy = _copy(env)
    (copy / "run.json").write_text(text)
    return copy


def _pickled_optimizer(env: Env) -> Path:
    copy = _copy(env)
    torch.save({"optimizer": {}, "scheduler": {}, "rng": [], "payload": _Payload(env.tmp / MARKER)},
               copy / "checkpoints" / "step-00000002" / "optimizer.pt")
    return copy


def _checkpoint_tamper(env: Env, make: Callable[[Env, Path], object]) -> Path:
    copy = _copy(env)
    make(env, copy / "checkpoints" / "step-00000002")
    return copy


STEP = "checkpoints/step-00000002"

# id: (class, arguments built from Env, exit code, needles the one stderr line holds: "{holder}", "{tmp}" filled in)
Case = tuple[str, Callable[[Env], list], int, list[str]]
CASES: dict[str, Case] = {
    # a user's project folder (their own recipe.yaml, data, notes) as output_dir: never a run, whatever the flags
    "project-folder": ("data-loss", lambda e: _project_as_output_dir(e), 1,
                       ["project", "not an ftune run", "run.json", "choose another output_dir"]),
    "project-folder-overwrite": ("data-loss", lambda e: _project_as_output_dir(e, "--overwrite"), 1,
                                 ["project", "not an ftune run", "run.json"]),
    "project-folder-resume": ("data-loss", lambda e: _project_as_output_dir(e, "--resume"), 1,
                              ["--resume", "project", "no run to resume"]),
    "project-folder-with-ftune-names-overwrite": (
        "data-loss", lambda e: _project_as_output_dir(e, "--overwrite", extra=("checkpoints", "tokenizer")), 1,
        ["project", "not an ftune run", "run.json"]),
    "project-folder-with-foreign-run-json-overwrite": (
        "data-loss", lambda e: _foreign_record_folder(e, "--overwrite"), 1,
        ["run.json", "not an ftune run record", "names no ftune version"]),
    "recipe-yaml-alone-overwrite": (
        "data-loss", lambda e: e.train(_recipe_only(e), "--overwrite"), 1,
        ["recipe-only", "not an ftune run", "recipe.yaml", "no run.json"]),
    # a finished run with the user's own files beside it: --overwrite names the first and deletes nothing
    "run-with-notes-overwrite": ("data-loss", lambda e: _run_with(e, _user_file("notes.txt"), "--overwrite"), 1,
                                 ["notes.txt", "ftune did not write", "move it away"]),
    "run-with-subfolder-overwrite": ("data-loss", lambda e: _run_with(e, _user_subfolder("data"), "--overwrite"), 1,
                                     ["holds data,", "ftune did not write"]),
    "run-with-hidden-file-overwrite": ("data-loss", lambda e: _run_with(e, _user_file(".env"), "--overwrite"), 1,
                                       ["holds .env,", "ftune did not write"]),
    "run-with-file-in-tokenizer-name-overwrite": (
        "data-loss", lambda e: _run_with(e, _user_file("tokenizer.model"), "--overwrite"), 1,
        ["tokenizer.model", "ftune did not write"]),
    "run-record-claims-a-user-file-overwrite": ("data-loss", lambda e: _run_with(e, _claimed, "--overwrite"), 1,
                                                ["notes.txt", "ftune did not write"]),
    "run-with-notes-without-overwrite": ("data-loss", lambda e: _run_with(e, _user_file("notes.txt")), 1,
                                         ["holds another run", "--overwrite"]),
    "old-format-run-without-overwrite": ("data-loss", lambda e: ["train", _old_format(e) / "recipe.yaml"], 1,
                                         ["holds another run", "--overwrite"]),
    "old-format-run-with-notes-overwrite": (
        "data-loss", lambda e: ["train", _with_notes(_old_format(e)) / "recipe.yaml", "--overwrite"], 1,
        ["notes.txt", "ftune did not write"]),
    # the lock: a process trains in the folder (a stand-in holds .ftune.lock with its pid)
    "locked-train": ("lock", lambda e: _locked_run(e, "train"), 1, ["in use", "still training", "pid {holder}"]),
    "locked-train-resume": ("lock", lambda e: _locked_run(e, "resume"), 1, ["in use", "pid {holder}"]),
    "locked-train-overwrite": ("lock", lambda e: _locked_run(e, "overwrite"), 1, ["in use", "pid {holder}"]),
    "locked-fresh-folder-train": ("lock", _locked_fresh_folder, 1, ["starting", "in use", "pid {holder}"]),
    "locked-eval": ("lock", lambda e: _locked_run(e, "eval"), 1, ["copy", "still training", "pid {holder}"]),
    "locked-predict": ("lock", lambda e: _locked_run(e, "predict"), 1, ["still training", "pid {holder}"]),
    "locked-export": ("lock", lambda e: _locked_run(e, "export"), 1, ["still training", "pid {holder}"]),
    "locked-merge": ("lock", lambda e: _locked_run(e, "merge"), 1, ["still training", "pid {holder}"]),
    "locked-eval-unknown-pid": ("lock", lambda e: _locked_run(e, "eval", "not a pid"), 1,
                                ["still training", "another process"]),
    "locked-overwrite-unknown-pid": ("lock", lambda e: _locked_run(e, "overwrite", ""), 1,
                                     ["in use", "another process"]),
    # a lock file that is not one: never followed out of the run, never a pid written into a FIFO
    "lock-file-link-out-overwrite": ("lock", lambda e: _command(e, _file_link(e, ".ftune.lock"), "overwrite"), 1,
                                     [".ftune.lock", "cannot be opened", "symbolic links"]),
    "lock-file-link-out-resume": ("lock", lambda e: _command(e, _file_link(e, ".ftune.lock"), "resume"), 1,
                                  [".ftune.lock", "cannot be opened"]),
    "lock-file-fifo-overwrite": ("lock", lambda e: _command(e, _special(e, ".ftune.lock", "fifo"), "overwrite"), 1,
                                 [".ftune.lock", "not a regular file"]),
    # places that cannot be written, or are not folders
    "read-only-parent": ("environment", lambda e: _read_only(e, "run"), 1, ["ro is not writable", "ro/run"]),
    "read-only-grandparent": ("environment", lambda e: _read_only(e, "a/b/run"), 1, ["ro is not writable", "a/b/run"]),
    "read-only-empty-output-dir": ("environment", lambda e: _read_only(e, "run", existing=True), 1,
                                   ["ro/run is not writable"]),
    "read-only-parent-overwrite": ("environment", lambda e: _read_only(e, "run", flags=("--overwrite",)), 1,
                                   ["not writable"]),
    "read-only-parent-past-preflight": ("environment", lambda e: _read_only(e, "run", preflight=False), 1,
                                        ["ro/run", "cannot be created", "Read-only file system"]),
    "read-only-output-dir-past-preflight": (
        "environment", lambda e: _read_only(e, "run", existing=True, preflight=False), 1,
        [".ftune.lock", "cannot be opened", "Read-only file system"]),
    "parent-chmod-555": ("environment", _chmod_parent, 1, ["locked-parent", "not writable"]),
    "under-a-file-deep": ("environment", lambda e: e.train(_file(e) / "a" / "b" / "run"), 1,
                          ["taken/a/b/run", "lies under", "taken, which is a file"]),
    "under-a-file-overwrite": ("environment", lambda e: e.train(_file(e) / "run", "--overwrite"), 1,
                               ["taken/run", "is a file"]),
    "a-file-resume": ("environment", lambda e: e.train(_file(e), "--resume"), 1, ["taken", "is a file"]),
    "link-to-a-file": ("environment", lambda e: e.train(_link_to_file(e)), 1, ["to-a-file", "is a file"]),
    "dangling-link": ("environment", lambda e: e.train(_dangling(e)), 1,
                      ["dangling", "symbolic link", "nowhere", "does not exist"]),
    "dangling-link-overwrite": ("environment", lambda e: e.train(_dangling(e), "--overwrite"), 1,
                                ["dangling", "does not exist"]),
    "dangling-link-resume": ("environment", lambda e: e.train(_dangling(e), "--resume"), 1,
                             ["dangling", "does not exist"]),
    "dangling-link-chain": ("environment", lambda e: e.train(_dangling(e, chain=True)), 1,
                            ["dangling", "symbolic link", "does not exist"]),
    "tilde-names-a-file": ("environment", lambda e: _tilde(e, lambda h: (h / "out").write_text("mine\n")), 1,
                           ["{tmp}/home/out", "is a file"]),
    "tilde-names-a-project-overwrite": (
        "environment", lambda e: _tilde(e, lambda h: _user_files(h / "out"), "train", "--overwrite"), 1,
        ["{tmp}/home/out", "not an ftune run"]),
    "tilde-names-a-dangling-link": (
        "environment", lambda e: _tilde(e, lambda h: (h / "out").symlink_to(h / "gone")), 1,
        ["{tmp}/home/out", "does not exist"]),
    "tilde-eval-of-nothing": ("environment", lambda e: _tilde(e, lambda h: None, "eval"), 1,
                              ["{tmp}/home/out", "no such run directory"]),
    "tilde-eval-of-a-project": ("environment", lambda e: _tilde(e, _user_files_as_out, "eval"), 1,
                                ["{tmp}/home/out", "not an ftune run directory"]),
}


def _recipe_only(env: Env) -> Path:
    folder = env.tmp / "recipe-only"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("model: {name: mine}\n")
    return folder


def _with_notes(run: Path) -> Path:
    (run / "notes.txt").write_text("mine\n")
    return run


def _link_to_file(env: Env) -> Path:
    (env.tmp / "to-a-file").symlink_to(_file(env))
    return env.tmp / "to-a-file"


def _user_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "recipe.yaml").write_text("model: {name: mine}\n")
    (folder / "notes.md").write_text("mine\n")


def _user_files_as_out(home: Path) -> None:
    _user_files(home / "out")


# hostile runs, each tamper under the commands that read what it tampers with
RUN_READERS = ("eval", "predict", "merge", "export")
HOSTILE: dict[str, tuple[Callable[[Env], Path], tuple[str, ...], list[str]]] = {
    # remote code: a run never enables it; with the flag, never code inside the run
    "remote-code": (_remote_code, RUN_READERS, ["trust_remote_code: true", "--trust-remote-code"]),
    "remote-code-model-inside-run": (lambda e: _remote_code(e, inside=True), ("eval",), ["--trust-remote-code"]),
    "tokenizer-code-in-run": (lambda e: _evil_tokenizer(e, _copy(e)), ("eval", "predict"),
                              ["tokenizer", "custom code"]),
    "record-model-inside-run": (_record_model_inside, RUN_READERS, ["copy/model", "lies inside the run directory"]),
    "record-model-linked-into-run": (lambda e: _record_model_inside(e, via_link=True), ("eval", "merge"),
                                     ["model-link", "lies inside the run directory"]),
    # links out of the run
    "weights-link-out": (_weights_link, RUN_READERS, ["method.safetensors", "links out of the run directory"]),
    "tokenizer-file-link-out": (_tokenizer_file_link, RUN_READERS, ["tokenizer.json", "links out"]),
    "tokenizer-folder-link-out": (_tokenizer_folder_link, ("eval", "merge"), ["copy/tokenizer", "links out"]),
    "recipe-link-out": (lambda e: _file_link(e, "recipe.yaml"), ("eval", "export"), ["recipe.yaml", "links out"]),
    "record-link-out": (lambda e: _file_link(e, "run.json"), ("eval", "plot", "overwrite", "resume"),
                        ["run.json", "links out"]),
    "log-link-out": (lambda e: _file_link(e, "metrics.jsonl"), ("plot",), ["metrics.jsonl", "links out"]),
    # safetensors headers that claim more than is believed
    "weights-header-2^40": (lambda e: _header(e, 2**40), RUN_READERS, ["method.safetensors", "header claims"]),
    "weights-header-50mb": (lambda e: _header(e, 50 << 20, size=60 << 20), ("eval", "merge"),
                            ["method.safetensors", "header claims 52,428,800 bytes"]),
    "weights-header-past-end": (lambda e: _header(e, 1 << 20), ("eval",), ["method.safetensors", "header claims"]),
    # run.json: huge, deep, not ftune's
    "record-huge": (lambda e: _record_text(e, " " * (17 << 20) + "{}"), ("eval", "plot", "overwrite"),
                    ["run.json", "more than the 16,777,216"]),
    "record-deep": (lambda e: _record_text(e, "[" * 100_000 + "]" * 100_000), ("eval", "plot", "overwrite"),
                    ["run.json", "cannot be read", "RecursionError"]),
    "record-foreign": (lambda e: _record_text(e, json.dumps({"versions": {"other": "1"}, "seed": 0})),
                       ("eval", "plot", "overwrite", "resume"), ["run.json", "not an ftune run record"]),
    "record-a-list": (lambda e: _record_text(e, "[1, 2]"), ("eval", "overwrite"),
                      ["run.json", "not an ftune run record"]),
    # files that would hang or flood a reader
    "record-fifo": (lambda e: _special(e, "run.json", "fifo"), ("plot", "overwrite", "resume"),
                    ["run.json", "a named pipe"]),
    "record-dev-zero": (lambda e: _special(e, "run.json", "zero"), ("plot", "overwrite"), ["run.json", "/dev/zero"]),
    "log-fifo": (lambda e: _special(e, "metrics.jsonl", "fifo"), ("plot",), ["metrics.jsonl", "a named pipe"]),
    "log-dev-zero": (lambda e: _special(e, "metrics.jsonl", "zero"), ("plot",), ["metrics.jsonl", "/dev/zero"]),
    "log-sparse-300mb": (lambda e: _special(e, "metrics.jsonl", "sparse"), ("plot",),
                         ["metrics.jsonl", "more than the 268,435,456"]),
    "tokenizer-fifo": (lambda e: _special(e, "tokenizer/tokenizer.json", "fifo"), ("eval", "predict"),
                       ["tokenizer.json", "a named pipe"]),
    "weights-fifo": (lambda e: _special(e, "method.safetensors", "fifo"), ("eval",),
                     ["method.safetensors", "not a finished ftune run"]),
    # --resume from a tampered checkpoint: refused before anything is written, nothing unpickled
    "checkpoint-pickle": (_pickled_optimizer, ("resume",), ["optimizer.pt", "weights_only", "never unpickled"]),
    "checkpoint-optimizer-dev-zero": (lambda e: _checkpoint_tamper(e, lambda e, c: _link(c / "optimizer.pt",
                                                                                          "/dev/zero")),
                                      ("resume",), ["optimizer.pt", "symbolic link", "/dev/zero"]),
    "checkpoint-garbage-optimizer": (
        lambda e: _checkpoint_tamper(e, lambda e, c: (c / "optimizer.pt").write_bytes(os.urandom(4096))),
        ("resume",), ["optimizer.pt", "not optimizer state ftune wrote"]),
    "checkpoint-link-out": (lambda e: _checkpoint_tamper(e, lambda e, c: _link(c, _outside(e, c))), ("resume",),
                            ["step-00000002", "symbolic link", "outside"]),
    "checkpoints-folder-link-out": (lambda e: _file_link(e, "checkpoints"), ("resume",),
                                    ["copy/checkpoints is a symbolic link"]),
    "checkpoint-state-garbage": (
        lambda e: _checkpoint_tamper(e, lambda e, c: (c / "state.json").write_text("{")), ("resume",),
        ["state.json", "cannot be read"]),
    "checkpoint-weights-header-2^40": (lambda e: _header(e, 2**40, where=f"{STEP}/method.safetensors"), ("resume",),
                                       ["step-00000002/method.safetensors", "header claims"]),
    "checkpoint-weights-link-out": (
        lambda e: _checkpoint_tamper(e, lambda e, c: _link(c / "method.safetensors",
                                                           _outside(e, c / "method.safetensors"))),
        ("resume",), ["method.safetensors", "symbolic link"]),
    "resume-log-fifo": (lambda e: _special(e, "metrics.jsonl", "fifo"), ("resume",),
                        ["--resume", "metrics.jsonl", "not a regular file"]),
    "resume-log-link-out": (lambda e: _file_link(e, "metrics.jsonl"), ("resume",),
                            ["--resume", "metrics.jsonl", "symbolic link"]),
}
for _name, (_tamper, _commands, _needles) in HOSTILE.items():
    for _command_name in _commands:
        CASES[f"{_name}-{_command_name}"] = ("hostile", lambda e, t=_tamper, c=_command_name: _command(e, t(e), c), 1,
                                             _needles)
CASES["remote-code-model-inside-run-trusted"] = (
    "hostile", lambda e: [*_command(e, _remote_code(e, inside=True), "eval"), "--trust-remote-code"], 1,
    ["copy/model", "lies inside the run directory"])
CASES["remote-code-model-inside-run-trusted-merge"] = (
    "hostile", lambda e: [*_command(e, _remote_code(e, inside=True), "merge"), "--trust-remote-code"], 1,
    ["copy/model", "lies inside the run directory"])


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


CLASSES = {"data-loss": 10, "lock": 8, "environment": 12, "hostile": 50}
"""The least number of cases each class must have."""


def test_the_catalogue_covers_every_class():
    counts = {cls: sum(case[0] == cls for case in CASES.values()) for cls in CLASSES}
    assert all(counts[cls] >= least for cls, least in CLASSES.items()), counts


@pytest.mark.parametrize("case", list(CASES))
def test_run_dir_refusal(case, env, monkeypatch):
    monkeypatch.chdir(env.tmp)  # relative paths a case might write land in its own folder, under the snapshot
    _, build, code, needles = CASES[case]
    args = build(env)  # first: a case may start the process that holds the lock (env.holder)
    needles = [needle.format(holder=env.holder, tmp=env.tmp) for needle in needles]
    check_refusal(args, code, needles, env.tmp, env.run, env.cls, env.bert)  # nothing outside the run touched
    assert not (env.tmp / MARKER).exists(), "code from the run (or a pickle) ran"


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


def test_a_lock_left_by_a_killed_process_does_not_block(env):
    """The kernel releases a killed holder's flock: the pid left in the file blocks nothing."""
    copy = _copy(env)
    pid = _hold(env, copy)
    os.kill(pid, signal.SIGKILL)
    env.procs[-1].wait()
    assert (copy / ".ftune.lock").read_text().strip() == str(pid)  # the file and its pid stay behind

    result = invoke(["eval", copy])
    assert result.exit_code == 0, result.output
    result = invoke(["train", copy / "recipe.yaml", "--resume"])  # from its final checkpoint: the last evaluation
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stderr


def test_the_holders_pid_is_named_even_when_written_just_after_the_lock(env):
    """A run writes its pid just after taking the lock; one asking in between still learns the pid (a race of two
    `ftune train` on one folder otherwise says "another process")."""
    from ftune import rundir

    late = HOLD_LOCK.replace("os.ftruncate(fd, 0)\n", "os.ftruncate(fd, 0)\nprint('held', flush=True)\n"
                                                      "time.sleep(0.1)\n", 1)
    folder = env.tmp / "run"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", late, str(folder / ".ftune.lock")], stdout=subprocess.PIPE,
                            text=True)
    env.procs.append(proc)
    assert proc.stdout.readline().strip() == "held"
    assert (folder / ".ftune.lock").read_text() == ""  # taken, its pid not written yet
    assert rundir.holder(folder) == proc.pid


def test_a_run_in_progress_can_still_be_plotted(env):
    """Reading a run's log is safe while it trains (ftune plot, unlike eval, reads no weights)."""
    copy = _copy(env)
    _hold(env, copy)
    result = invoke(["plot", copy, "--out", env.tmp / "live.png"])
    assert result.exit_code == 0, result.output
    assert (env.tmp / "live.png").stat().st_size > 0


def test_a_tilde_output_dir_lands_under_home(env, monkeypatch):
    home = _home(env)
    work = env.tmp / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = invoke(["train", env.recipe("~/runs/tilde")])
    assert result.exit_code == 0, result.output
    assert (home / "runs" / "tilde" / "run.json").is_file()
    assert not any(work.iterdir()), "a literal '~' folder was made in the working directory"
    result = invoke(["eval", "~/runs/tilde"])  # quoted: the shell left it alone
    assert result.exit_code == 0, result.output


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


def test_remote_code_in_the_run_never_runs_even_with_the_flag(env):
    """--trust-remote-code consents to the base model's code, never to code shipped inside a run: a run trained
    with trust_remote_code whose tokenizer/ names code of its own loads its tokenizer from the base model instead."""
    copy = _evil_tokenizer(env, _recipe_of(_copy(env), trust_remote_code=True))
    result = invoke(["eval", copy, "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert not (env.tmp / MARKER).exists(), "code from the run's tokenizer/ ran"
    assert json.loads(result.stdout)["examples"] == 16


def test_the_payloads_would_run(env):
    """The catalogue's markers are not vacuous: transformers runs the planted code when told to trust it, and an
    ordinary torch.load unpickles the planted object. (A subprocess: its module cache is its own.)"""
    model = _evil_model(env, env.tmp / "evil-model")
    tokenizer = _evil_tokenizer(env, _copy(env, "tokenizer-copy")) / "tokenizer"
    check = ("import sys, os\n"
             "from transformers import AutoConfig, AutoTokenizer\n"
             "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
             "assert os.path.exists(sys.argv[3]); os.remove(sys.argv[3])\n"
             "AutoTokenizer.from_pretrained(sys.argv[2], trust_remote_code=True)\n"
             "assert os.path.exists(sys.argv[3])\n")
    environ = os.environ | {"HF_HOME": str(env.tmp / "hf"), "HF_MODULES_CACHE": str(env.tmp / "hf" / "modules")}
    done = subprocess.run([sys.executable, "-c", check, str(model), str(tokenizer), str(env.tmp / MARKER)],
                          check=False, env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (env.tmp / MARKER).unlink()

    copy = _pickled_optimizer(env)
    torch.load(copy / STEP / "optimizer.pt", weights_only=False)
    assert (env.tmp / MARKER).is_dir()


# --- ftune compare reads its runs' metrics.json, metrics.jsonl and compare.json ----------------------------------


@pytest.fixture(scope="module")
def comparison(tiny_bert, cls_data, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, --out folder) of a finished one-method comparison."""
    root = tmp_path_factory.mktemp("safety-compare")
    recipe = write_recipe(root / "recipe.yaml", recipe_doc("cls", tiny_bert, cls_data, root / "unused", max_steps=2))
    result = runner.invoke(app, ["compare", str(recipe), "--methods", "lora", "--budget", "2steps", "--out",
                                 str(root / "cmp")])
    assert result.exit_code == 0, result.output
    return recipe, root / "cmp"


COMPARE_TAMPERS: dict[str, tuple[Callable[[Path, Path], object] | None, int, list[str]]] = {
    "untouched": (None, 0, []),
    "metrics-fifo": (lambda run, out: _fifo(run / "metrics.json"), 1, ["metrics.json", "not a regular file"]),
    "metrics-dev-zero": (lambda run, out: _link(run / "metrics.json", "/dev/zero"), 1, ["metrics.json", "/dev/zero"]),
    "metrics-link-out": (lambda run, out: _link(run / "metrics.json", out / "metrics.json"), 1,
                         ["metrics.json", "links out"]),
    "metrics-not-ftune": (lambda run, out: (run / "metrics.json").write_text('{"step": 1}'), 1,
                          ["metrics.json", "not what ftune writes"]),
    "log-fifo": (lambda run, out: _fifo(run / "metrics.jsonl"), 1, ["metrics.jsonl", "a named pipe"]),
    "log-dev-zero": (lambda run, out: _link(run / "metrics.jsonl", "/dev/zero"), 1, ["metrics.jsonl", "links out"]),
    "measurements-link-out": (lambda run, out: _link(run / "compare.json", out / "compare.json"), 1,
                              ["compare.json", "links out"]),
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
