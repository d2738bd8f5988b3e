"""task: token_classification, its data — CoNLL reading, the folder source, sub-token alignment (the tag on a word's
first sub-token), truncation, collation, tag validation with rows and lines named, and the tag names of a recipe.

Metrics and training end to end: tests/test_token_classification.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CONLL_TAGS, token_recipe_doc, write_conll
from ftune import assemble
from ftune.data.conll import read_conll
from ftune.data.loader import collate
from ftune.data.sources import Rows, read_rows
from ftune.errors import DataError
from ftune.recipe import validate_recipe
from ftune.tasks import IGNORE_INDEX
from ftune.tasks.token_classification import encode_token_classification, tag_names_of

COLUMNS = ("tokens", "ner_tags")


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- the CoNLL reader


def test_read_conll_sentences_docstart_and_blank_lines(tmp_path):
    text = (
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"  # 4 columns, two blank lines after the sentence
        "Peter\tNNP\tB-NP\tB-PER\nBlackburn NNP I-NP I-PER\n"  # tabs split like spaces
        "-DOCSTART- -X- -X- O\n"  # a document boundary also ends a sentence
        "BRUSSELS NNP B-NP B-LOC\n\n\n\n"
    )  # trailing blank lines
    rows, starts = read_conll(_text(tmp_path / "x.txt", text), *COLUMNS)
    assert rows == [
        {"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", "O"]},
        {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]},
        {"tokens": ["BRUSSELS"], "ner_tags": ["B-LOC"]},
    ]
    assert starts == [3, 7, 10]


def test_read_conll_uses_the_recipes_column_names(tmp_path):
    rows, _ = read_conll(_text(tmp_path / "x.conll", "a O\nb B-PER\n"), "words", "tags")
    assert rows == [{"words": ["a", "b"], "tags": ["O", "B-PER"]}]


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("EU NNP B-ORG\nrejects\n", 2, "one column"),
        ("EU NNP B-ORG\n\nNew York NNP B-LOC\n", 3, "4 columns, but line 1 has 3"),
        ("\n\n-DOCSTART- O\n\n", None, "no rows"),
    ],
)
def test_read_conll_bad_file(tmp_path, text, line, what):
    path = _text(tmp_path / "train.txt", text)
    with pytest.raises(DataError) as caught:
        read_conll(path, *COLUMNS)
    message = str(caught.value)
    assert str(path) in message and what in message
    if line:
        assert f"line {line}:" in message


def test_read_conll_not_utf8(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"caf\xe9 NN O\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_conll(path, *COLUMNS)


def test_folder_source_finds_each_split(conll_data):
    for split, n in (("train", 48), ("validation", 16), ("test", 12)):
        rows = read_rows([str(conll_data)], split, conll_columns=COLUMNS)
        assert rows.source == str(conll_data / f"{split}.txt") and len(rows.rows) == n
    limited = read_rows([str(conll_data)], "test", limit=5, conll_columns=COLUMNS)
    assert (
        len(limited.rows) == 5
        and limited.lines == read_rows([str(conll_data)], "test", conll_columns=COLUMNS).lines[:5]
    )


def test_txt_is_conll_only_for_token_classification(conll_data):
    with pytest.raises(DataError, match="unsupported file type.*token_classification"):
        read_rows([str(conll_data / "train.txt")], "train")


# --- alignment and validation


def _wordpiece(tmp_path: Path):
    """A WordPiece tokenizer that splits words: play ##ing, game ##s; re-play -> [UNK] - play."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "play", "##ing", "game", "##s", "-"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))


def test_tag_goes_on_the_first_sub_token(tmp_path):
    tokenizer = _wordpiece(tmp_path)
    names = ["O", "B-PER", "I-PER"]
    rows = Rows([{"tokens": ["the", "playing", "games", "re-play"], "ner_tags": ["O", "B-PER", "I-PER", "O"]}], "x")
    (example,), truncated = encode_token_classification(rows, tokenizer, *COLUMNS, names, 32)
    pieces = tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert pieces == ["[CLS]", "the", "play", "##ing", "game", "##s", "[UNK]", "-", "play", "[SEP]"]
    x = IGNORE_INDEX
    assert example["labels"] == [x, 0, 1, x, 2, x, 0, x, x, x]
    assert truncated == 0


