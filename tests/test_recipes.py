"""Recipes are documentation and fixtures: every shipped recipe validates and opens with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftune.methods import METHODS
from ftune.recipe import load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.method.name in METHODS


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_starts_with_its_command(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"ftune train recipes/{path.name}" in line for line in header[:4]), (
        "first comment lines must show the command"
    )


def _names(cfg) -> set[str]:
    """The method and, for a method list, its parts (l2sp is only ever a part)."""
    return {cfg.name}.union(*(_names(part) for part in getattr(cfg, "methods", [])))


def test_every_method_has_a_recipe():
    used = set().union(*(_names(load_recipe(p).method) for p in RECIPES))
    assert used == set(METHODS)


def test_overrides_are_validated_like_the_file():
    recipe = load_recipe(RECIPES[0], ["train.lr=3e-4", "train.batch_size=4"])
    assert recipe.train.lr == 3e-4 and recipe.train.batch_size == 4
