"""Reading data sources and turning rows into padded token batches, per task.

A source is a local file (csv, tsv, json, jsonl, parquet; CoNLL txt/conll for token classification), a folder
holding `<split>.<ext>`, or a Hub dataset; a list of sources is tried in order and the first available one is read.
Every bad row is reported by source and 1-based row number (CoNLL: line number).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ftune import conll
from ftune.errors import DataError, ModelError

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ALPACA = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
)
IGNORE_INDEX = -100  # label id cross-entropy skips: prompt tokens and padding carry no loss


@dataclass(frozen=True)
class Rows:
    """Rows read from one source, and where they came from (for error messages and the run record)."""

    rows: list[dict[str, Any]]
    source: str
    lines: list[int] | None = None
    """Per row, the 1-based file line it starts on, where a row spans lines (CoNLL sentences); else None."""

    def where(self, i: int) -> str:
        """Row `i` (0-based) as an error message names it."""
        return f"{self.source} line {self.lines[i]} (sentence {i + 1})" if self.lines else f"{self.source} row {i + 1}"


def read_rows(sources: list[Any], split: str, limit: int | None = None,
              conll_columns: tuple[str, str] | None = None) -> Rows:
    """Read the first available source in `sources` (local paths before Hub ids: the list order decides).

    `conll_columns` (tokens, tags): read .txt/.conll files as CoNLL into these columns (token classification).
    """
    tried = []
    suffixes = (*FORMATS, *conll.SUFFIXES) if conll_columns else tuple(FORMATS)
    for source in sources:
        if isinstance(source, str):
            path = Path(source).expanduser()
            if path.is_dir():
                path = next((f for f in sorted(path.iterdir()) if f.stem == split and f.suffix in suffixes), path)
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
            except Exception as e:  # offline, unknown id, bad split: all mean "not available here"
                tried.append(f"{name} ({type(e).__name__})")
                continue
            return _limit(Rows(ds.to_list(), name), limit)
    raise DataError(f"data.{split}: no source is available; tried {'; '.join(tried)}")


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
    except Exception as e:
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


def _column(rows: Rows, name: str, field: str, blank_ok: bool = True) -> list[Any]:
    """The column's values; a missing cell (or, unless `blank_ok`, a blank one) is an error naming the row."""
    if name not in rows.rows[0]:
        raise DataError(f"{rows.source}: no column {name!r} (data.{field}); columns: {', '.join(rows.rows[0])}")
    values = [row[name] for row in rows.rows]
    for i, value in enumerate(values):
        if value is None or (not blank_ok and isinstance(value, str) and not value.strip()):
            raise DataError(f"{rows.source} row {i + 1}: {name!r} is empty; fix or drop the row")
    return values


def label_names_of(rows: Rows, label_column: str) -> list[str]:
    """Default class names: the sorted distinct training labels, as strings (ids sort numerically)."""
    values = set(_column(rows, label_column, "label_column", blank_ok=False))
    return [str(v) for v in sorted(values, key=lambda v: (isinstance(v, str), v))]


def encode_classification(
    rows: Rows, tokenizer, text_column: str, pair_column: str | None, label_column: str,
    label_names: list[str], max_length: int,
) -> tuple[list[dict[str, Any]], int]:
    """Token ids and a class id per row. A label outside `label_names` is an error naming the row.

    Returns the examples and the number of rows cut to `max_length` (they are kept, truncated).
    """
    texts = _column(rows, text_column, "text_column")
    pairs = _column(rows, pair_column, "text_pair_column") if pair_column else None
    # a label is a class name, else an integer id into label_names
    index = {name: i for i, name in enumerate(label_names)}
    ids = range(len(label_names))
    labels = []
    for i, value in enumerate(_column(rows, label_column, "label_column", blank_ok=False)):
        key = str(value) if str(value) in index else value
        if key not in index and not (type(value) is int and value in ids):
            raise DataError(
                f"{rows.source} row {i + 1}: label {value!r} is not one of the classes {label_names} "
                "(set data.labels to list every class)"
            )
        labels.append(index.get(key, key))
    texts, pairs = [str(t) for t in texts], [str(p) for p in pairs] if pairs else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
    # only a row that came out at exactly max_length can have been cut: tokenize those again, uncut, to count
    full = [i for i, ids in enumerate(encoded) if len(ids) >= max_length]
    truncated = 0
    if full:
        uncut = tokenizer([texts[i] for i in full], [pairs[i] for i in full] if pairs else None, verbose=False)
        truncated = sum(len(ids) > max_length for ids in uncut["input_ids"])
    return [{"input_ids": ids, "labels": y} for ids, y in zip(encoded, labels)], truncated


