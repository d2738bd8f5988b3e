"""The check every bad-input catalogue shares: a command refused in one stderr line that names the field, file or
row, with a clean exit code, no traceback, and the disk under `roots` as it was (links, folders, FIFOs included)."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
from pathlib import Path

from typer.testing import CliRunner

from ftune.cli import app

runner = CliRunner()
HANG_S = 240
"""A command still running after this many seconds fails its case (a reader blocked on a FIFO), not the suite."""


def snapshot(*roots: Path) -> dict[Path, tuple]:
    """Everything under `roots`, links not followed: a file by (mtime, sha256), a folder, a link by its target, a
    FIFO or device by its type."""
    seen: dict[Path, tuple] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode):
                    seen[path] = ("link", os.readlink(path))
                elif stat.S_ISDIR(mode):
                    seen[path] = ("folder",)
                elif stat.S_ISREG(mode):
                    with open(path, "rb") as f:
                        seen[path] = ("file", path.stat().st_mtime_ns, hashlib.file_digest(f, "sha256").hexdigest())
                else:
                    seen[path] = ("special", stat.S_IFMT(mode))
    return seen


def _hung(signum, frame):
    raise TimeoutError(f"the command did not end within {HANG_S} s: a reader hangs")


def invoke(args: list):
    """`ftune ARGS` in-process, under an alarm."""
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(HANG_S)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_refusal(args: list, code: int, needles: list[str], *roots: Path) -> str:
    """Run `ftune ARGS` and assert the refusal; returns its one line."""
    before = snapshot(*roots)
    result = invoke(args)
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert snapshot(*roots) == before  # nothing written, deleted or replaced
    return lines[0]
