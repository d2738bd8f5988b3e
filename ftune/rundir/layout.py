"""The run directory, owned by this module alone: its file names, its typed record (run.json), its lock, atomic
writes, and reading a finished run's record, recipe text, metrics and weights. No other module spells a file name
of the layout; every reader of a run goes through here, so a run handed over by someone else is read as data.

    <output_dir>/
      run.json               RunRecord: ftune's version and the record's schema, library versions, code revision,
                             seed, world size, precision, fingerprints of the data and the base model, the names
                             ftune writes here (`files`), and each --resume
      recipe.yaml            the resolved recipe (after --set)
      .ftune.lock            held (flock) by the training process; the kernel releases it when the process dies
      tokenizer/             the tokenizer, so eval/merge/export need nothing else
      method.safetensors     the method's weights (best by train.best_metric, else the last); method.json beside it
      metrics.jsonl          one line per log step and per evaluation; metrics.json: the final metrics
      loss.png, tracking/    the loss plot; experiment trackers' files
      checkpoints/step-N/    resumable state (ftune/run/checkpoint.py)

ftune recognises its own runs by run.json (a record naming ftune's version), never by a file name a user may also
have. `--overwrite` removes only the names ftune writes and refuses a folder holding anything else. The record is
written first and removed never: a kill at any point leaves a folder that is still recognisably a run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ftune.errors import RunDirError

RECORD, RECIPE, LOCK, TOKENIZER = "run.json", "recipe.yaml", ".ftune.lock", "tokenizer"
WEIGHTS, METHOD_META, METHOD_REPORT = "method.safetensors", "method.json", "method_report.json"
METRICS, METRICS_LOG, PLOT, TRACKING = "metrics.json", "metrics.jsonl", "loss.png", "tracking"
CHECKPOINTS, COMPARE = "checkpoints", "compare.json"
STATE, OPTIMIZER, METHOD_STATE = "state.json", "optimizer.pt", "method_state.safetensors"
"""Inside checkpoints/step-N/ (with WEIGHTS and METHOD_META); STATE is written last, so it marks a whole one."""
LAYOUT = (
    RECORD,
    RECIPE,
    LOCK,
    TOKENIZER,
    WEIGHTS,
    METHOD_META,
    METHOD_REPORT,
    METRICS,
    METRICS_LOG,
    PLOT,
    TRACKING,
    CHECKPOINTS,
    COMPARE,
)
"""Every top-level name ftune may write into a run directory."""
SCHEMA = 1
"""run.json's schema: 0 is a record written before it was typed (still read)."""
MAX_RECORD_BYTES = 16 << 20
MAX_LOG_BYTES = 256 << 20
"""metrics.jsonl: about a million log lines; a larger one is refused before it is read."""
MAX_SAFETENSORS_HEADER = 16 << 20
"""A safetensors header (JSON: names, shapes, offsets) larger than this is refused before it is parsed."""
TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


class RunRecord(BaseModel):
    """run.json. Fields ftune reads are typed; what older releases wrote besides them is kept as it is."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = 0
    versions: dict[str, str]
    """ftune, python, torch, transformers, accelerate, datasets."""
    git_sha: str | None = None
    """The git revision of ftune's code (None when installed from a wheel)."""
    command: list[str] = Field(default_factory=list)
    seed: int | None = None
    model_source: str | None = None
    """Where the base model was loaded from (a folder, or a Hub id)."""
    label_names: list[str] | None = None
    precision: str = "fp32"
    world_size: int = 1
    files: list[str] = Field(default_factory=lambda: list(LAYOUT))
    """The top-level names ftune writes in this run directory: all --overwrite may remove."""
    fingerprints: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """{"data": {split: {path, size, sha256}, or for a Hub dataset {hub, config, split}}, "model": {file name:
    {size, sha256}}}, taken when the run started (ftune/data/fingerprint.py); a resume that accepted changed data
    (--allow-changed-data) notes them in its `resumes` entry (`changed_data`). Empty in a record written before
    fingerprints: nothing is compared then."""
    resumes: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("versions")
    @classmethod
    def _written_by_ftune(cls, versions: dict[str, str]) -> dict[str, str]:
        if "ftune" not in versions:
            raise ValueError("names no ftune version")
        return versions


def environment() -> dict[str, Any]:
    """What reproduces a run besides its recipe: versions, ftune's git revision, the command line."""
    import subprocess
    import sys

    import accelerate
    import datasets
    import torch
    import transformers

    import ftune

    try:
        code = Path(ftune.__file__).resolve().parent
        sha = subprocess.run(
            ["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    versions = {
        "ftune": ftune.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }
    return {"schema_version": SCHEMA, "versions": versions, "git_sha": sha or None, "command": sys.argv}


# --- writing ---------------------------------------------------------------------------------------------------


def temporary(path: Path) -> Path:
    """A temporary name beside `path` that no other process or earlier attempt uses (pid and a random suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Write atomically: a temporary file, fsynced, renamed. A failure (a full disk) leaves the old file and no
    temporary, and is one RunDirError line."""
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunDirError(
            f"{path}: cannot be written ({e.strerror or type(e).__name__}); the previous version, if any, is intact"
        ) from None


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_record(out: Path, record: RunRecord) -> None:
    write_json(out / RECORD, record.model_dump(mode="json"))


def append_line(path: Path, line: str) -> None:
    """Append one line to a log (metrics.jsonl); a full disk is one RunDirError line."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise RunDirError(f"{path}: cannot be written ({e.strerror or type(e).__name__})") from None