def _word_rows(rows: Rows, tokens_column: str, tags_column: str) -> list[tuple[list[str], list[Any]]]:
    """(words, tags) per row; a non-list cell, a blank word or a length mismatch is an error naming the row."""
    pairs = []
    columns = zip(_column(rows, tokens_column, "tokens_column"), _column(rows, tags_column, "tags_column"))
    for i, (words, tags) in enumerate(columns):
        for name, value in ((tokens_column, words), (tags_column, tags)):
            if not isinstance(value, list):
                raise DataError(f"{rows.where(i)}: {name!r} is a {type(value).__name__}, not a list; token "
                                "classification reads lists (JSON, JSONL, parquet) or CoNLL .txt/.conll files")
        if len(words) != len(tags):
            raise DataError(f"{rows.where(i)}: {len(words)} tokens but {len(tags)} tags; "
                            f"{tokens_column!r} and {tags_column!r} need one tag per word")
        if not words:
            raise DataError(f"{rows.where(i)}: {tokens_column!r} is empty; fix or drop the row")
        for j, word in enumerate(words):
            if not isinstance(word, str) or not word.strip():
                raise DataError(f"{rows.where(i)}: word {j + 1} is {word!r}; every token must be non-blank text")
            if tags[j] is None:
                raise DataError(f"{rows.where(i)}: word {j + 1} ({word!r}) has no tag")
        pairs.append((words, tags))
    return pairs


def tag_names_of(rows: Rows, tokens_column: str, tags_column: str) -> list[str]:
    """Default tag names: the sorted distinct training tags. Integer tags carry no names: they need data.labels."""
    names = set()
    for i, (_, tags) in enumerate(_word_rows(rows, tokens_column, tags_column)):
        if any(not isinstance(tag, str) for tag in tags):
            raise DataError(f"{rows.where(i)}: the tags are integer ids, not names; set data.labels to the tag names "
                            "in id order (for the Hub's conll2003: O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC, ...)")
        names.update(tags)
    return sorted(names)


def encode_token_classification(
    rows: Rows, tokenizer, tokens_column: str, tags_column: str, label_names: list[str], max_length: int,
) -> tuple[list[dict[str, Any]], int]:
    """Sub-token ids and a tag id per sub-token: a word's tag goes on its first sub-token; its other sub-tokens and
    the special tokens get IGNORE_INDEX (the alignment of Devlin et al. 2019, section 5.3, for CoNLL-2003 NER).

    Returns the examples and the number of rows cut to `max_length` (kept: the words past the cut go unscored).
    """
    pairs = _word_rows(rows, tokens_column, tags_column)
    index = {name: i for i, name in enumerate(label_names)}
    tag_ids = []
    for i, (words, tags) in enumerate(pairs):
        ids = []
        for j, tag in enumerate(tags):
            if str(tag) not in index and not (type(tag) is int and 0 <= tag < len(label_names)):
                raise DataError(f"{rows.where(i)}: word {j + 1} ({words[j]!r}) has tag {tag!r}, not one of the tags "
                                f"{label_names} (set data.labels to list every tag)")
            ids.append(index.get(str(tag), tag))
        tag_ids.append(ids)
    if not tokenizer.is_fast:  # only a fast (Rust) tokenizer reports which word each sub-token came from
        raise ModelError(f"model.name: token_classification needs a fast tokenizer (word_ids()); "
                         f"{type(tokenizer).__name__} is not one")
    words = [w for w, _ in pairs]
    try:
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    except ValueError as e:  # e.g. a byte-level BPE tokenizer loaded without add_prefix_space
        raise ModelError(f"model.name: the tokenizer cannot take pre-split words: {str(e).splitlines()[0]}") from None
    examples = []
    for row, ids in enumerate(encoded["input_ids"]):
        labels, previous = [IGNORE_INDEX] * len(ids), None
        for position, word in enumerate(encoded.word_ids(row)):
            if word is not None and word != previous:
                labels[position] = tag_ids[row][word]
            previous = word
        examples.append({"input_ids": ids, "labels": labels})
    # as for classification: only a row that came out at exactly max_length can have been cut
    full = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) >= max_length]
    truncated = 0
    if full:
        uncut = tokenizer([words[i] for i in full], is_split_into_words=True, verbose=False)["input_ids"]
        truncated = sum(len(ids) > max_length for ids in uncut)
    return examples, truncated


