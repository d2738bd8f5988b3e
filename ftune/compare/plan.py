"""What `ftune compare` runs: the methods, the budget, and one recipe per method.

Each method runs with its recommended settings (`Method.about.recommended`: the learning rate and any options, with
their source) on the recipe's model, task, data and other train settings (batch, schedule, seed, best_metric), for one
budget: N optimizer steps, N epochs, or N seconds of training (`train.max_seconds`; the schedule still spans the
recipe's steps or epochs, and stops wherever the time runs out). With a step budget the run is evaluated `evals` times
(default 4, evenly spaced) so the table has a best-so-far besides the final score; a run without `save_every` saves a
checkpoint at every evaluation, so an interrupted comparison resumes from there. Everything is checked here, before
anything is written.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ftune.errors import RecipeError
from ftune.methods import METHODS
from ftune.methods.base import Method, Trains
from ftune.recipe import Recipe, validate_recipe

UNITS = {
    "step": "steps",
    "steps": "steps",
    "epoch": "epochs",
    "epochs": "epochs",
    "s": "seconds",
    "sec": "seconds",
    "secs": "seconds",
    "second": "seconds",
    "seconds": "seconds",
}


@dataclass(frozen=True)
class Budget:
    """How long every method trains: `amount` optimizer steps, epochs, or seconds of training."""

    amount: float
    unit: Literal["steps", "epochs", "seconds"]

    def __str__(self) -> str:
        amount = int(self.amount) if self.amount == int(self.amount) else self.amount
        return f"{amount} {self.unit}"

    def train_fields(self, evals: int) -> dict[str, Any]:
        """The `train:` fields the budget sets."""
        if self.unit == "steps":
            steps = int(self.amount)
            return {"max_steps": steps, "eval_every": max(1, math.ceil(steps / evals))}
        if self.unit == "epochs":
            return {"epochs": self.amount, "max_steps": None}
        return {"max_seconds": self.amount}


def parse_budget(text: str) -> Budget:
    """`200steps`, `1epoch`, `0.5 epochs`, `600s` -> Budget; anything else, or zero, is a one-line RecipeError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", text.lower())
    example = "e.g. 200steps, 1epoch or 600s"
    if not match or match.group(2) not in UNITS:
        raise RecipeError(f"--budget {text!r}: expected a number and a unit (steps, epochs or s), {example}")
    amount, unit = float(match.group(1)), UNITS[match.group(2)]
    if amount <= 0:
        raise RecipeError(f"--budget {text!r}: must be above zero, {example}")
    if unit == "steps" and amount != int(amount):
        raise RecipeError(f"--budget {text!r}: optimizer steps are a whole number, {example}")
    return Budget(amount, unit)


SIZES = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str, option: str) -> int:
    """`2GB`, `1.5GiB`, `800MB` -> bytes (GB = 10^9 bytes, GiB = 2^30); anything else is a one-line RecipeError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", text.lower())
    if not match or match.group(2) not in SIZES or float(match.group(1)) <= 0:
        raise RecipeError(f"{option} {text!r}: expected a size above zero with a unit, e.g. 2GB, 1.5GiB or 800MB")
    return int(float(match.group(1)) * SIZES[match.group(2)])


def why_not_alone(method: Method) -> str | None:
    """Why a registered method cannot run by itself from its defaults (None when it can)."""
    if method.trains is Trains.NOTHING:
        return f"trains nothing itself: it is a part of a method list (e.g. [{{name: full}}, {{name: {method.name}}}])"
    needed = [name for name, field in method.config_cls.model_fields.items() if field.is_required()]
    if needed:
        what = (method.config_cls.model_fields[needed[0]].description or "no default").split(".")[0]
        return f"needs method.{needed[0]} from you ({what[0].lower() + what[1:]})"
    if method.about.recommended is None:
        return "has no recommended settings (Method.about.recommended)"
    return None


def chosen_methods(names: str | None, every: bool) -> tuple[list[str], dict[str, str]]:
    """(methods to run, {method: why it is left out}) from `--methods a,b` or `--all`."""
    if every == (names is not None):
        raise RecipeError("give --methods (e.g. --methods lora,adapter) or --all, not both and not neither")
    if every:
        left_out = {n: why for n, m in METHODS.items() if (why := why_not_alone(m))}
        return [n for n in METHODS if n not in left_out], left_out
    wanted = [n.strip() for n in names.split(",")]
    for name in wanted:
        if name not in METHODS:
            close = difflib.get_close_matches(name, list(METHODS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"--methods: unknown method {name!r}; {hint}known: {', '.join(METHODS)}")
        if (why := why_not_alone(METHODS[name])) is not None:
            raise RecipeError(f"--methods: {name} {why}; leave it out")
    if len(set(wanted)) < len(wanted):
        twice = next(n for n in wanted if wanted.count(n) > 1)
        raise RecipeError(f"--methods: {twice} is listed twice; name each method once")
    return wanted, {}


def method_recipe(base: Recipe, method: str, budget: Budget, out: Path, evals: int) -> Recipe:
    """The recipe `method` runs: `base` with the method's recommended settings, the budget, and `<out>/<method>`."""
    recommended = METHODS[method].about.recommended
    doc = copy.deepcopy(base.model_dump(mode="json"))
    doc["method"] = {"name": method, **recommended.options}
    train = doc["train"] | {"lr": recommended.lr} | budget.train_fields(evals)
    if train["save_every"] is None and train["eval_every"] is not None:
        train["save_every"] = train["eval_every"]  # an interrupted comparison resumes from the last evaluation
    doc["train"], doc["output_dir"] = train, str(out / method)
    return validate_recipe(doc, source=method)


def plan(
    base: Recipe, names: str | None, every: bool, budget: Budget, out: Path, evals: int = 4
) -> tuple[dict[str, Recipe], dict[str, str]]:
    """({method: its recipe}, {method: why it is left out}). A named method that does not apply to the recipe's
    task or model is a RecipeError; with `--all` it is left out with the reason."""
    if not base.data.validation:
        raise RecipeError("the recipe sets no data.validation: compare scores every method on it; add one")
    methods, left_out = chosen_methods(names, every)
    recipes = {}
    for name in methods:
        try:
            recipes[name] = method_recipe(base, name, budget, out, evals)
        except RecipeError as e:
            why = f"does not apply to this recipe: {str(e).removeprefix(f'{name}: ')}"
            if not every:
                raise RecipeError(f"--methods: {name} {why}") from None
            left_out[name] = why
    if not recipes:
        raise RecipeError("no method applies to this recipe: " + "; ".join(f"{n} {w}" for n, w in left_out.items()))
    return recipes, left_out
