"""Token classification: a tag per word (NER, part of speech), a new classifier over every sub-token.

Rows hold a list of words (data.tokens_column) and a list of tags of the same length (data.tags_column): tag names,
or integer ids named by data.labels. .txt/.conll files are read as CoNLL. A word's tag goes on its first sub-token;
the loss and the metrics count those positions only. Metrics: entity-level precision, recall and F1 (seqeval, strict
IOB2, reported when the tags are IOB2), token accuracy, the mean cross-entropy per tagged word, sentences and words.
"""

from __future__ import annotations

from typing import Any

import torch

from ftune.data.sources import Rows, column, held
from ftune.errors import DataError, ModelError
from ftune.tasks.base import IGNORE_INDEX, Encoded, Task, check_classes, check_room, token_loss


def _word_rows(rows: Rows, tokens_column: str, tags_column: str) -> list[tuple[list[str], list[Any]]]:
    """(words, tags) per row; a non-list cell, a blank word or a length mismatch is an error naming the row."""
    pairs = []
    columns = zip(column(rows, tokens_column, "tokens_column"), column(rows, tags_column, "tags_column"))
    for i, (words, tags) in enumerate(columns):
        for name, value in ((tokens_column, words), (tags_column, tags)):
            if not isinstance(value, list):
                raise DataError(
                    f"{rows.where(i)}: {name!r} is a {type(value).__name__}, not a list; token "
                    "classification reads lists (JSON, JSONL, parquet) or CoNLL .txt/.conll files"
                )
        if len(words) != len(tags):
            raise DataError(
                f"{rows.where(i)}: {len(words)} tokens but {len(tags)} tags; "
                f"{tokens_column!r} and {tags_column!r} need one tag per word"
            )
        if not words:
            raise DataError(f"{rows.where(i)}: {tokens_column!r} is empty; fix or drop the row")
        for j, (word, tag) in enumerate(zip(words, tags)):
            if not isinstance(word, str) or not word.strip():
                shown = held(word) if not isinstance(word, str) else repr(word)
                raise DataError(f"{rows.where(i)}: word {j + 1} is {shown}; every token must be non-blank text")
            if tag is None:
                raise DataError(f"{rows.where(i)}: word {j + 1} ({word!r}) has no tag")
            if not isinstance(tag, (str, int)) or isinstance(tag, bool):
                raise DataError(
                    f"{rows.where(i)}: word {j + 1} ({word!r}) has a tag that is {held(tag)}; a tag is a "
                    "name (B-PER) or an integer id into data.labels"
                )
        pairs.append((words, tags))
    return pairs


def class_names(rows: Rows, spec) -> list[str]:
    return tag_names_of(rows, spec.tokens_column, spec.tags_column)


def tag_names_of(rows: Rows, tokens_column: str, tags_column: str) -> list[str]:
    """Default tag names: the sorted distinct training tags. Integer tags carry no names: they need data.labels."""
    names = set()
    for i, (_, tags) in enumerate(_word_rows(rows, tokens_column, tags_column)):
        if any(not isinstance(tag, str) for tag in tags):
            raise DataError(
                f"{rows.where(i)}: the tags are integer ids, not names; set data.labels to the tag names "
                "in id order (for the Hub's conll2003: O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC, ...)"
            )
        names.update(tags)
    return sorted(names)


def encode_token_classification(
    rows: Rows,
    tokenizer,
    tokens_column: str,
    tags_column: str,
    label_names: list[str],
    max_length: int,
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
                raise DataError(
                    f"{rows.where(i)}: word {j + 1} ({words[j]!r}) has tag {tag!r}, not one of the tags "
                    f"{label_names} (set data.labels to list every tag)"
                )
            ids.append(index.get(str(tag), tag))
        tag_ids.append(ids)
    if not tokenizer.is_fast:  # only a fast (Rust) tokenizer reports which word each sub-token came from
        raise ModelError(
            f"model.name: token_classification needs a fast tokenizer (word_ids()); "
            f"{type(tokenizer).__name__} is not one"
        )
    check_room(tokenizer, max_length)
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


def encode(rows: Rows, tokenizer, spec, names: list[str]) -> Encoded:
    examples, truncated = encode_token_classification(
        rows, tokenizer, spec.tokens_column, spec.tags_column, names, spec.max_length
    )
    return Encoded(examples, rows.source, truncated=truncated)


def check(train: Encoded, validation: Encoded | None, names: list[str], spec) -> list[str]:
    """The tag set against the words (check_classes): each word's first sub-token carries its tag."""
    return check_classes(
        train,
        validation,
        names,
        lambda e: (y for y in e["labels"] if y != IGNORE_INDEX),
        what="tag",
        unit="word",
        field="data.tags_column",
    )


def count(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()


class Scorer:
    """Tag names per scored word, gold and predicted, kept per sentence for seqeval."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.loss_sum, self.golds, self.predictions = names, 0.0, [], []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(token_loss(logits, labels)[0])
        for gold_row, predicted_row in zip(labels.tolist(), logits.argmax(-1).tolist()):
            kept = [(g, p) for g, p in zip(gold_row, predicted_row) if g != IGNORE_INDEX]
            self.golds.append([self.names[g] for g, _ in kept])
            self.predictions.append([self.names[p] for _, p in kept])

    def merge(self, other: Scorer) -> None:
        self.loss_sum += other.loss_sum
        self.golds += other.golds
        self.predictions += other.predictions

    def result(self) -> dict[str, float]:
        words = sum(len(row) for row in self.golds)
        return {"loss": self.loss_sum / max(words, 1), **tagging_metrics(self.golds, self.predictions)}


def tagging_metrics(golds: list[list[str]], predictions: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (seqeval, strict IOB2: an entity counts only when its type and
    both boundaries match, as in the CoNLL-2003 evaluation of Tjong Kim Sang & De Meulder 2003), token accuracy,
    and the number of sentences and tagged words. `golds` and `predictions`: a list of tag names per sentence.

    The entity metrics need IOB2 tag names (O, B-TYPE, I-TYPE); for any other tag set (e.g. part-of-speech tags)
    only the token accuracy is reported.
    """
    words = sum(len(row) for row in golds)
    correct = sum(g == p for gold, predicted in zip(golds, predictions) for g, p in zip(gold, predicted))
    metrics = {"accuracy": correct / max(words, 1), "sentences": len(golds), "words": words}
    tags = {tag for row in golds + predictions for tag in row}
    if not all(tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2) for tag in tags):
        return metrics
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    options = {"mode": "strict", "scheme": IOB2, "average": "micro", "zero_division": 0}
    return {
        "precision": float(precision_score(golds, predictions, **options)),
        "recall": float(recall_score(golds, predictions, **options)),
        "f1": float(f1_score(golds, predictions, **options)),
        **metrics,
    }


TASK = Task(
    name="token_classification",
    summary="a tag per word, e.g. NER (entity precision/recall/F1, token accuracy)",
    model_class="AutoModelForTokenClassification",
    peft_task_type="TOKEN_CLS",
    encode=encode,
    loss=token_loss,
    count=count,
    scorer=Scorer,
    class_names=class_names,
    reads_conll=True,
    check=check,
)
