"""What the data-check tests share (tests/test_data_checks*.py): the case environment Env (recipes of every task
family on the tiny models and data, written into the case's own folder, with its `env` fixture) and the writers of
data with a mistake in it (a single class, identical preference pairs, prompts longer than data.max_length).

A test module binds the fixture as a module attribute (`env = data_check_helpers.env`): pytest finds fixtures in the
module, and an import would read as unused to the linter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import pref_recipe_doc, recipe_doc, s2s_recipe_doc, token_recipe_doc, write_recipe


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


@pytest.fixture
def env(tiny_bert, tiny_llama, tiny_t5, cls_data, sft_data, pref_data, conll_data, s2s_data, tmp_path) -> Env:
    data = {"cls": cls_data, "sft": sft_data, "pref": pref_data, "conll": conll_data, "s2s": s2s_data}
    return Env(tiny_bert, tiny_llama, tiny_t5, data, tmp_path)
