"""Making an output_dir ready for a run: refuse what must not be touched, take the lock, clear only what ftune wrote
(--overwrite), write the record first. Everything here is checked again under the lock, so two processes racing for
one folder cannot both pass."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ftune.errors import RunDirError
from ftune.rundir.layout import (
    CHECKPOINTS,
    LAYOUT,
    LOCK,
    RECIPE,
    RECORD,
    STATE,
    TEMPORARY,
    RunRecord,
    write_record,
    write_text,
)
from ftune.rundir.lock import RunLock, holder, in_use, lock
from ftune.rundir.read import (
    latest_checkpoint,
    read_json,
    read_optimizer,
    read_recipe_text,
    read_record,
    weights_file,
)


def check_output_dir(
    out: Path, recipe_yaml: str, *, resume: bool, overwrite: bool, probe_lock: bool = True
) -> Path | None:
    """Refuse an unusable `out` (RunDirError); returns the checkpoint to resume from, if resuming.

    `probe_lock`: refuse a folder another process trains in (off where this process holds the lock itself)."""
    if out.is_symlink() and not out.exists():
        raise RunDirError(
            f"output_dir: {out} is a symbolic link to {os.readlink(out)}, which does not exist; create "
            "its target or choose another output_dir"
        )
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        what = "is a file" if blocking == out else f"lies under {blocking}, which is a file"
        raise RunDirError(f"output_dir: {out} {what}, not a folder; choose another output_dir")
    entries = _entries(out)
    if probe_lock and entries and (pid := holder(out)) is not None:
        raise RunDirError(in_use(out, pid))
    record = read_record(out) if RECORD in entries else None
    if resume:
        if record is None:
            raise RunDirError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        root = out / CHECKPOINTS
        _own_files(
            [out / name for name in LAYOUT if name != LOCK],
            sorted(root.iterdir()) if root.is_dir() and not root.is_symlink() else [],
        )
        if read_recipe_text(out) != recipe_yaml:
            raise RunDirError(f"--resume: the recipe differs from {out / RECIPE}; resume with the same recipe")
        latest = latest_checkpoint(out)
        if latest is None:
            raise RunDirError(f"--resume: {out} has no complete checkpoint (checkpoints/step-*) to resume from")
        _own_files(sorted(latest.iterdir()))
        # what resuming reads of it, checked before anything is written: its state, weights' header, optimizer state
        read_json(latest, STATE)
        weights_file(latest)
        read_optimizer(latest, mmap=True)
        return latest
    if not entries:
        return None
    if record is None:
        raise RunDirError(
            f"output_dir: {out} exists and is not an ftune run (it holds {min(entries)} and no "
            f"{RECORD}); choose another output_dir"
        )
    if not overwrite:
        raise RunDirError(
            f"output_dir: {out} holds another run; pass --overwrite to replace it, or choose another output_dir"
        )
    # only names ftune writes, whatever else the record lists: a record is data, and never makes a user's file ftune's
    foreign = sorted(name for name in entries if name not in record.files or name not in LAYOUT)
    if foreign:
        raise RunDirError(
            f"output_dir: {out} holds {foreign[0]}, which ftune did not write; --overwrite removes only "
            "a run's own files: move it away or choose another output_dir"
        )
    return None


def _own_files(*groups: list[Path]) -> None:
    """--resume reads and rewrites a run in place: each path of `groups` that exists must be a regular file or a
    folder of the run's own, never a symbolic link (out of the run, or to a device) nor a FIFO; RunDirError for the
    first that is not."""
    for path in (p for group in groups for p in group):
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            continue
        what = f"a symbolic link (to {os.readlink(path)})" if stat.S_ISLNK(mode) else "not a regular file or folder"
        raise RunDirError(
            f"--resume: {path} is {what}; a run resumes only from files of its own: put the run's file "
            "back, or start again with --overwrite"
        )


def is_empty(out: Path) -> bool:
    """Whether `out` holds nothing of a run: missing, empty, or only what a process killed before writing its record
    leaves (the lock, temporaries)."""
    return not _entries(out)


def _entries(out: Path) -> set[str]:
    """The names in `out` besides what a killed process may leave without having written a run (its lock, its
    temporaries); empty when `out` does not exist."""
    try:
        names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    except OSError as e:
        raise RunDirError(f"output_dir: {out} cannot be listed ({e.strerror}); choose another output_dir") from None
    return {n for n in names if n != LOCK and not TEMPORARY.match(n)}


def prepare_output_dir(
    out: Path, recipe_yaml: str, record: RunRecord | None, *, resume: bool, overwrite: bool
) -> tuple[RunLock, Path | None]:
    """Make `out` ready under its lock: (the lock, held until the run ends; the checkpoint to resume from).

    A new run: the record (`record`) and the recipe are written, the record first. `--overwrite`: the previous run's
    files go first, its record last (replaced by the new one), so a kill mid-way leaves a folder --overwrite still
    accepts. `--resume`: what a killed run left half-written is swept away."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"output_dir: {out} cannot be created ({e.strerror or type(e).__name__}); choose a folder you can write to"
        ) from None
    run_lock = lock(out)
    try:
        latest = check_output_dir(out, recipe_yaml, resume=resume, overwrite=overwrite, probe_lock=False)
        if resume:
            sweep(out)
            return run_lock, latest
        _clear(out)
        write_record(out, record)
        write_text(out / RECIPE, recipe_yaml)
        return run_lock, None
    except BaseException:
        run_lock.release()
        raise


def _clear(out: Path) -> None:
    """Remove a previous run's files (check_output_dir has made sure they are all ftune's), its record last."""
    for child in out.iterdir():
        if child.name in (RECORD, LOCK):
            continue
        try:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        except OSError as e:
            raise RunDirError(
                f"--overwrite: {child} cannot be removed ({e.strerror}); nothing new was written"
            ) from None


def sweep(out: Path) -> None:
    """Remove what a killed run left half-done: temporary files, `.step-N.tmp` folders, checkpoints without a
    state.json."""
    for leftover in out.iterdir():
        if TEMPORARY.match(leftover.name):
            leftover.unlink()
    root = out / CHECKPOINTS
    for folder in root.glob(".step-*.tmp"):
        shutil.rmtree(folder)
    for folder in root.glob("step-*"):
        if not (folder / STATE).is_file():
            shutil.rmtree(folder)


def note_resume(out: Path, checkpoint: Path, entry: dict) -> None:
    """Add a resume (`entry`: its command, versions; and the checkpoint) to run.json, keeping how the run started."""
    record = read_record(out)
    record.resumes.append({"from": str(checkpoint.relative_to(out)), **entry})
    write_record(out, record)
