"""Reading data sources into rows: local files, folders holding `<split>.*`, and Hub datasets.

A source is a local file (csv, tsv, json, jsonl, parquet; CoNLL txt/conll for token classification), a folder
holding `<split>.<ext>`, or a Hub dataset; a list of sources is tried in order and the first available one is read.
Every bad row is reported by source and 1-based row number (CoNLL: line number).
"""

from __future__ import annotations

import csv
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
        return f"{self.source} line {self.lines[i]} (sentence {number})" if self.lines else f"{self.source} row {number}"


def read_rows(sources: list[Any], split: str, limit: int | None = None,
              conll_columns: tuple[str, str] | None = None) -> Rows:
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
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **options)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the cause is reported below
        if _holds_no_rows(path, fmt):
            raise DataError(f"{path}: has no rows") from None
        cause: BaseException = e
        while cause.__cause__ is not None:  # datasets wraps the parser's own error, which says what is wrong
            cause = cause.__cause__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]  # StopIteration: no text
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]}: {reason}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: has no rows")
    return ds.to_list()


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


def column(rows: Rows, name: str, field: str, blank_ok: bool = True) -> list[Any]:
    """The column's values; a missing cell (or, unless `blank_ok`, a blank one) is an error naming the row."""
    if name not in rows.rows[0]:
        raise DataError(f"{rows.source}: no column {name!r} (data.{field}); columns: {', '.join(rows.rows[0])}")
    values = [row[name] for row in rows.rows]
    for i, value in enumerate(values):
        if value is None or (not blank_ok and isinstance(value, str) and not value.strip()):
            raise DataError(f"{rows.where(i)}: {name!r} is empty; fix or drop the row")
    return values
