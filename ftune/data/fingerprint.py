"""Fingerprints of a run's inputs: what run.json records of its data files and base model, so that `--resume` on
changed data, `ftune eval` on changed base weights and the encoded-data cache are told apart from the inputs the run
started on. Standard library only (and ftune's own light modules, imported where used).

A file's fingerprint is {"size": bytes, "sha256": hex digest of its bytes}, streamed in 1 MiB chunks (never the
whole file in memory). The shapes recorded in run.json's `fingerprints`:

    "data":  {split: {"path": str, "size": int, "sha256": str}}   the file `ftune.data.sources.read_rows` reads for
             data.train / data.validation (a folder: its `<split>.*` file); a Hub dataset: {"hub": id, "config":
             ..., "split": ...} and no hash (no cheap identity: `datasets` keeps the rows)
    "model": {file name: {"size": int, "sha256": str}}             config.json and the weight files (.safetensors,
             .bin, .pt, .pth, .gguf) at the top of the folder the base model is loaded from

The base model is fingerprinted where it is loaded from (`models.resolve_model`'s folder): for a GGUF base that is
ftune's dequantised safetensors folder, the one `ftune eval` loads again (`assemble.stored_recipe` prefers the
recorded folder), so the comparison says whether eval scores the weights that were trained on. A Hub id not yet in
a local folder is not fingerprinted ({}).

Cost: hashing streams at the speed of sha256 (with the CPU's SHA extensions, several hundred MB/s on one core): a
data file of a few MB is milliseconds and is always hashed by content. A model of several GB is seconds to tens of
seconds, paid at every `train` and `eval`; so a MODEL file's digest is cached under `model_cache()` keyed by its
resolved path, size, inode, device, mtime_ns and ctime_ns. The kernel sets ctime on every write and every
utime() and no call sets it back, so an edit that keeps size and mtime still misses the cache. Files below
`CACHED_FROM` bytes are hashed every time (cheaper than the cache's own file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_FILES = ("config.json",)
CACHED_FROM = 64 << 20
"""A model file at least this large (bytes) has its digest cached (`model_fingerprints`)."""


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """{"size", "sha256"} of `path`'s bytes, read once in CHUNK-sized pieces. Within one process a file is hashed
    once while it stays unchanged (`_seen`: the run's record and the encoded-data cache's key ask for the same file)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)
    if key in _seen:
        return dict(_seen[key])
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    _seen[key] = {"size": size, "sha256": digest.hexdigest()}
    return dict(_seen[key])


_seen: dict[tuple, dict[str, Any]] = {}
"""Digests this process computed, keyed by what any write changes (ctime is set by every write and utime() and
never set back), so a file edited since is hashed anew."""


# --- data ------------------------------------------------------------------------------------------------------


def data_fingerprints(data, reads_conll: bool) -> dict[str, dict[str, Any]]:
    """Per split of `data` (a recipe's data section), the fingerprint of the file read for it, or the Hub source it
    names; a split whose source is not found is left out (reading it fails with its own message)."""
    from ftune.data.sources import local_file

    prints = {}
    for split, listed in (("train", data.train), ("validation", data.validation)):
        if not listed:
            continue
        path = local_file(listed, split, reads_conll)
        hub = next((s for s in listed if not isinstance(s, str)), None)
        if path is not None:
            prints[split] = {"path": str(path), **file_fingerprint(path)}
        elif hub is not None:
            prints[split] = {"hub": hub.hub, "config": hub.config, "split": hub.split}
    return prints


def expected_data(fingerprints: dict[str, dict], resumes: list[dict]) -> dict[str, dict]:
    """The data a resumed run must find: the fingerprints it started on, updated by each change a resume accepted
    (--allow-changed-data records them as `changed_data` {split: {"was", "now"}})."""
    expected = dict(fingerprints.get("data", {}))
    for entry in resumes:
        expected |= {split: change["now"] for split, change in entry.get("changed_data", {}).items()}
    return expected


def data_changes(expected: dict[str, dict], current: dict[str, dict]) -> dict[str, str]:
    """{split: what changed, in words} for each split whose content differs from `expected` (a moved file with the
    same bytes is no change; a Hub dataset is compared by its id alone)."""
    changes = {}
    for split, was in expected.items():
        now = current.get(split)
        if now is None or _same(was, now):
            continue
        changes[split] = f"data.{split}: {_where(now)} {_difference(was, now)}"
    return changes


def _same(was: dict, now: dict) -> bool:
    if "sha256" in was and "sha256" in now:
        return (was["size"], was["sha256"]) == (now["size"], now["sha256"])
    return was == now