def encode_sft(
    rows: Rows, tokenizer, instruction_column: str, input_column: str | None, response_column: str,
    template: str, max_length: int,
) -> tuple[list[dict[str, Any]], int, int]:
    """Prompt + response token ids; only response tokens (and the closing EOS) carry loss.

    Returns the examples, the number of rows dropped because truncation left no response token, and the number
    of rows kept but cut to `max_length`.
    """
    instructions = _column(rows, instruction_column, "instruction_column")
    responses = _column(rows, response_column, "response_column")
    inputs = _column(rows, input_column, "input_column") if input_column and input_column in rows.rows[0] else None
    use_chat = template == "chat" or (template == "auto" and tokenizer.chat_template is not None)
    if template == "chat" and tokenizer.chat_template is None:
        raise DataError("data.template: chat, but the tokenizer has no chat template; use alpaca")
    examples, dropped, truncated = [], 0, 0
    for i, (instruction, response) in enumerate(zip(instructions, responses)):
        extra = str(inputs[i]) if inputs and inputs[i] else ""
        if use_chat:
            user = [{"role": "user", "content": str(instruction) + (f"\n\n{extra}" if extra else "")}]
            prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": str(response)}], tokenize=False
            )
            answer = full[len(prompt):] if full.startswith(prompt) else str(response) + tokenizer.eos_token
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        else:
            prompt = ALPACA.format(with_input=", paired with an input" if extra else "", instruction=instruction)
            prompt += (f"### Input:\n{extra}\n\n" if extra else "") + "### Response:\n"
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer_ids = tokenizer(str(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
        if all(y == IGNORE_INDEX for y in labels):
            dropped += 1
            continue
        truncated += len(prompt_ids) + len(answer_ids) > max_length
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"{rows.source}: every row's prompt fills data.max_length={max_length}; raise it")
    return examples, dropped, truncated


def collate(pad_token_id: int):
    """Pad a list of examples to the longest one (right padding; the attention mask hides it)."""

    def _collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        per_token = isinstance(examples[0]["labels"], list)
        labels = torch.full((len(examples), width), IGNORE_INDEX) if per_token else torch.empty(len(examples), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            mask[row, :n] = 1
            if per_token:
                labels[row, :n] = torch.tensor(e["labels"])
            else:
                labels[row] = e["labels"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return _collate


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch) alone, so a resumed run sees exactly the same order.

    `start` skips the first examples of the epoch (a resumed run's position) without loading them.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.size - self.start


def make_loader(examples: list[dict[str, Any]], batch_size: int, pad_token_id: int, seed: int, shuffle: bool) -> DataLoader:
    sampler = EpochSampler(len(examples), seed, shuffle)
    # its own generator: a DataLoader iterator otherwise draws a worker seed from the global RNG, which would
    # shift dropout masks between a resumed run and an uninterrupted one
    return DataLoader(examples, batch_size=batch_size, sampler=sampler, collate_fn=collate(pad_token_id),
                      generator=torch.Generator().manual_seed(seed))
