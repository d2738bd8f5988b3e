"""Reading a finished run as data, never as code: every file must lie inside the run directory (a symbolic link
out of it is refused), sizes are bounded before anything is parsed, and weights are safetensors only."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ftune.errors import RunDirError
from ftune.rundir.layout import (
    CHECKPOINTS,
    MAX_LOG_BYTES,
    MAX_RECORD_BYTES,
    MAX_SAFETENSORS_HEADER,
    METRICS,
    METRICS_LOG,
    OPTIMIZER,
    RECIPE,
    RECORD,
    STATE,
    TOKENIZER,
    WEIGHTS,
    RunRecord,
)
from ftune.rundir.lock import require_idle


def inside(folder: Path, name: str) -> Path:
    """`folder / name`, refused when it resolves outside `folder` (a link pointing out of the run)."""
    path = Path(folder) / name
    try:
        path.resolve().relative_to(Path(folder).resolve())
    except ValueError:
        raise RunDirError(
            f"{path}: links out of the run directory (to {path.resolve()}); a run is read only from its own files"
        ) from None
    return path


def _open_regular(path: Path):
    """`path` opened for reading (binary) with its size, refused unless it is a regular file: a FIFO, a device or a
    folder is refused unread (opened without blocking, so a FIFO with no writer cannot hang the reader)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing; not a finished ftune run") from None
    except OSError as e:
        raise RunDirError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RunDirError(f"{path}: not a regular file ({_kind(st.st_mode)}); a run's {path.name} is a plain file")
    return os.fdopen(fd, "rb"), st.st_size


def _read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (`_open_regular`)."""
    f, size = _open_regular(path)
    with f:
        if size > limit:
            raise RunDirError(f"{path}: {size:,} bytes, more than the {limit:,} a run's {path.name} may hold")
        try:
            return f.read(limit + 1)
        except OSError as e:
            raise RunDirError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a named pipe",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
        stat.S_ISLNK: "a symbolic link",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a plain file")


def read_record(run_dir: str | Path) -> RunRecord:
    """run.json as a RunRecord; RunDirError when missing, unreadable or not written by ftune."""
    path = inside(Path(run_dir), RECORD)
    try:
        return RunRecord.model_validate(json.loads(_read_bytes(path, MAX_RECORD_BYTES)))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RunDirError(f"{path}: cannot be read ({type(e).__name__}); was the run interrupted?") from None
    except ValidationError as e:
        where = ".".join(str(p) for p in e.errors()[0]["loc"]) or "record"
        raise RunDirError(f"{path}: not an ftune run record ({where}: {e.errors()[0]['msg']})") from None


def is_run(folder: Path) -> bool:
    """Whether `folder` holds a run ftune wrote (its record), finished or not."""
    try:
        read_record(folder)
    except RunDirError:
        return False
    return True


def finished(run_dir: str | Path) -> RunRecord:
    """The record of a run that can be loaded: not being trained now, with its recipe and weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not (run_dir / RECORD).is_file():
        raise RunDirError(f"{run_dir}: not an ftune run directory (no {RECORD}); give the output_dir of a run")
    require_idle(run_dir)
    record = read_record(run_dir)
    for name in (RECIPE, WEIGHTS):
        if not inside(run_dir, name).is_file():
            raise RunDirError(f"{run_dir}: not a finished ftune run (no {name})")
    return record


def recipe_file(run_dir: str | Path) -> Path:
    """The run's recipe.yaml, checked to lie inside it (the recipe reader bounds its size)."""
    return inside(Path(run_dir), RECIPE)


