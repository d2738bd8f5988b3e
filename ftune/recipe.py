"""The recipe: one YAML file, validated once here (pydantic v2), then passed on as plain typed values.

Every section rejects unknown keys with a did-you-mean, coerces scalars (`lr: 3e-4` arrives from YAML as a string),
and `--set dotted.key=value` overrides go through the same validation as the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ftune import recipe_yaml
from ftune.errors import RecipeError
from ftune.methods import METHODS, AnyMethodConfig, method_of
from ftune.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, AnyObjectiveConfig
from ftune.recipe_errors import explain, shown
from ftune.recipe_sections import (  # noqa: F401  (the sections are the recipe's API too)
    DataSpec,
    GenerationSpec,
    HubSource,
    ModelSpec,
    TaskName,
    TrainSpec,
    _Section,
)
from ftune.recipe_yaml import kind_of, one_line
from ftune.tasks import TASKS


class Recipe(_Section):
    model: ModelSpec
    task: TaskName
    """What the model learns: sequence_classification, token_classification (a tag per word, e.g. NER),
    causal_lm (SFT), seq2seq (source text to target text, e.g. summarisation) or preference (prompt, chosen,
    rejected: reward models and DPO); one file each in ftune/tasks/."""
    data: DataSpec
    method: AnyMethodConfig
    """One method section, or a list of them to apply together (e.g. lora and bitfit; see methods/compose.py)."""
    objective: AnyObjectiveConfig = DEFAULT_OBJECTIVE
    """What training minimises; default the task's own loss (ftune/objectives/)."""
    train: TrainSpec = TrainSpec()
    generation: GenerationSpec = GenerationSpec()
    """Generation settings of tasks that generate text (seq2seq): validation metrics and `ftune predict`."""
    output_dir: str
    """Run directory; refuses one that holds another run unless --overwrite."""

    @field_validator("method", mode="before")
    @classmethod
    def _list_composes(cls, value: Any) -> Any:
        if isinstance(value, list):
            return value[0] if len(value) == 1 else {"name": "compose", "methods": value}
        return value

    @field_validator("output_dir")
    @classmethod
    def _own_directory(cls, value: str, info: ValidationInfo) -> str:
        # --overwrite deletes a run dir: never let that be the filesystem root or the folder the user works in
        if not value.strip():
            raise ValueError("is empty; name a new directory for the run, e.g. runs/my-run")
        if len(value) > 4096:  # Linux's PATH_MAX; resolving a path far longer costs seconds before the OS refuses it
            raise ValueError(
                f"is {len(value):,} characters long, longer than any usable path; name a new directory "
                "for the run, e.g. runs/my-run"
            )
        try:
            path = Path(value).expanduser().resolve()
            cwd, home = Path.cwd().resolve(), Path.home().resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"is not a usable path ({type(e).__name__})") from None
        for folder, what in ((Path(path.anchor), "the filesystem root"), (home, "your home directory")):
            if path == folder:
                raise ValueError(f"{shown(value)} is {what}; name a new directory for the run, e.g. runs/my-run")
        # a stored recipe (eval, merge, export of a finished run) only names where the run was written
        if path == cwd and not (info.context or {}).get("stored"):
            raise ValueError(
                f"{shown(value)} is the current directory; name a new directory for the run, e.g. runs/my-run"
            )
        # every consumer writes where the checks looked: `~/runs/x` is $HOME/runs/x, never a folder named `~` here
        return str(Path(value).expanduser()) if value.startswith("~") else value

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        if self.train.best_metric and not (self.data.validation or self.data.validation_fraction):
            raise ValueError("train.best_metric needs data.validation (or data.validation_fraction) to score against")
        if self.data.packing and not TASKS[self.task].packs:
            packing = ", ".join(name for name, task in TASKS.items() if task.packs)
            raise ValueError(
                f"data.packing: task {self.task} cannot put several examples in one row (only "
                f"{packing}); set data.packing: false"
            )
        if self.data.validation and self.data.validation_fraction:
            raise ValueError("data.validation_fraction: holds out training rows instead of data.validation; set one")
        method = method_of(self.method)
        objective = OBJECTIVES[self.objective.name]
        if objective.check:  # a combination the objective cannot train: no pairs, a reference it cannot make
            objective.check(self.objective, TASKS[self.task], method)
        if self.train.gradient_checkpointing and not method.runs_with.gradient_checkpointing:
            raise ValueError(
                f"train.gradient_checkpointing: {method.name} keeps per-layer key/value prefixes in "
                "the attention cache, which recomputation in backward would extend twice; set it to false"
            )
        if self.model.quantization and not method.runs_with.quantized_base:
            fit = ", ".join(n for n, m in METHODS.items() if m.runs_with.quantized_base)
            raise ValueError(
                f"model.quantization: {method.name} trains weights inside the quantised base linears, "
                f"which cannot be updated; use a method that trains outside them ({fit}) or drop it"
            )
        return self


def load_recipe(path: str | Path, overrides: list[str] = (), *, stored: bool = False) -> Recipe:
    """Read a YAML recipe, apply `dotted.key=value` overrides, and validate it (RecipeError on any problem).

    `stored`: the recipe.yaml of a finished run (eval, merge, export), whose output_dir is where the run already is.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    doc = recipe_yaml.parse(recipe_yaml.read_text(path), str(path))  # bounded; duplicate keys refused
    if doc is None:
        raise RecipeError(f"{path}: is empty; a recipe is a YAML mapping (model:, task:, data:, method:, ...)")
    if not isinstance(doc, dict):
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping (model:, task:, data:, method:, ...), not a {kind_of(doc)}"
        )
    for item in overrides:
        _set_dotted(doc, item)
    return validate_recipe(doc, source=str(path), stored=stored)


def validate_recipe(doc: dict[str, Any], source: str = "recipe", *, stored: bool = False) -> Recipe:
    """Validate a parsed recipe document; any problem is a one-line RecipeError naming the field."""
    if not isinstance(doc, dict):
        raise RecipeError(
            f"{source}: a recipe is a YAML mapping (model:, task:, data:, method:, ...), not a {kind_of(doc)}"
        )
    try:
        return Recipe.model_validate(doc, context={"stored": stored})
    except ValidationError as e:
        # a value that fits no member of a union yields one error per member: the structural ones say most
        errors = sorted(e.errors(), key=lambda err: _RANK.get(err["type"], 2))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RecipeError(one_line(f"{source}: {explain(errors[0], doc, Recipe)}{more}")) from None
    except RecursionError:  # a document built in Python that contains itself; the YAML reader refuses both
        raise RecipeError(f"{source}: a value refers to itself or nests too deep") from None


_RANK = {"union_tag_invalid": 0, "extra_forbidden": 0, "missing": 1}


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _set_dotted(doc: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    *parents, leaf = key.split(".")
    named = one_line(key) if len(key) <= 80 else shown(key)  # a key is shown on one line, whatever it holds
    if not sep or not all(parents) or not leaf:
        raise RecipeError(f"--set {shown(item)}: expected dotted.key=value, e.g. --set train.lr=3e-4")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {named}: {shown(part)} is not a section")
    node[leaf] = recipe_yaml.parse(raw, f"--set {named} (value {shown(raw)})", lines=False) if raw else ""
