"""Every data mistake is caught before anything is written, and no row is reshaped or dropped in silence: label sets
(a repeated name, a single class, a class only validation has), preference pairs with nothing to prefer, cells that
are not text where text is read, and rows that data.max_length cuts or drops (ftune/tasks/checks.py).

The catalogue below holds the refusals, checked as the bad-input catalogues (tests/test_bad_inputs*.py) check
theirs: one stderr line naming the field, file or row, the exit code, no traceback, and nothing on disk changed
(tests/refusals.py). What is accepted and said: tests/test_data_checks_said.py; the checks one by one, and the
shipped recipes on the real data: tests/test_data_checks_units.py. The case environment: tests/data_check_helpers.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import data_check_helpers
from data_check_helpers import Env, _cls_rows, _identical, _long_prompts, _read_jsonl, _relabel
from refusals import check_refusal

env = data_check_helpers.env  # the fixture, where pytest finds it


def _cls_jsonl(env: Env, bad: dict, at: int = 1, every: dict | None = None) -> list:
    """Classification rows as JSONL (each with the cells `every`), row `at` (0-based) updated with `bad`."""
    rows = [
        {"sentence": row.rsplit("\t", 1)[0], "label": int(row.rsplit("\t", 1)[1])} | (every or {})
        for row in _cls_rows(env)[1:]
    ]
    rows[at] |= bad
    return env.train("cls", drop_validation=True, train=env.rows("train.jsonl", rows))


def _jsonl_case(env: Env, kind: str, bad: dict, at: int = 1, split: str = "train", **data) -> list:
    """The tiny data of `kind` with row `at` (0-based) of `split` updated with `bad` (a cell set to something odd)."""
    source = {"sft": env.data["sft"], "pref": env.data["pref"], "s2s": env.data["s2s"]}[kind]
    rows = _read_jsonl(source / f"{split}.jsonl")
    rows[at] |= bad
    return env.train(kind, **{split: env.rows(f"{split}.jsonl", rows)}, **data)


def _tokens(env: Env, rows: list[tuple[list, list]], split: str = "train", **data) -> list:
    """Token classification on JSONL rows (tokens, tags); the tiny CoNLL validation split unless `split` is it."""
    path = env.rows(f"{split}.jsonl", [{"tokens": words, "ner_tags": tags} for words, tags in rows])
    return env.train("token", **{split: path}, **data)


GOOD_SENTENCE = (["good", "film"], ["B-PER", "O"])


MESSAGES = [{"role": "user", "content": "repeat the word good"}]


def _messages_column(env: Env) -> list:
    """SFT rows that also hold the conversation as messages, with that column mapped as the instruction."""
    rows = [row | {"messages": MESSAGES} for row in _read_jsonl(env.data["sft"] / "train.jsonl")]
    return env.train("sft", train=env.rows("train.jsonl", rows), instruction_column="messages")


# id: (arguments built from Env, exit code, substrings the one stderr line must hold)
CASES: dict[str, tuple[Callable[[Env], list], int, list[str]]] = {
    # label sets
    "labels-listed-twice": (lambda e: e.train("cls", labels=["0", "1", "1"]), 2, ["data.labels", "'1'", "twice"]),
    "tags-listed-twice": (
        lambda e: e.train("token", labels=["O", "B-PER", "I-PER", "B-LOC", "O"]),
        2,
        ["data.labels", "'O'", "twice"],
    ),
    "single-class": (
        lambda e: e.train("cls", drop_validation=True, train=_relabel(e, "train", "1")),
        1,
        ["train.tsv", "class '1'", "at least 2 classes"],
    ),
    "single-class-of-data-labels": (
        lambda e: e.train(
            "cls", labels=["neg", "pos"], train=_relabel(e, "train", "1"), validation=_relabel(e, "validation", "0", 2)
        ),
        1,
        ["train.tsv", "class 'pos'", "at least 2 classes"],
    ),
    "single-tag": (
        lambda e: _tokens(
            e,
            [(["good", "film"], ["O", "O"])] * 4,
            validation=e.rows("v.jsonl", [{"tokens": ["film"], "ner_tags": ["O"]}]),
        ),
        1,
        ["train.jsonl", "tag 'O'", "at least 2 tags", "data.tags_column"],
    ),
    "class-only-in-validation": (
        lambda e: e.train("cls", labels=["0", "1", "2"], validation=_relabel(e, "validation", "2", 4)),
        1,
        ["validation.tsv", "class '2'", "in 4 validation row(s)", "no training row"],
    ),
    "tag-only-in-validation": (
        lambda e: _tokens(
            e,
            [(["good", "film", "bad"], ["B-PER", "O", "B-ORG"])],
            split="validation",
            labels=["O", "B-PER", "I-PER", "B-LOC", "B-ORG"],
        ),
        1,
        ["validation.jsonl", "tag 'B-ORG'", "no training word"],
    ),
    # one column for two roles, and pairs with nothing to prefer
    "chosen-and-rejected-one-column": (
        lambda e: e.train("pref", rejected_column="chosen"),
        2,
        ["data.rejected_column", "'chosen'", "data.chosen_column"],
    ),
    "prompt-and-chosen-one-column": (
        lambda e: e.train("pref", chosen_column="prompt"),
        2,
        ["data.chosen_column", "'prompt'", "data.prompt_column"],
    ),
    "instruction-and-response-one-column": (
        lambda e: e.train("sft", instruction_column="output"),
        2,
        ["data.response_column", "'output'", "data.instruction_column"],
    ),
    "text-and-pair-one-column": (
        lambda e: e.train("cls", text_pair_column="sentence"),
        2,
        ["data.text_pair_column", "data.text_column"],
    ),
    "source-and-target-one-column": (
        lambda e: e.train("s2s", target_column="document"),
        2,
        ["data.target_column", "data.source_column"],
    ),
    "every-pair-identical": (lambda e: _identical(e, 32), 1, ["train.jsonl", "32 of 32 pairs", "same chosen"]),
    "many-pairs-identical": (
        lambda e: _identical(e, 3),
        1,
        ["train.jsonl", "3 of 32 pairs", "pairs 1, 2, 3", "more than 5%"],
    ),
    "validation-pairs-identical": (
        lambda e: _identical(e, 2, "validation"),
        1,
        ["validation.jsonl", "2 of 8 pairs", "data.rejected_column"],
    ),
    # cells that are not text where text is read
    "cls-text-a-list": (
        lambda e: _cls_jsonl(e, {"sentence": ["good", "film"]}),
        1,
        ["train.jsonl row 2", "'sentence'", "a list of 2 items", "data.text_column"],
    ),
    "cls-text-a-mapping": (
        lambda e: _cls_jsonl(e, {"sentence": {"text": "good"}}, 4),
        1,
        ["train.jsonl row 5", "a mapping"],
    ),
    "cls-text-a-number": (lambda e: _cls_jsonl(e, {"sentence": 7}), 1, ["train.jsonl row 2", "a number (7)"]),
    "cls-pair-a-boolean": (
        lambda e: _cls_jsonl(e, {"other": True}, 3, {"other": "film"}) + ["--set", "data.text_pair_column=other"],
        1,
        ["train.jsonl row 4", "'other'", "a boolean", "data.text_pair_column"],
    ),
    "cls-label-a-list": (
        lambda e: _cls_jsonl(e, {"label": [0, 1]}, 2),
        1,
        ["train.jsonl row 3", "'label' (data.label_column)", "a list of 2 items"],
    ),
    "cls-label-a-score": (lambda e: _cls_jsonl(e, {"label": 0.75}), 1, ["train.jsonl row 2", "a number (0.75)"]),
    "token-word-a-mapping": (
        lambda e: _tokens(e, [GOOD_SENTENCE, (["good", {"w": "x"}], ["B-PER", "O"])]),
        1,
        ["train.jsonl row 2", "word 2", "a mapping"],
    ),
    "token-tag-a-list": (
        lambda e: _tokens(e, [GOOD_SENTENCE, (["good", "film"], ["B-PER", ["O"]])]),
        1,
        ["train.jsonl row 2", "word 2", "a list of 1 item"],
    ),
    "sft-messages-as-instruction": (
        lambda e: _messages_column(e),
        1,
        ["train.jsonl row 1", "'messages'", "chat message", "conversational format"],
    ),
    "sft-response-a-number": (
        lambda e: _jsonl_case(e, "sft", {"output": 5}, 3),
        1,
        ["train.jsonl row 4", "'output'", "a number (5)"],
    ),
    "sft-input-a-mapping": (
        lambda e: _jsonl_case(e, "sft", {"input": {"word": "good"}}, 2),
        1,
        ["train.jsonl row 3", "'input'", "a mapping"],
    ),
    "sft-validation-response-a-list": (
        lambda e: _jsonl_case(e, "sft", {"output": ["good", "good"]}, 1, "validation"),
        1,
        ["validation.jsonl row 2", "'output'", "a list"],
    ),
    "pref-conversational-chosen": (
        lambda e: _jsonl_case(e, "pref", {"chosen": [{"role": "assistant", "content": "good"}]}),
        1,
        ["train.jsonl row 2", "'chosen'", "chat message", "conversational format"],
    ),
    "pref-conversational-prompt": (
        lambda e: _jsonl_case(e, "pref", {"prompt": MESSAGES}, 5),
        1,
        ["train.jsonl row 6", "'prompt'", "chat message"],
    ),
    "pref-rejected-a-number": (
        lambda e: _jsonl_case(e, "pref", {"rejected": 0}, 0),
        1,
        ["train.jsonl row 1", "'rejected'", "a number (0)"],
    ),
    "s2s-source-a-list": (
        lambda e: _jsonl_case(e, "s2s", {"document": ["good", "movie"]}),
        1,
        ["train.jsonl row 2", "'document'", "a list of 2 items"],
    ),
    "s2s-target-a-number": (
        lambda e: _jsonl_case(e, "s2s", {"summary": 3.5}, 6),
        1,
        ["train.jsonl row 7", "'summary'", "a number (3.5)"],
    ),
    # rows data.max_length cuts or drops, above the shares
    "cls-most-rows-cut": (
        lambda e: e.train("cls", max_length=5),
        1,
        ["train.tsv", "data.max_length=5", "cuts 48 of 48", "allow_truncation"],
    ),
    "cls-no-room-for-text": (lambda e: e.train("cls", max_length=2), 2, ["data.max_length", "no room for text"]),
    "cls-pair-no-room-for-text": (
        lambda e: _cls_jsonl(e, {}) + ["--set", "data.text_pair_column=sentence2", "--set", "data.max_length=4"],
        2,
        ["data.max_length", "4", "pair of texts"],
    ),
    "token-most-rows-cut": (
        lambda e: e.train("token", max_length=4),
        1,
        ["train.txt", "data.max_length=4", "allow_truncation"],
    ),
    "sft-rows-dropped": (
        lambda e: _long_prompts(e, 2),
        1,
        ["train.jsonl", "leaves 2 of 32 rows", "above 5%", "dropped", "raise data.max_length"],
    ),
    "sft-validation-rows-dropped": (
        lambda e: _long_prompts(e, 1, "validation"),
        1,
        ["validation.jsonl", "1 of 8 rows", "dropped"],
    ),
    "sft-max-length-one": (lambda e: e.train("sft", max_length=1), 1, ["train.jsonl", "every row's prompt fills"]),
    "pref-most-pairs-cut": (lambda e: e.train("pref", max_length=8), 1, ["train.jsonl", "data.max_length=8", "cuts"]),
    "s2s-most-targets-cut": (
        lambda e: e.train("s2s", max_target_length=2),
        1,
        ["train.jsonl", "data.max_target_length=2", "raise data.max_length or data.max_target_length"],
    ),
    "s2s-no-room-for-target": (
        lambda e: e.train("s2s", max_target_length=1),
        2,
        ["data.max_target_length", "no room for text"],
    ),
}


def test_the_catalogue_covers_every_class():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_data_mistake(case, env, monkeypatch):
    monkeypatch.chdir(env.tmp)
    build, code, needles = CASES[case]
    check_refusal(build(env), code, needles, env.tmp, *env.data.values())