def read_recipe_text(run_dir: str | Path) -> str | None:
    """The stored recipe's text, or None when there is none."""
    path = inside(Path(run_dir), RECIPE)
    return _read_bytes(path, MAX_RECORD_BYTES).decode("utf-8", "replace") if path.is_file() else None


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """metrics.json: the final metrics (a run's last write)."""
    path = inside(Path(run_dir), METRICS)
    try:
        metrics = json.loads(_read_bytes(path, MAX_RECORD_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: cannot be read ({type(e).__name__})") from None
    if not isinstance(metrics, dict):
        raise RunDirError(f"{path}: not a run's final metrics")
    return metrics


def read_json(folder: str | Path, name: str) -> dict[str, Any]:
    """A JSON object ftune wrote in a run or a checkpoint (state.json, compare.json): inside `folder`, a regular
    file, bounded; RunDirError otherwise."""
    path = inside(Path(folder), name)
    try:
        value = json.loads(_read_bytes(path, MAX_RECORD_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RunDirError(f"{path}: cannot be read ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: not the JSON object ftune writes there")
    return value


def read_optimizer(folder: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's optimizer.pt, loaded as tensors and plain containers only (weights_only): written by ftune, yet
    never unpickled as arbitrary objects; anything else it holds (a pickled object, garbage) is one RunDirError line.
    `mmap`: the tensors are mapped on the CPU, not read (a cheap check before a resume writes anything)."""
    import torch

    path = inside(Path(folder), OPTIMIZER)
    if not path.is_file():
        raise RunDirError(f"{path}: missing or not a regular file; the checkpoint is incomplete")
    try:
        saved = torch.load(path, weights_only=True, mmap=mmap, map_location="cpu" if mmap else None)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds (UnpicklingError, RuntimeError, EOFError, ...)
        raise RunDirError(
            f"{path}: not optimizer state ftune wrote ({type(e).__name__}); it is loaded only as "
            "tensors (weights_only), never unpickled as objects: resume from another checkpoint, or "
            "start again with --overwrite"
        ) from None
    if not isinstance(saved, dict) or not {"optimizer", "scheduler", "rng"} <= saved.keys():
        raise RunDirError(f"{path}: not optimizer state ftune wrote (no optimizer, scheduler and rng)")
    return saved


def has_metrics(run_dir: str | Path) -> bool:
    return (Path(run_dir) / METRICS).is_file()


def read_metrics_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's entries (finished or in progress); a torn line (a killed run) is skipped; [] if none yet."""
    path = inside(Path(run_dir), METRICS_LOG)
    if not path.exists():
        return []
    text = _read_bytes(path, MAX_LOG_BYTES).decode("utf-8", "replace")
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


def tokenizer_dir(run_dir: str | Path) -> Path:
    """The run's tokenizer folder, every file in it checked to lie inside the run."""
    folder = inside(Path(run_dir), TOKENIZER)
    if not folder.is_dir():
        raise RunDirError(f"{folder}: missing; not a finished ftune run")
    for path in folder.iterdir():
        inside(Path(run_dir), str(path.relative_to(run_dir)))
        if not (path.is_file() or path.is_dir()):  # a FIFO would hang the tokenizer's reader, a device feed it
            raise RunDirError(
                f"{path}: not a regular file ({_kind(path.stat().st_mode)}); a run's tokenizer is plain files"
            )
    return folder


def weights_file(folder: str | Path, name: str = WEIGHTS) -> Path:
    """method.safetensors (or another safetensors file `name`) of a run or a checkpoint, its header checked: a
    safetensors file starts with the byte length of a JSON header, which must be bounded and fit the file before
    anything parses it. A regular file only, inside `folder`."""
    path = inside(Path(folder), name)
    f, size = _open_regular(path)
    with f:
        header = int.from_bytes(f.read(8), "little")
    if size < 8 or header > min(MAX_SAFETENSORS_HEADER, size - 8):
        raise RunDirError(
            f"{path}: not a safetensors file ftune wrote (its header claims {header:,} bytes of {size:,}); refused"
        )
    return path


def read_weights(folder: str | Path) -> dict[str, Any]:
    """The tensors of method.safetensors (a run's or a checkpoint's), or one RunDirError line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = weights_file(folder)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunDirError(f"{path}: cannot be read ({str(e).splitlines()[0]})") from None


def complete_checkpoints(out: Path) -> list[Path]:
    """The checkpoints with a state.json, oldest first."""
    return sorted(p for p in (Path(out) / CHECKPOINTS).glob("step-*") if (p / STATE).is_file())


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None