def test_alignment_without_special_tokens(tiny_llama):
    """A decoder tokenizer adds no [CLS]/[SEP]; its Whitespace pre-tokenizer splits good-film in three."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = Rows([{"tokens": ["good-film", "great"], "ner_tags": ["B-LOC", "B-PER"]}], "x")
    (example,), _ = encode_token_classification(rows, tokenizer, *COLUMNS, CONLL_TAGS, 32)
    assert tokenizer.convert_ids_to_tokens(example["input_ids"]) == ["good", "-", "film", "great"]
    assert example["labels"] == [0, IGNORE_INDEX, IGNORE_INDEX, 1]


def test_truncation_is_counted(tmp_path):
    tokenizer = _wordpiece(tmp_path)
    rows = Rows(
        [
            {"tokens": ["the"] * 4, "ner_tags": ["O"] * 4},  # [CLS] + 4 + [SEP] = 6: fits exactly
            {"tokens": ["the"] * 9, "ner_tags": ["O"] * 9},  # 11: cut
            {"tokens": ["the", "playing", "games"], "ner_tags": ["O"] * 3},
        ],
        "x",
    )  # 7: cut inside a word
    examples, truncated = encode_token_classification(rows, tokenizer, *COLUMNS, ["O"], 6)
    assert truncated == 2
    assert [len(e["input_ids"]) for e in examples] == [6, 6, 6]
    assert [sum(y != IGNORE_INDEX for y in e["labels"]) for e in examples] == [4, 4, 3]


def test_collate_pads_tags_with_ignore_index():
    batch = collate(0)(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 1, IGNORE_INDEX]}, {"input_ids": [5], "labels": [2]}]
    )
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 1, IGNORE_INDEX], [2, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_json_token_lists_with_integer_tags(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    path = _jsonl(
        tmp_path / "train.jsonl", [{"words": ["good", "film"], "tags": [1, 0]}, {"words": ["bad"], "tags": [2]}]
    )
    rows = read_rows([str(path)], "train", conll_columns=("words", "tags"))
    with pytest.raises(DataError, match=r"train.jsonl row 1: the tags are integer ids.*set data.labels"):
        tag_names_of(rows, "words", "tags")
    examples, _ = encode_token_classification(
        rows, AutoTokenizer.from_pretrained(tiny_bert), "words", "tags", ["O", "B-PER", "B-LOC"], 32
    )
    assert [[y for y in e["labels"] if y != IGNORE_INDEX] for e in examples] == [[1, 0], [2]]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"tokens": ["good", "film"], "ner_tags": ["O"]}, "row 2: 2 tokens but 1 tags"),
        ({"tokens": "good film", "ner_tags": ["O", "O"]}, "row 2: 'tokens' is a str, not a list"),
        ({"tokens": [], "ner_tags": []}, "row 2: 'tokens' is empty"),
        ({"tokens": ["good", " "], "ner_tags": ["O", "O"]}, "row 2: word 2 is ' '"),
        ({"tokens": ["good"], "ner_tags": ["B-ORG"]}, "row 2: word 1 ('good') has tag 'B-ORG', not one of the tags"),
        ({"tokens": ["good"], "ner_tags": [7]}, "row 2: word 1 ('good') has tag 7"),
    ],
)
def test_bad_rows_are_named(tiny_bert, tmp_path, row, message):
    from transformers import AutoTokenizer

    path = _jsonl(tmp_path / "train.jsonl", [{"tokens": ["bad"], "ner_tags": ["O"]}, row])
    rows = read_rows([str(path)], "train", conll_columns=COLUMNS)
    with pytest.raises(DataError) as caught:
        encode_token_classification(rows, AutoTokenizer.from_pretrained(tiny_bert), *COLUMNS, CONLL_TAGS, 32)
    assert f"{path} {message}" in str(caught.value)


def test_unknown_tag_in_conll_names_the_line(tiny_bert, conll_data, tmp_path):
    """A CoNLL row is a sentence: its error names the file line where the sentence starts."""
    from transformers import AutoTokenizer

    path = write_conll(tmp_path / "validation.txt", [[("good", "B-PER")], [("the", "O"), ("bad", "B-PLACE")]])
    rows = read_rows([str(path)], "validation", conll_columns=COLUMNS)
    with pytest.raises(DataError, match=r"validation.txt line 5 \(sentence 2\): word 2 \('bad'\) has tag 'B-PLACE'"):
        encode_token_classification(rows, AutoTokenizer.from_pretrained(tiny_bert), *COLUMNS, CONLL_TAGS, 32)


def test_default_tag_names_and_run_record_names(conll_data, tiny_bert, tmp_path):
    recipe = validate_recipe(token_recipe_doc(tiny_bert, conll_data, tmp_path / "run"))
    assert assemble.label_names(recipe) == CONLL_TAGS  # the sorted training tags
    named = validate_recipe(
        token_recipe_doc(tiny_bert, conll_data, tmp_path / "run")
        | {"data": {"train": str(conll_data), "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}}
    )
    assert assemble.label_names(named) == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
