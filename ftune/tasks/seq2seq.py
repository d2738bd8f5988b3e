"""Sequence-to-sequence: an encoder-decoder model (T5, BART and kin) learns to write a target text from a source.

Rows hold a source and a target column (data.source_column, data.target_column), e.g. a document and its summary.
The source (after data.source_prefix, e.g. T5's "summarize: ") is cut to data.max_length tokens, the target to
data.max_target_length. The decoder reads the target shifted right behind the model's own start token (its config's
`decoder_start_token_id`: pad for T5, </s> for BART), so the batch carries `decoder_input_ids` and the loop's generic
`model(**inputs).logits` works as for any task: logits (B, T_target, V) at position i predict target token i, and
every target token (EOS included) carries loss; padding does not (IGNORE_INDEX).

Metrics: the mean cross-entropy per target token, and ROUGE-1/2/L F1 (Lin 2004, Google's `rouge-score`, Porter
stemming) of the text the model generates for each validation row (greedy or beam search per the recipe's
`generation:` section) against the target, both decoded without special tokens. `ftune predict` prints the
generated text.
"""

from __future__ import annotations

from typing import Any

import torch

from ftune.data.sources import Rows, text_column
from ftune.errors import ModelError
from ftune.tasks.base import IGNORE_INDEX, Decoding, Encoded, Task, check_room, token_loss

ROUGE = ("rouge1", "rouge2", "rougeL")


def decoder_start(config) -> int:
    """The token the decoder starts from: the model's, never guessed from the tokenizer."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise ModelError(
            f"model.name: {getattr(config, 'model_type', 'this model')} has no decoder_start_token_id, "
            "so it is not an encoder-decoder model a seq2seq task can train"
        )
    return int(start)


def encode(rows: Rows, tokenizer, spec, names: None = None, config=None) -> Encoded:
    """Examples {input_ids, decoder_input_ids, labels}: labels are the target ids, decoder_input_ids the same shifted
    right behind the decoder start token (transformers' shift_tokens_right, done once here instead of per batch)."""
    start = decoder_start(config)
    check_room(tokenizer, spec.max_length)
    check_room(tokenizer, spec.max_target_length, "max_target_length")
    sources = [spec.source_prefix + s for s in text_column(rows, spec.source_column, "source_column")]
    targets = text_column(rows, spec.target_column, "target_column")
    inputs = tokenizer(sources, truncation=True, max_length=spec.max_length)["input_ids"]
    labels = tokenizer(text_target=targets, truncation=True, max_length=spec.max_target_length)["input_ids"]
    truncated = _cut(tokenizer, sources, inputs, spec.max_length, {}) | _cut(
        tokenizer, targets, labels, spec.max_target_length, {"text_target": True}
    )
    examples = [{"input_ids": x, "decoder_input_ids": [start] + y[:-1], "labels": y} for x, y in zip(inputs, labels)]
    return Encoded(examples, rows.source, truncated=len(truncated))


def _cut(tokenizer, texts: list[str], encoded: list[list[int]], limit: int, target: dict) -> set[int]:
    """Rows that truncation cut: only one that came out at exactly `limit` tokens can have been; tokenize those
    again, uncut, to tell."""
    full = [i for i, ids in enumerate(encoded) if len(ids) >= limit]
    if not full:
        return set()
    chosen = [texts[i] for i in full]
    uncut = tokenizer(text_target=chosen, verbose=False) if target else tokenizer(chosen, verbose=False)
    return {i for i, ids in zip(full, uncut["input_ids"]) if len(ids) > limit}


def loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of decoder logits (B, T, V) against the target tokens (B, T): already aligned, no shift."""
    return token_loss(logits, labels)


def count(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()


def generate(model, inputs: dict[str, torch.Tensor], decoding: Decoding) -> list[str]:
    """The text the model writes for each row's source (deterministic: greedy or beam search)."""
    out = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=False, **decoding.settings
    )
    return decoding.tokenizer.batch_decode(out, skip_special_tokens=True)


class Scorer:
    """Token loss from the logits, and ROUGE of the generated text against the targets (decoded from the labels)."""

    def __init__(self, names: None = None, decoding: Decoding | None = None) -> None:
        self.decoding = decoding
        self.loss_sum, self.tokens = 0.0, 0
        self.predictions: list[str] = []
        self.references: list[str] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        total, n = loss(logits, labels)
        self.loss_sum += float(total)
        self.tokens += int(n)

    def add_generated(self, texts: list[str], labels: torch.Tensor) -> None:
        tokenizer = self.decoding.tokenizer
        ids = labels.masked_fill(labels == IGNORE_INDEX, tokenizer.pad_token_id)
        self.predictions += texts
        self.references += tokenizer.batch_decode(ids, skip_special_tokens=True)

    def merge(self, other: Scorer) -> None:
        self.loss_sum += other.loss_sum
        self.tokens += other.tokens
        self.predictions += other.predictions
        self.references += other.references

    def result(self) -> dict[str, float]:
        metrics: dict[str, Any] = {"loss": self.loss_sum / max(self.tokens, 1)}
        if self.predictions:
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
            scores = [scorer.score(ref, pred) for ref, pred in zip(self.references, self.predictions)]
            metrics |= {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ROUGE}
        return metrics | {"tokens": self.tokens, "examples": len(self.predictions)}

    def __getstate__(self) -> dict[str, Any]:  # gathered across processes: the texts travel, the tokenizer stays
        return {k: v for k, v in self.__dict__.items() if k != "decoding"} | {"decoding": None}


TASK = Task(
    name="seq2seq",
    summary="source text to target text with an encoder-decoder model (loss, ROUGE-1/2/L of generated text)",
    model_class="AutoModelForSeq2SeqLM",
    peft_task_type="SEQ_2_SEQ_LM",
    encode=encode,
    loss=loss,
    count=count,
    scorer=Scorer,
    encodes_with_config=True,
    generate=generate,
    length_fields=("max_length", "max_target_length"),
)
