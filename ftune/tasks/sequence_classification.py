"""Sequence classification: a class per row (or per sentence pair), a new classifier head on the body.

Rows hold a text column (and optionally a second text for pairs) and a label: a class name, or an integer id into
the class names (data.labels, else the sorted distinct training labels). Metrics: accuracy, macro F1 and Matthews
correlation (scikit-learn), the mean cross-entropy, and the number of examples.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftune.data.sources import Rows, column, held
from ftune.data.sources import text_column as texts_of
from ftune.errors import DataError
from ftune.tasks.base import Encoded, Task, check_classes, check_room, token_ids


def class_names(rows: Rows, spec) -> list[str]:
    """Default class names: the sorted distinct training labels, as strings (ids sort numerically)."""
    values = set(labels_of(rows, spec.label_column))
    return [str(v) for v in sorted(values, key=lambda v: (isinstance(v, str), v))]


def labels_of(rows: Rows, name: str) -> list[Any]:
    """The labels: class names or integer ids. A list, a mapping or a fractional number (a regression target, a
    score) is an error naming the row: as text it would become a class of its own."""
    values = column(rows, name, "label_column", blank_ok=False)
    for i, value in enumerate(values):
        if isinstance(value, (list, tuple, dict)) or (isinstance(value, float) and not value.is_integer()):
            raise DataError(
                f"{rows.where(i)}: {name!r} (data.label_column) holds {held(value)}; a label is a class "
                "name or an integer class id (a score to regress on is not a class)"
            )
    return values


def encode_classification(
    rows: Rows,
    tokenizer,
    text_column: str,
    pair_column: str | None,
    label_column: str,
    label_names: list[str],
    max_length: int,
) -> tuple[list[dict[str, Any]], int]:
    """Token ids and a class id per row. A label outside `label_names` is an error naming the row.

    Returns the examples and the number of rows cut to `max_length` (they are kept, truncated).
    """
    check_room(tokenizer, max_length, pair=bool(pair_column))
    texts = texts_of(rows, text_column, "text_column")
    pairs = texts_of(rows, pair_column, "text_pair_column") if pair_column else None
    # a label is a class name, else an integer id into label_names
    index = {name: i for i, name in enumerate(label_names)}
    ids = range(len(label_names))
    labels = []
    for i, value in enumerate(labels_of(rows, label_column)):
        key = str(value) if str(value) in index else value
        if key not in index and not (type(value) is int and value in ids):
            raise DataError(
                f"{rows.where(i)}: label {value!r} is not one of the classes {label_names} "
                "(set data.labels to list every class)"
            )
        labels.append(index.get(key, key))
    encoded = token_ids(tokenizer, texts, pairs, truncation=True, max_length=max_length)
    # only a row that came out at exactly max_length can have been cut: tokenize those again, uncut, to count
    full = [i for i, ids in enumerate(encoded) if len(ids) >= max_length]
    truncated = 0
    if full:
        uncut = token_ids(
            tokenizer, [texts[i] for i in full], [pairs[i] for i in full] if pairs else None, verbose=False
        )
        truncated = sum(len(ids) > max_length for ids in uncut)
    return [{"input_ids": ids, "labels": y} for ids, y in zip(encoded, labels)], truncated


def encode(rows: Rows, tokenizer, spec, names: list[str]) -> Encoded:
    examples, truncated = encode_classification(
        rows, tokenizer, spec.text_column, spec.text_pair_column, spec.label_column, names, spec.max_length
    )
    return Encoded(examples, rows.source, truncated=truncated)


def check(train: Encoded, validation: Encoded | None, names: list[str], spec) -> list[str]:
    """The class set against the rows (check_classes): one class per row."""
    return check_classes(train, validation, names, lambda e: (e["labels"],))


def loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of (B, C) logits against (B,) class ids, and B."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel())


def count(labels: torch.Tensor) -> torch.Tensor:
    return torch.tensor(labels.numel())


class Scorer:
    def __init__(self, names: list[str] | None = None) -> None:
        self.loss_sum, self.predictions, self.golds = 0.0, [], []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(loss(logits, labels)[0])
        self.predictions += logits.argmax(-1).tolist()
        self.golds += labels.tolist()

    def merge(self, other: Scorer) -> None:
        self.loss_sum += other.loss_sum
        self.predictions += other.predictions
        self.golds += other.golds

    def result(self) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        golds, predictions = self.golds, self.predictions
        return {
            "loss": self.loss_sum / max(len(golds), 1),
            "accuracy": float(accuracy_score(golds, predictions)),
            "macro_f1": float(f1_score(golds, predictions, average="macro")),
            "mcc": float(matthews_corrcoef(golds, predictions)),
            "examples": len(golds),
        }


def predict_row(logits: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """The class, its softmax scores and the logits (of this run's classes only)."""
    logits = logits[: len(names)]
    scores = logits.softmax(-1)
    return {
        "label": names[int(scores.argmax())],
        "scores": [round(float(s), 6) for s in scores],
        "logits": logits.tolist(),
    }


TASK = Task(
    name="sequence_classification",
    summary="a class per row or sentence pair (accuracy, macro F1, MCC)",
    model_class="AutoModelForSequenceClassification",
    peft_task_type="SEQ_CLS",
    encode=encode,
    loss=loss,
    count=count,
    scorer=Scorer,
    class_names=class_names,
    predict_row=predict_row,
    check=check,
)
