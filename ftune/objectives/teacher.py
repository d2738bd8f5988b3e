"""A frozen teacher for distillation (ftune/objectives/distill.py): what it is, whether it fits the student, its
logits for every training row, and their cache on disk.

A teacher is a finished ftune run directory (its base model with its method) or a model folder / Hub id fine-tuned
for the task. For a task with one output per row (sequence classification) its outputs are C numbers per row: small
enough to compute once before training, carry with the rows, and keep on disk between runs. The cache file is
`$FTUNE_CACHE/teacher_logits/<key>.safetensors` (default ~/.cache/ftune): one fp32 tensor (rows, C). Its key is a
sha256 over the teacher's files (a run dir's recipe, method weights and tokenizer, and its base model's files; or the
model folder's files), its class names, and the token ids it reads for every row, so another teacher, other data,
another tokenizer or another data.max_length is another key, and a file is never read for what it was not made from.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftune import models, rundir
from ftune.errors import ModelError, RecipeError
from ftune.objectives.base import OtherRun

CACHE_FORMAT = b"ftune teacher logits v1"


@dataclass(frozen=True)
class Teacher:
    """What a teacher is, read without loading its weights."""

    where: str
    """objective.teacher as written."""
    task: str | None
    """The task a run directory trained; None for a model given by name (loaded for the student's task)."""
    label_names: list[str] | None
    """A run directory's classes (None: a model given by name, or a task without classes)."""
    tokenizer: Any
    files: list[Path]
    """The files that define it (hashed into the cache key)."""


def describe(where: str, open_run: Callable[[Path], OtherRun], trust_remote_code: bool = False) -> Teacher:
    """The teacher named by objective.teacher (a run directory is read through `open_run`, TrainingData's); one line
    (ModelError, RunDirError) when it is neither a finished run directory nor a loadable model."""
    path = Path(where).expanduser()
    if (path / rundir.RECORD).is_file():
        run = open_run(path)
        files = [*run.files, *(f for folder in run.folders for f in _files(folder))]
        return Teacher(where, run.task, run.label_names, run.tokenizer, files)
    if models.missing_folder(where):
        raise ModelError(f"objective.teacher: {where}: no such run directory or model folder")
    try:
        source = models.resolve_model(where)
        tokenizer = models.load_tokenizer(source, trust_remote_code)
    except ModelError as e:
        reason = str(e).removeprefix("model.name: ")
        raise ModelError(
            f"objective.teacher: {where} is neither a finished ftune run directory (no "
            f"{rundir.RECORD}) nor a loadable model ({reason})"
        ) from None
    return Teacher(where, None, None, tokenizer, _files(Path(source)))


def _files(folder: Path) -> list[Path]:
    """The regular files directly in `folder` (a model folder: config, weights, tokenizer), sorted; none for a Hub
    id that is not a local folder."""
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def check_fits(teacher: Teacher, task_name: str, label_names: list[str] | None) -> None:
    """The teacher must have trained the student's task over the same classes (its logits are compared class by
    class)."""
    if teacher.task is not None and teacher.task != task_name:
        raise RecipeError(
            f"objective.teacher: {teacher.where} was trained for {teacher.task}; the student trains "
            f"{task_name}. Give a teacher of the same task"
        )
    if teacher.label_names is not None and teacher.label_names != label_names:
        raise RecipeError(
            f"objective.teacher: {teacher.where} has the classes {teacher.label_names}, the student "
            f"{label_names}; distillation compares them one by one, so set data.labels to the "
            "teacher's"
        )


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give every text the same ids, known without encoding: fast tokenizers of one class
    whose definitions (vocabulary, normaliser, pre-tokeniser, post-processor) are equal. False when unsure."""
    import json

    backends = [getattr(t, "backend_tokenizer", None) for t in (a, b)]
    if None in backends or type(a) is not type(b) or a.special_tokens_map != b.special_tokens_map:
        return False
    # truncation and padding are call settings the last encode leaves behind, not part of the definition
    a_def, b_def = (
        {k: v for k, v in json.loads(t.to_str()).items() if k not in ("truncation", "padding")} for t in backends
    )
    return a_def == b_def


def check_vocabulary(teacher: Teacher, student_tokenizer) -> None:
    """Token-level distillation compares two distributions over the vocabulary position by position: both models
    must read and write the same token ids."""
    theirs, ours = teacher.tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if theirs != ours:
        differ = next((t for t in sorted(ours) if theirs.get(t) != ours[t]), None)
        example = (
            f"; e.g. {differ!r} is {theirs.get(differ)} for the teacher, {ours[differ]} for the student"
            if differ
            else ""
        )
        raise RecipeError(
            f"objective.teacher: {teacher.where} has another vocabulary than the student "
            f"({len(theirs):,} tokens against {len(ours):,}{example}); token-level distillation "
            "needs one tokenizer for both: pick a teacher of the student's model family"
        )


@torch.no_grad()
def per_row_logits(
    model: nn.Module, examples: list[dict[str, Any]], pad_token_id: int, device: torch.device, batch_size: int = 64
) -> torch.Tensor:
    """(rows, C) fp32 logits of `model` for each example's input_ids, in example order, on the CPU.

    Rows are batched by length (little padding); padding is masked, so a row's logits do not depend on its batch
    beyond float rounding.
    """
    from ftune.data.loader import collate

    pad = collate(pad_token_id)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    rows: list[torch.Tensor | None] = [None] * len(examples)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        batch = pad([{"input_ids": examples[i]["input_ids"], "labels": 0} for i in chunk])
        del batch["labels"]
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        for i, row in zip(chunk, logits):
            rows[i] = row
    return torch.stack(rows)


def cache_key(teacher: Teacher, examples: list[dict[str, Any]]) -> str:
    """sha256 over the teacher's files and classes and the token ids it reads for every row."""
    h = hashlib.sha256(CACHE_FORMAT)
    for path in teacher.files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    if not teacher.files:  # a Hub id not on disk: its name is all there is
        h.update(teacher.where.encode())
    h.update(repr(teacher.label_names).encode())
    for example in examples:
        ids = array("q", example["input_ids"])
        h.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return h.hexdigest()


def cache_path(key: str) -> Path:
    return (
        Path(os.environ.get("FTUNE_CACHE", Path.home() / ".cache" / "ftune")) / "teacher_logits" / f"{key}.safetensors"
    )


def read_cache(key: str, rows: int) -> torch.Tensor | None:
    """The cached (rows, C) logits, or None when absent or unreadable (then they are computed and written again)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = cache_path(key)
    try:
        logits = load_file(str(path))["logits"]
    except (OSError, SafetensorError, KeyError):
        return None
    return logits if logits.dim() == 2 and len(logits) == rows else None


def write_cache(key: str, logits: torch.Tensor) -> Path:
    """Write atomically (a temporary name, then a rename): a reader never sees half a file."""
    from safetensors.torch import save_file

    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    save_file({"logits": logits.contiguous()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path
