"""The task interface: a `Task` is a small record of functions, as a `Method` is (ftune/methods/base.py).

A task says what a row is and how the model learns from it: how rows are encoded into examples, which transformers
model class it trains, the loss from the model's logits as (sum, count) so that accumulation and several processes
weight every token or row alike, the metrics, and what `ftune predict` prints. Nothing outside ftune/tasks/ asks
which task a recipe names; it asks the record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ftune.data.encoded import IGNORE_INDEX, Encoded
from ftune.errors import DataError, RecipeError


class Scorer(Protocol):
    """Accumulates one evaluation: `add` per batch, `merge` another process's scorer, `result` the metrics.

    A generating task's scorer (Task.generate set) is built as `scorer(label_names, decoding)` and also receives
    each batch's generated text: `add_generated(texts, labels)`.
    """

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None: ...
    def merge(self, other: Scorer) -> None: ...
    def result(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class Decoding:
    """What generating text needs besides the model: the tokenizer (to decode) and the recipe's generation settings
    (`generation:`, as `generate` keyword arguments: max_new_tokens, num_beams, ...)."""

    tokenizer: Any
    settings: dict[str, Any]


@dataclass(frozen=True)
class Task:
    """Everything ftune needs to know about one task.

    Attributes:
        name: registry key, the recipe's `task:` value.
        summary: one line for the README and `ftune validate`.
        model_class: the transformers auto class trained (e.g. "AutoModelForSequenceClassification").
        peft_task_type: peft's `task_type` for export and import.
        encode: `(rows, tokenizer, data_spec, label_names) -> Encoded`; a bad row is a DataError naming it.
        loss: `(logits, labels) -> (sum, count)`: the summed loss of the batch in fp32 and what it is an average
            over (rows, or tokens that carry loss). The loop divides the sum by the count of the whole optimizer step
            (every micro-batch, every process), so accumulation equals one large batch.
        count: `labels -> count` as `loss` counts, read before the forward (the step's total must be known first).
        scorer: `label_names -> Scorer`, the metrics of one evaluation.
        class_names: `(rows, data_spec) -> names` when data.labels is not given; None for a task without classes
            (a causal LM keeps its own head).
        reads_conll: .txt/.conll files are read as CoNLL word-per-line files into the recipe's token/tag columns.
        predict_row: `(logits of one row, label_names) -> dict` printed by `ftune predict`; None: `predict` refuses
            the task (score it with `ftune eval`), unless it generates.
        encodes_with_config: `encode` also takes the base model's transformers config as `config=` (a seq2seq
            decoder starts from the model's `decoder_start_token_id`, which the tokenizer does not know).
        generate: `(model, inputs, decoding) -> texts`: one generated text per row of a batch (its inputs, without
            labels), in the caller's precision context. Set for tasks scored on generated text (ROUGE): evaluation
            hands it to the scorer's `add_generated`, and `ftune predict` prints it. None: scored from logits alone.
        next_token: per-token logits at position i are scored against the label at i + 1 (a causal LM, whose
            `loss` shifts them so); otherwise position i against label i. Read by objectives that compare
            per-token distributions (distillation).
        paired: each example is a preference pair (prompt + chosen, prompt + rejected): a batch of B pairs holds the
            B chosen sequences in rows 0..B-1 and their rejected ones in rows B..2B-1, and `loss`/`count` see all 2B
            rows. Preference objectives (reward, dpo) need it.
        holdout_group: `(row, data_spec) -> key`: rows with the same key stay on one side of
            data.validation_fraction's split (preference pairs that share a prompt). None: each row on its own.
        hidden_loss: `(hidden, output_layer, labels) -> (sum, count)`, the same as `loss` but from the final hidden
            states (B, T, d) and the model's output layer, so that logits are made only where a label is kept and
            in chunks (ftune/kernels/linear_ce.py). The task's own objective uses it when the model's logits are
            exactly its output layer of its last hidden state (checked at setup). None: from logits only.
        packs: examples may be packed end to end in one row (data.packing: ftune/data/packing.py): the loss is
            per token within each sequence (a causal LM).
        check: `(train, validation, label_names, data_spec) -> lines`: what only the task can judge of its encoded
            splits (validation None without one), before anything is written: a DataError for data it cannot learn
            from (a single class, pairs with nothing to prefer), and lines for the console about what it accepts
            but must not pass over in silence. Read from the examples, so data from the encoded-data cache is
            checked alike (ftune/tasks/checks.py runs it). None: nothing to check.
        length_fields: the data fields whose limits cut rows (`max_length`; seq2seq's target too), as the console
            and the advice name them.
    """

    name: str
    summary: str
    model_class: str
    peft_task_type: str
    encode: Callable[..., Encoded]
    loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    count: Callable[[torch.Tensor], torch.Tensor]
    scorer: Callable[[list[str] | None], Scorer]
    class_names: Callable[..., list[str]] | None = None
    reads_conll: bool = False
    predict_row: Callable[[torch.Tensor, list[str]], dict[str, Any]] | None = None
    encodes_with_config: bool = False
    generate: Callable[[Any, dict[str, torch.Tensor], Decoding], list[str]] | None = None
    next_token: bool = False
    paired: bool = False
    holdout_group: Callable[[dict[str, Any], Any], str] | None = None
    hidden_loss: Callable[[torch.Tensor, Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    packs: bool = False
    check: Callable[..., list[str]] | None = None
    length_fields: tuple[str, ...] = ("max_length",)

    @property
    def has_classes(self) -> bool:
        """The model gets a new classifier head (one output per class or tag) that trains under every method."""
        return self.class_names is not None


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the positions whose label is not IGNORE_INDEX, and their number.

    logits (B, T, C), labels (B, T); fp32 whatever the compute dtype (bf16 log-softmax loses the small terms).
    """
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (labels != IGNORE_INDEX).sum()


def token_ids(
    tokenizer, texts: list[str], pairs: list[str] | None = None, chunk: int = 4096, **options: Any
) -> list[list[int]]:
    """The input ids of each text (with its pair), tokenised `chunk` rows at a time with the tokenizer's `options`.

    Chunked because a fast tokenizer holds per-row objects (tokens, offsets, masks) for a whole call, which for all
    of a training set at once would set the run's peak memory; the masks and token type ids are not built at all
    (the collator builds the mask, and no task here feeds token types)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        part = pairs[start : start + chunk] if pairs is not None else None
        ids += tokenizer(
            texts[start : start + chunk], part, return_attention_mask=False, return_token_type_ids=False, **options
        )["input_ids"]
    return ids


def check_room(tokenizer, limit: int, field: str = "max_length", pair: bool = False) -> None:
    """Refuse a length limit that leaves a row no room for text: a tokenizer asked to cut below its own special
    tokens cuts nothing at all (rows stay longer than the limit), and at exactly their number keeps none of the text.
    `pair`: two texts per row, one token of each at least."""
    specials = tokenizer.num_special_tokens_to_add(pair=pair)
    if limit <= specials + pair:
        raise RecipeError(
            f"data.{field}: {limit} leaves no room for text: the tokenizer adds {specials} special "
            f"token{'s' * (specials != 1)} to every {'pair of texts' if pair else 'row'}; raise it"
        )


def check_classes(
    train: Encoded,
    validation: Encoded | None,
    names: list[str],
    ids: Callable[[dict], Iterable[int]],
    what: str = "class",
    unit: str = "row",
    field: str = "data.label_column",
) -> list[str]:
    """A classifier's class set against its encoded data; `ids(example)` are the class ids an example is scored on
    (`what`: class or tag; `unit`: what carries one, a row or a word; `field`: the column they are read from).

    Refused: training data of a single class, whose head learns a constant (loss 0 and accuracy 1 on that same
    class); a class that validation rows hold but no training row does (it cannot be learned, yet is scored).
    Said (a returned line): a class that only data.labels names, in neither split, whose output is only ever
    trained down; data.labels may rightly name the ids of a larger set (conll2003's tags) than these rows hold.
    """
    counts = Counter(y for e in train.examples for y in ids(e))
    if len(counts) == 1:
        plural = what + ("es" if what.endswith("s") else "s")
        raise DataError(
            f"{train.source}: every training {unit} has {what} {names[next(iter(counts))]!r}; a "
            f"classifier needs at least 2 {plural} in its training data (is {field} the right column?)"
        )
    seen = Counter(y for e in validation.examples for y in ids(e)) if validation else Counter()
    unseen = sorted(set(seen) - set(counts))
    if unseen:
        listed = ", ".join(repr(names[c]) for c in unseen)
        raise DataError(
            f"{validation.source}: {what} {listed} is in {sum(seen[c] for c in unseen)} validation "
            f"{unit}(s) but in no training {unit} of {train.source}: it cannot be learned, yet is scored; "
            "add training rows that have it, or leave those rows out of validation"
        )
    idle = [repr(name) for c, name in enumerate(names) if c not in counts and c not in seen]
    if not idle:
        return []
    said = (
        f"warning: {what} {', '.join(idle)} (data.labels) is in no row of {train.source}: its output is only "
        "ever trained down; fine where data.labels names the ids of a larger set, else remove it"
    )
    return [said]
