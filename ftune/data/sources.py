"""Reading data sources into rows: local files, folders holding `<split>.*`, and Hub datasets.

A source is a local file (csv, tsv, json, jsonl, parquet; CoNLL txt/conll for token classification), a folder
holding `<split>.<ext>`, or a Hub dataset; a list of sources is tried in order and the first available one is read.
Every bad row is reported by source and 1-based row number (CoNLL: line number).
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftune.data import conll
from ftune.errors import DataError

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Rows:
    """Rows read from one source, and where they came from (for error messages and the run record)."""

    rows: list[dict[str, Any]]
    source: str
    lines: list[int] | None = None
    """Per row, the 1-based file line it starts on, where a row spans lines (CoNLL sentences); else None."""
    numbers: list[int] | None = None
    """Per row, its 1-based row number in the source, where the rows are a selection of it (a held-out split)."""

    def where(self, i: int) -> str:
        """Row `i` (0-based) as an error message names it."""
        number = self.numbers[i] if self.numbers else i + 1
        return (
            f"{self.source} line {self.lines[i]} (sentence {number})" if self.lines else f"{self.source} row {number}"
        )


def read_rows(
    sources: list[Any], split: str, limit: int | None = None, conll_columns: tuple[str, str] | None = None
) -> Rows:
    """Read the first available source in `sources` (local paths before Hub ids: the list order decides).

    `conll_columns` (tokens, tags): read .txt/.conll files as CoNLL into these columns (token classification).
    """
    tried = []
    for source in sources:
        if isinstance(source, str):
            path = _split_file(source, split, bool(conll_columns))
            if path.is_file() and conll_columns and path.suffix in conll.SUFFIXES:
                rows, starts = conll.read_conll(path, *conll_columns)
                return _limit(Rows(rows, str(path), starts), limit)
            if path.is_file():
                return _limit(Rows(_read_file(path), str(path)), limit)
            tried.append(f"{source} (not found)")
        else:
            name = f"{source.hub}" + (f"/{source.config}" if source.config else "") + f":{source.split}"
            try:
                import datasets

                ds = datasets.load_dataset(source.hub, source.config, split=source.split)
            except Exception as e:  # noqa: BLE001 - offline, unknown id, bad split: all mean "not available here"
                tried.append(f"{name} ({type(e).__name__})")
                continue
            return _limit(Rows(ds.to_list(), name), limit)
    raise DataError(f"data.{split}: no source is available; tried {'; '.join(tried)}")


def local_file(sources: list[Any], split: str, reads_conll: bool = False) -> Path | None:
    """The local file `read_rows` reads for `sources`, found without reading it; None when a Hub dataset comes
    before any local file (which one is read is then known only by trying) or nothing is found."""
    for source in sources:
        if not isinstance(source, str):
            return None
        path = _split_file(source, split, reads_conll)
        if path.is_file():
            return path
    return None


def _split_file(source: str, split: str, reads_conll: bool) -> Path:
    """`source` as a path; a folder stands for its `<split>.<ext>` file (CoNLL files too when `reads_conll`)."""
    path = Path(source).expanduser()
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return path
    except OSError as e:  # a name too long for the filesystem, a loop of links, a folder it may not read
        raise DataError(
            f"data.{split}: {source[:80]}{'...' if len(source) > 80 else ''} cannot be read "
            f"({e.strerror or type(e).__name__})"
        ) from None
    if path.is_dir():
        suffixes = (*FORMATS, *conll.SUFFIXES) if reads_conll else tuple(FORMATS)
        path = next((f for f in sorted(path.iterdir()) if f.stem == split and f.suffix in suffixes), path)
    return path


def _read_file(path: Path) -> list[dict[str, Any]]:
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        note = " (.txt/.conll are read as CoNLL for task token_classification)" if path.suffix in conll.SUFFIXES else ""
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(FORMATS)}{note}")
    import datasets

    options: dict[str, Any] = {}
    if path.suffix == ".tsv":  # GLUE-style TSV: tab-separated, quotes are text, not delimiters
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    if fmt == "csv":
        options["keep_default_na"] = False  # a sentence "null" or "NA" is text, not a missing value
    try:
        # a cache of its own each time: datasets' cache knows a local file by path and mtime, so an edit that keeps
        # the mtime would be read as the old rows
        with tempfile.TemporaryDirectory(prefix="ftune-read-") as cache:
            rows = datasets.load_dataset(
                fmt, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True, **options
            ).to_list()
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the cause is reported below
        if _holds_no_rows(path, fmt):
            raise DataError(f"{path}: has no rows") from None
        cause: BaseException = e
        while cause.__cause__ is not None:  # datasets wraps the parser's own error, which says what is wrong
            cause = cause.__cause__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]  # StopIteration: no text
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]}: {reason}") from None
    if not rows:
        raise DataError(f"{path}: has no rows")
    return rows


def _holds_no_rows(path: Path, fmt: str) -> bool:
    """datasets fails on a file without rows ("corresponds to no data"); tell that apart from a malformed one."""
    if fmt == "parquet":
        return False
    text = path.read_text(errors="replace").strip()
    return text in ("", "[]") or (fmt == "csv" and "\n" not in text)  # csv: a header line alone


def _limit(rows: Rows, limit: int | None) -> Rows:
    if not rows.rows:
        raise DataError(f"{rows.source}: has no rows")
    return Rows(rows.rows[:limit], rows.source, rows.lines and rows.lines[:limit]) if limit else rows


def column(rows: Rows, name: str, field: str, blank_ok: bool = True, text: bool = False) -> list[Any]:
    """The column's values; a missing cell (or, unless `blank_ok`, a blank one; with `text`, one that is not a
    string: `text_column`) is an error naming the first such row."""
    if name not in rows.rows[0]:
        raise DataError(f"{rows.source}: no column {name!r} (data.{field}); columns: {', '.join(rows.rows[0])}")
    values = [row[name] for row in rows.rows]
    for i, value in enumerate(values):
        if value is None or (not blank_ok and isinstance(value, str) and not value.strip()):
            raise DataError(f"{rows.where(i)}: {name!r} is empty; fix or drop the row")
        if text and not isinstance(value, str):
            raise DataError(
                f"{rows.where(i)}: {name!r} (data.{field}) holds {held(value)}, not text; {_text_advice(value, field)}"
            )
    return values


def text_column(rows: Rows, name: str, field: str, blank_ok: bool = True) -> list[str]:
    """`column`, every value text: a list, a mapping, a number or a boolean where text is read is an error naming
    the row and what it holds, never its Python repr trained on."""
    return column(rows, name, field, blank_ok, text=True)


def held(value: Any) -> str:
    """What a cell holds, in a few words for an error message: its kind and the start of its value."""
    if _messages(value):
        kind = f"a list of {len(value)} chat message{'s' * (len(value) != 1)}"
    elif isinstance(value, (list, tuple)):
        kind = f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    else:
        kinds = ((dict, "a mapping"), (bool, "a boolean"), ((int, float), "a number"))
        kind = next((k for t, k in kinds if isinstance(value, t)), f"a {type(value).__name__}")
    shown = repr(value)
    return f"{kind} ({shown if len(shown) <= 40 else shown[:37] + '...'})"


def _messages(value: Any) -> bool:
    """A cell in the conversational format (TRL's, OpenAI's): a list of {"role", "content"} messages."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "content" in v for v in value)


def _text_advice(value: Any, field: str) -> str:
    if _messages(value):
        return (
            f"the conversational format (a list of messages) is not supported for data.{field} yet; "
            "put the message's text in the column"
        )
    if isinstance(value, (list, tuple, dict)):
        return f"data.{field} must name a column of plain text; flatten the cell to its text"
    return (
        f"data.{field} must name a column of text, not of labels or ids; where the value is the text, "
        'write it as a string in the file (JSON: "5")'
    )
