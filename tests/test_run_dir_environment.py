"""Run directories under attack (issue 22), class environment: ftune refuses a place it cannot write before it
writes anything. Read-only parents (a read-only tmpfs; past the preflight too), a folder without its write bit, files
in the way (output_dir under a file, or one), dangling links and chains of them, and `~` in output_dir (expanded,
never a literal folder). Also: a `~` output_dir lands under $HOME.

Each catalogue case ends in one stderr line holding the named needles, its exit code, no traceback, and every file
involved byte-identical afterwards (tests/run_dir_helpers.py, tests/refusals.py); tests/test_run_dir_safety.py holds
the overview and the least number of cases per class.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import run_dir_helpers
from refusals import invoke
from run_dir_helpers import Case, Env

env, finished_run = run_dir_helpers.env, run_dir_helpers.finished_run  # the fixtures, where pytest finds them


def _mount(env: Env, folder: Path, *, read_only: bool = True, prepare: Callable[[Path], object] | None = None) -> Path:
    """A small tmpfs at `folder` (read-only, after `prepare` made what it needs in it); skipped without mount."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=False, capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    env.mounts.append(folder)
    if prepare:
        prepare(folder)
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return folder


def _home(env: Env) -> Path:
    home = env.tmp / "home"
    home.mkdir(exist_ok=True)
    env.monkeypatch.setenv("HOME", str(home))
    return home


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


def _link_to_file(env: Env) -> Path:
    (env.tmp / "to-a-file").symlink_to(_file(env))
    return env.tmp / "to-a-file"


def _user_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "recipe.yaml").write_text("model: {name: mine}\n")
    (folder / "notes.md").write_text("mine\n")


def _user_files_as_out(home: Path) -> None:
    _user_files(home / "out")


CASES: dict[str, Case] = {
    # places that cannot be written, or are not folders
    "read-only-parent": ("environment", lambda e: _read_only(e, "run"), 1, ["ro is not writable", "ro/run"]),
    "read-only-grandparent": ("environment", lambda e: _read_only(e, "a/b/run"), 1, ["ro is not writable", "a/b/run"]),
    "read-only-empty-output-dir": (
        "environment",
        lambda e: _read_only(e, "run", existing=True),
        1,
        ["ro/run is not writable"],
    ),
    "read-only-parent-overwrite": (
        "environment",
        lambda e: _read_only(e, "run", flags=("--overwrite",)),
        1,
        ["not writable"],
    ),
    "read-only-parent-past-preflight": (
        "environment",
        lambda e: _read_only(e, "run", preflight=False),
        1,
        ["ro/run", "cannot be created", "Read-only file system"],
    ),
    "read-only-output-dir-past-preflight": (
        "environment",
        lambda e: _read_only(e, "run", existing=True, preflight=False),
        1,
        [".ftune.lock", "cannot be opened", "Read-only file system"],
    ),
    "parent-chmod-555": ("environment", _chmod_parent, 1, ["locked-parent", "not writable"]),
    "under-a-file-deep": (
        "environment",
        lambda e: e.train(_file(e) / "a" / "b" / "run"),
        1,
        ["taken/a/b/run", "lies under", "taken, which is a file"],
    ),
    "under-a-file-overwrite": (
        "environment",
        lambda e: e.train(_file(e) / "run", "--overwrite"),
        1,
        ["taken/run", "is a file"],
    ),
    "a-file-resume": ("environment", lambda e: e.train(_file(e), "--resume"), 1, ["taken", "is a file"]),
    "link-to-a-file": ("environment", lambda e: e.train(_link_to_file(e)), 1, ["to-a-file", "is a file"]),
    "dangling-link": (
        "environment",
        lambda e: e.train(_dangling(e)),
        1,
        ["dangling", "symbolic link", "nowhere", "does not exist"],
    ),
    "dangling-link-overwrite": (
        "environment",
        lambda e: e.train(_dangling(e), "--overwrite"),
        1,
        ["dangling", "does not exist"],
    ),
    "dangling-link-resume": (
        "environment",
        lambda e: e.train(_dangling(e), "--resume"),
        1,
        ["dangling", "does not exist"],
    ),
    "dangling-link-chain": (
        "environment",
        lambda e: e.train(_dangling(e, chain=True)),
        1,
        ["dangling", "symbolic link", "does not exist"],
    ),
    "tilde-names-a-file": (
        "environment",
        lambda e: _tilde(e, lambda h: (h / "out").write_text("mine\n")),
        1,
        ["{tmp}/home/out", "is a file"],
    ),
    "tilde-names-a-project-overwrite": (
        "environment",
        lambda e: _tilde(e, lambda h: _user_files(h / "out"), "train", "--overwrite"),
        1,
        ["{tmp}/home/out", "not an ftune run"],
    ),
    "tilde-names-a-dangling-link": (
        "environment",
        lambda e: _tilde(e, lambda h: (h / "out").symlink_to(h / "gone")),
        1,
        ["{tmp}/home/out", "does not exist"],
    ),
    "tilde-eval-of-nothing": (
        "environment",
        lambda e: _tilde(e, lambda h: None, "eval"),
        1,
        ["{tmp}/home/out", "no such run directory"],
    ),
    "tilde-eval-of-a-project": (
        "environment",
        lambda e: _tilde(e, _user_files_as_out, "eval"),
        1,
        ["{tmp}/home/out", "not an ftune run directory"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_dir_refusal(case, env, monkeypatch):
    run_dir_helpers.refused(CASES[case], env, monkeypatch)


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
