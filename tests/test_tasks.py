"""The task and objective registries: one file each, kept in sync with the registry and the recipe; every task
encodes, collates, computes its (sum, count) loss and scores on a tiny model; nothing outside ftune/tasks/ asks which
task a recipe names."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch

from conftest import pref_recipe_doc, recipe_doc, s2s_recipe_doc, token_recipe_doc
from ftune import assemble
from ftune.data.loader import collate
from ftune.objectives import OBJECTIVES
from ftune.recipe import Recipe, validate_recipe
from ftune.tasks import IGNORE_INDEX, TASKS

PACKAGE = Path(__file__).parents[1] / "ftune"


SUPPORT = {"__init__", "base", "checks", "teacher"}
"""Files of the registry packages that are no entry: the record, the task's data checks, distillation's teacher."""


def _files(folder: str) -> set[str]:
    return {p.stem for p in (PACKAGE / folder).glob("*.py")} - SUPPORT


def test_task_registry_matches_files_and_recipe():
    assert _files("tasks") == set(TASKS) == set(typing.get_args(Recipe.model_fields["task"].annotation))
    for name, task in TASKS.items():
        assert task.name == name


def test_objective_registry_matches_files():
    files = _files("objectives")
    modules = {o.bind.__module__.rpartition(".")[2] for o in OBJECTIVES.values()}
    assert files == modules


def test_no_task_dispatch_outside_the_task_files():
    """A task's name appears in the code only in its own file (the registry key); everything else asks the record."""
    names = "|".join(TASKS)
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "tasks":
            continue
        found = re.findall(rf"[\"']({names})[\"']|task\s*[=!]=\s*[\"']", path.read_text())
        assert not found, (path.relative_to(PACKAGE), found)


@pytest.fixture()
def recipes(
    tiny_bert, tiny_llama, tiny_t5, cls_data, sft_data, conll_data, s2s_data, pref_data, tmp_path
) -> dict[str, Recipe]:
    docs = {
        "sequence_classification": recipe_doc("cls", tiny_bert, cls_data, tmp_path / "a"),
        "causal_lm": recipe_doc("sft", tiny_llama, sft_data, tmp_path / "b"),
        "token_classification": token_recipe_doc(tiny_bert, conll_data, tmp_path / "c"),
        "seq2seq": s2s_recipe_doc(tiny_t5, s2s_data, tmp_path / "d"),
        "preference": pref_recipe_doc(tiny_llama, pref_data, tmp_path / "e", {"name": "task"}),
    }
    assert docs.keys() == TASKS.keys()  # a new task needs a recipe here
    return {name: validate_recipe(doc) for name, doc in docs.items()}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_trains_and_scores(name, recipes):
    recipe, task = recipes[name], TASKS[name]
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    rows = assemble.read_split(recipe, "train")
    names = assemble.label_names(recipe, rows)
    assert (names is None) == (not task.has_classes)
    encoded = assemble.encode_rows(recipe, rows, tokenizer, names)
    batch = collate(tokenizer.pad_token_id)(encoded.examples[:4])
    model = assemble.build_model(recipe, source, tokenizer, names)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    total, count = task.loss(logits, labels)
    assert count == task.count(labels) > 0
    assert torch.isfinite(total) and total.dim() == 0
    total.backward()  # a gradient reaches what trains
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    scorer = task.scorer(names)
    scorer.add(logits.detach().float(), labels)
    other = task.scorer(names)
    other.add(logits.detach().float(), labels)
    scorer.merge(other)  # two processes' halves
    metrics = scorer.result()
    assert metrics["loss"] == pytest.approx(float(total) / float(count), rel=1e-5)
    if task.predict_row:
        row = task.predict_row(logits[0].detach(), names)
        assert row["label"] in names
    assert (labels == IGNORE_INDEX).any() == (labels.dim() == 2)  # per-token tasks mask some positions