def _where(fingerprint: dict) -> str:
    if "hub" in fingerprint:
        return f"Hub dataset {fingerprint['hub']}" + (f"/{fingerprint['config']}" if fingerprint["config"] else "")
    return fingerprint["path"]


def _difference(was: dict, now: dict) -> str:
    if "sha256" not in was or "sha256" not in now:
        return f"is read now, not {_where(was)} as when the run started"
    moved = f" (it started on {was['path']})" if was["path"] != now["path"] else ""
    if was["size"] != now["size"]:
        return f"changed since the run started{moved}: {was['size']:,} bytes then, {now['size']:,} now"
    return f"changed since the run started{moved}: same size ({now['size']:,} bytes), other content"


def check_resume(record, current: dict[str, dict], *, resume: bool, allow_changed_data: bool) -> dict[str, dict]:
    """Compare the data now (`current`, `data_fingerprints`) with what the run in `record` (its RunRecord; None
    when not resuming) started on. Returns the accepted changes for the resume entry ({split: {"was", "now"}}; {}
    when nothing changed, or the record predates fingerprints); RunDirError naming the file and what changed,
    unless `allow_changed_data`; RecipeError for --allow-changed-data without --resume."""
    from ftune.errors import RecipeError, RunDirError

    if not resume:
        if allow_changed_data:
            raise RecipeError(
                "--allow-changed-data: applies only with --resume (a new run records the data as it "
                "is); drop it, or add --resume"
            )
        return {}
    expected = expected_data(record.fingerprints, record.resumes)
    changes = data_changes(expected, current)
    if changes and not allow_changed_data:
        raise RunDirError(
            f"--resume: {'; '.join(changes.values())}; pass "
            "--allow-changed-data to continue on the data as it is now (recorded in run.json), or "
            "start a new run (another output_dir, or --overwrite)"
        )
    return {split: {"was": expected[split], "now": current[split]} for split in changes}


# --- model -----------------------------------------------------------------------------------------------------


def model_cache() -> Path:
    """$FTUNE_CACHE/fingerprints, else ~/.cache/ftune/fingerprints."""
    return Path(os.environ.get("FTUNE_CACHE", Path.home() / ".cache" / "ftune")).expanduser() / "fingerprints"


def model_fingerprints(
    source: str | Path, cache: Path | None = None, cached_from: int = CACHED_FROM
) -> dict[str, dict[str, Any]]:
    """{file name: fingerprint} of the base model in folder `source` (config.json and its weight files); {} when
    `source` is not a local folder (a Hub id from_pretrained downloads). `cache`: where digests of files of at least
    `cached_from` bytes are kept (None: hash every file every time)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return {}
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_FILES)
    )
    return {p.name: _cached_fingerprint(p, cache, cached_from) for p in files}


def _cached_fingerprint(path: Path, cache: Path | None, cached_from: int) -> dict[str, Any]:
    stat = path.stat()
    if cache is None or stat.st_size < cached_from:
        return file_fingerprint(path)
    identity = [str(path.resolve()), stat.st_size, stat.st_ino, stat.st_dev, stat.st_mtime_ns, stat.st_ctime_ns]
    entry = cache / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]}.json"
    try:
        found = json.loads(entry.read_text())
        if found["identity"] == identity:
            return found["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):  # no entry yet, or a torn or foreign one: hash again
        pass
    fingerprint = file_fingerprint(path)
    _store(entry, {"identity": identity, "fingerprint": fingerprint})
    return fingerprint


def _store(entry: Path, content: dict) -> None:
    """Write a cache entry atomically (a reader never sees half of one); a read-only or full cache only costs the
    next run the hashing again."""
    partial = entry.with_name(f".{entry.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(content))
        os.replace(partial, entry)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def model_changes(recorded: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """What differs between the base model's files then (`recorded`) and now, a few words per file; [] when alike
    or when either side is unknown ({}: not a local folder, or a run recorded before fingerprints)."""
    if not recorded or not current:
        return []
    changes = []
    for name in sorted(recorded.keys() | current.keys()):
        was, now = recorded.get(name), current.get(name)
        if was is None or now is None:
            changes.append(f"{name} {'added' if was is None else 'missing'}")
        elif was["size"] != now["size"]:
            changes.append(f"{name}: {was['size']:,} bytes then, {now['size']:,} now")
        elif was["sha256"] != now["sha256"]:
            changes.append(f"{name}: same size, other content")
    return changes
