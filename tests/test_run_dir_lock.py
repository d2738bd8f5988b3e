"""Run directories under attack (issue 22), class lock: ftune never trains into a folder another process trains in,
nor reads a run still being written (eval, predict, export, merge). A stand-in process holds `.ftune.lock` (flock)
with its pid in it, as ftune's lock does; the refusal names that pid, or "another process" when the file holds none.
A lock file that is not one (a link out of the run, a FIFO) is never followed nor written into. Also what the lock
leaves possible: a killed holder blocks nothing, the holder's pid is named even when written just after the lock, and
a run in progress can still be plotted.

Each catalogue case ends in one stderr line holding the named needles, its exit code, no traceback, and every file
involved byte-identical afterwards (tests/run_dir_helpers.py, tests/refusals.py); tests/test_run_dir_safety.py holds
the overview and the least number of cases per class.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import run_dir_helpers
from refusals import invoke
from run_dir_helpers import Case, Env, _command, _copy, _file_link, _special

env, finished_run = run_dir_helpers.env, run_dir_helpers.finished_run  # the fixtures, where pytest finds them


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


def _hold(env: Env, folder: Path, content: str | None = None) -> int:
    """Start a process holding `folder`'s lock (its pid written into it, or `content`); returns its pid."""
    extra = [] if content is None else [content]
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder / ".ftune.lock"), *extra], stdout=subprocess.PIPE, text=True
    )
    env.procs.append(proc)
    assert proc.stdout.readline().strip() == "held"
    env.holder = proc.pid
    return proc.pid


def _locked_run(env: Env, command: str, content: str | None = None) -> list:
    copy = _copy(env)
    _hold(env, copy, content)
    if command in ("train", "resume", "overwrite"):
        return [
            "train",
            copy / "recipe.yaml",
            *{"train": [], "resume": ["--resume"], "overwrite": ["--overwrite"]}[command],
        ]
    return _command(env, copy, command)


def _locked_fresh_folder(env: Env) -> list:
    """A folder holding only a lock someone holds: a run starting there, before it wrote anything."""
    folder = env.tmp / "starting"
    folder.mkdir()
    _hold(env, folder)
    return env.train(folder)


CASES: dict[str, Case] = {
    # the lock: a process trains in the folder (a stand-in holds .ftune.lock with its pid)
    "locked-train": ("lock", lambda e: _locked_run(e, "train"), 1, ["in use", "still training", "pid {holder}"]),
    "locked-train-resume": ("lock", lambda e: _locked_run(e, "resume"), 1, ["in use", "pid {holder}"]),
    "locked-train-overwrite": ("lock", lambda e: _locked_run(e, "overwrite"), 1, ["in use", "pid {holder}"]),
    "locked-fresh-folder-train": ("lock", _locked_fresh_folder, 1, ["starting", "in use", "pid {holder}"]),
    "locked-eval": ("lock", lambda e: _locked_run(e, "eval"), 1, ["copy", "still training", "pid {holder}"]),
    "locked-predict": ("lock", lambda e: _locked_run(e, "predict"), 1, ["still training", "pid {holder}"]),
    "locked-export": ("lock", lambda e: _locked_run(e, "export"), 1, ["still training", "pid {holder}"]),
    "locked-merge": ("lock", lambda e: _locked_run(e, "merge"), 1, ["still training", "pid {holder}"]),
    "locked-eval-unknown-pid": (
        "lock",
        lambda e: _locked_run(e, "eval", "not a pid"),
        1,
        ["still training", "another process"],
    ),
    "locked-overwrite-unknown-pid": (
        "lock",
        lambda e: _locked_run(e, "overwrite", ""),
        1,
        ["in use", "another process"],
    ),
    # a lock file that is not one: never followed out of the run, never a pid written into a FIFO
    "lock-file-link-out-overwrite": (
        "lock",
        lambda e: _command(e, _file_link(e, ".ftune.lock"), "overwrite"),
        1,
        [".ftune.lock", "cannot be opened", "symbolic links"],
    ),
    "lock-file-link-out-resume": (
        "lock",
        lambda e: _command(e, _file_link(e, ".ftune.lock"), "resume"),
        1,
        [".ftune.lock", "cannot be opened"],
    ),
    "lock-file-fifo-overwrite": (
        "lock",
        lambda e: _command(e, _special(e, ".ftune.lock", "fifo"), "overwrite"),
        1,
        [".ftune.lock", "not a regular file"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_dir_refusal(case, env, monkeypatch):
    run_dir_helpers.refused(CASES[case], env, monkeypatch)


# --- what the lock leaves possible -------------------------------------------------------------------------------


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

    late = HOLD_LOCK.replace(
        "os.ftruncate(fd, 0)\n", "os.ftruncate(fd, 0)\nprint('held', flush=True)\ntime.sleep(0.1)\n", 1
    )
    folder = env.tmp / "run"
    folder.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", late, str(folder / ".ftune.lock")], stdout=subprocess.PIPE, text=True
    )
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
