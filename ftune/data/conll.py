"""CoNLL files for token classification: one token a line, `word POS chunk TAG` (Tjong Kim Sang & De Meulder 2003).

The word is the first column and the tag the last, so both the 4-column CoNLL-2003 release and the common
3-column `word POS TAG` copies read the same; columns are split on any whitespace. A blank line ends a sentence
and `-DOCSTART-` lines (document boundaries) are skipped. Every token line of a file must have the same number of
columns: a different count is almost always a word with a space in it, which would shift the tag silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftune.errors import DataError

SUFFIXES = (".txt", ".conll")
LAYOUT = "a CoNLL line is `word ... TAG` (word first, tag last), a blank line between sentences"


def read_conll(path: Path, tokens_column: str, tags_column: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Sentences of `path` as rows {tokens_column: [word, ...], tags_column: [tag, ...]}.

    Returns the rows and, per row, the 1-based line number of its first token (for error messages). A malformed
    line is a DataError naming the file, the line and what is wrong.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (not UTF-8); {LAYOUT}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    rows: list[dict[str, Any]] = []
    starts: list[int] = []
    words: list[str] = []
    tags: list[str] = []
    columns = first_line = 0  # the column count every token line must have, and the line that set it

    def end_sentence() -> None:
        if words:
            rows.append({tokens_column: list(words), tags_column: list(tags)})
            words.clear()
            tags.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            end_sentence()
            continue
        if len(fields) < 2:
            raise DataError(f"{path} line {number}: {_show(line)} has one column, no tag; {LAYOUT}")
        if not columns:
            columns, first_line = len(fields), number
        elif len(fields) != columns:
            raise DataError(
                f"{path} line {number}: {_show(line)} has {len(fields)} columns, but line {first_line} "
                f"has {columns} (a word with a space in it?); {LAYOUT}"
            )
        if not words:
            starts.append(number)
        words.append(fields[0])
        tags.append(fields[-1])
    end_sentence()
    if not rows:
        raise DataError(f"{path}: has no rows (no token lines); {LAYOUT}")
    return rows, starts


def _show(line: str, limit: int = 60) -> str:
    line = line.strip()
    return repr(line if len(line) <= limit else line[: limit - 3] + "...")
