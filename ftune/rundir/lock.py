"""The lock on a run directory: one training process at a time, and readers told when a run is still being
written. An advisory lock (flock) on `<output_dir>/.ftune.lock`, released by the kernel when its process dies, so a
killed run never leaves a stale lock."""

from __future__ import annotations

import fcntl
import os
import stat
import time
from pathlib import Path

from ftune.errors import RunDirError
from ftune.rundir.layout import LOCK

PID_TRIES = 20
"""Reads of an empty lock file held by another process (10 ms apart) before its pid counts as unknown."""


class RunLock:
    """An exclusive advisory lock (flock) on `<output_dir>/.ftune.lock`, holding the owner's pid. The kernel
    releases it when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock(out: Path) -> RunLock:
    """Take `out`'s lock, or RunDirError naming the pid that holds it."""
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise RunDirError(
            f"output_dir: {out / LOCK} cannot be opened ({e.strerror}); choose another output_dir"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device cannot hold a pid
        os.close(fd)
        raise RunDirError(f"output_dir: {out / LOCK} is not a regular file; remove it or choose another output_dir")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _pid_in(fd)
        os.close(fd)
        raise RunDirError(in_use(out, holder)) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:  # a full disk
        os.close(fd)  # lets go of the lock too
        raise RunDirError(
            f"output_dir: {out / LOCK} cannot be written ({e.strerror}); free space there or choose another output_dir"
        ) from None
    return RunLock(fd)


def holder(out: Path) -> int | None:
    """The pid training in `out` (-1 if it is unknown), or None when no process holds its lock."""
    try:
        fd = os.open(out / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # no lock file (or not one ftune made): nobody trains here
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _pid_in(fd)
    finally:
        os.close(fd)


def _pid_in(fd: int) -> int:
    """The pid in a held lock file, -1 if unknown. The holder writes it just after taking the lock (truncate, then
    write), so an empty file is read again for a moment before the pid counts as unknown."""
    for _ in range(PID_TRIES):
        try:
            text = os.pread(fd, 32, 0).decode().strip()
        except (OSError, UnicodeDecodeError):
            return -1
        if text:
            return int(text) if text.isdigit() else -1
        time.sleep(0.01)
    return -1


def in_use(out: Path, pid: int) -> str:
    who = f"pid {pid}" if pid > 0 else "another process"
    return f"output_dir: {out} is in use by an ftune run still training ({who}); wait for it to end or choose another"


def require_idle(run_dir: Path) -> None:
    """RunDirError when a process is still training into `run_dir` (its weights may change under the reader)."""
    pid = holder(run_dir)
    if pid is not None:
        who = f"pid {pid}" if pid > 0 else "another process"
        raise RunDirError(f"{run_dir}: still training ({who}); read it once the run has finished")
