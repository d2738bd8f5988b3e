"""Recipe in, components out: the one place (besides the loop) that reads a `Recipe` and unpacks it into the
plain arguments that `models`, `data` and `methods` take. `train`, `eval`, `merge` and `export` all build through
here, so a run rebuilt from its directory is the model that was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ftune import models
from ftune.data import loader, sources
from ftune.errors import ModelError, RecipeError, RunDirError
from ftune.methods import attach, method_of
from ftune.models import quantize
from ftune.recipe import Recipe, load_recipe
from ftune.run import checkpoint
from ftune.tasks import TASKS, Decoding, Encoded


def load_tokenizer(recipe: Recipe):
    """(resolved model source, tokenizer)."""
    spec = recipe.model
    source = models.resolve_model(spec.name, spec.gguf_file, spec.revision)
    return source, models.load_tokenizer(source, spec.trust_remote_code, spec.revision)


def label_names(recipe: Recipe, train_rows: sources.Rows | None = None) -> list[str] | None:
    """Class (tag) names: data.labels, else the training labels (read here when `train_rows` is not given); None for
    a task without classes."""
    task = TASKS[recipe.task]
    if not task.has_classes:
        return None
    if recipe.data.labels:
        return list(recipe.data.labels)
    return task.class_names(train_rows or read_split(recipe, "train"), recipe.data)


def eval_loader(recipe: Recipe, examples: list[dict[str, Any]], tokenizer):
    """Evaluation batches in data order, the same for `train` and `ftune eval`."""
    t = recipe.train
    return loader.make_loader(examples, t.eval_batch_size or 2 * t.batch_size, tokenizer.pad_token_id, t.seed,
                              shuffle=False)


def decoding(recipe: Recipe, tokenizer) -> Decoding | None:
    """What scoring needs besides the model for a task that generates text (the tokenizer and the recipe's
    generation settings); None for other tasks."""
    return Decoding(tokenizer, recipe.generation.model_dump()) if TASKS[recipe.task].generate else None


def build_model(recipe: Recipe, source: str, tokenizer, names: list[str] | None) -> nn.Module:
    """The base model with the recipe's method attached and exactly the method's parameters trainable."""
    spec = recipe.model
    model, missing = models.load_model(
        TASKS[recipe.task], source, spec.dtype, label_names=names, pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=spec.trust_remote_code, revision=spec.revision, quantization=spec.quantization,
    )
    if spec.quantization:  # fp32 norms and head; input grads for checkpointed segments
        quantize.prepare_for_training(model, recipe.train.gradient_checkpointing)
    head = models.head_parameters(model, TASKS[recipe.task], missing)
    return attach(model, recipe.method, head)


def read_split(recipe: Recipe, split: str, given: list[Any] | None = None) -> sources.Rows:
    """Rows of `split`: data.train or data.validation; any other split only from a recipe folder's `<split>.*`."""
    d = recipe.data
    limit = d.max_train_rows if split == "train" else d.max_validation_rows
    conll_columns = (d.tokens_column, d.tags_column) if TASKS[recipe.task].reads_conll else None
    return sources.read_rows(given or _split_sources(recipe, split), split, limit, conll_columns)


def _split_sources(recipe: Recipe, split: str) -> list[Any]:
    d = recipe.data
    if split == "train":
        return d.train
    if split == "validation":
        if not d.validation:
            raise RecipeError("--split validation: the recipe sets no data.validation; score a file with --data")
        return d.validation
    # never a file or Hub split named for another split: that would score the wrong rows under this name
    folders = [s for s in [*d.train, *(d.validation or [])] if isinstance(s, str) and Path(s).expanduser().is_dir()]
    if not folders:
        raise RecipeError(f"--split {split}: the recipe has no {split} split (only data.train and data.validation, "
                          f"no folder holding {split}.*); use one of those or score a file with --data")
    return folders


def encode(recipe: Recipe, rows: sources.Rows, tokenizer, names: list[str] | None) -> Encoded:
    task = TASKS[recipe.task]
    extra = {"config": model_config(recipe)} if task.encodes_with_config else {}
    return task.encode(rows, tokenizer, recipe.data, names, **extra)


def model_config(recipe: Recipe):
    """The base model's transformers config (read without loading weights), for a task that encodes with it."""
    from transformers import AutoConfig

    spec = recipe.model
    source = models.resolve_model(spec.name, spec.gguf_file, spec.revision)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model.name: cannot load the config of {source}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def build_extra_models(recipe: Recipe, needs: dict[str, str]) -> dict[str, nn.Module]:
    """The frozen models an objective reads (a teacher, a reference), by role: each a finished ftune run dir (its
    base with its method) or a model name (loaded for the recipe's task); in eval mode, without gradients, built once
    beside the trained model."""
    built = {}
    for role, where in needs.items():
        if (Path(where) / checkpoint.RECIPE).is_file():
            _, model, _ = load_run(where)
        else:
            model, _ = models.load_model(TASKS[recipe.task], models.resolve_model(where),
                                         trust_remote_code=recipe.model.trust_remote_code)
        built[role] = model.eval().requires_grad_(False)
    return built


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's run.json (RunDirError when it is missing or unreadable)."""
    path = Path(run_dir) / checkpoint.RUN
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing; not a finished ftune run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: cannot be read ({type(e).__name__}); was the run interrupted?") from None
    if not isinstance(record, dict) or "label_names" not in record:
        raise RunDirError(f"{path}: not an ftune run record (no label_names)")
    return record


def load_run(run_dir: str | Path):
    """Rebuild (recipe, model with trained method weights, tokenizer) from a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / checkpoint.RECIPE).is_file() or not (run_dir / checkpoint.WEIGHTS).is_file():
        raise RunDirError(f"{run_dir}: not a finished ftune run (needs {checkpoint.RECIPE} and {checkpoint.WEIGHTS})")
    recipe = load_recipe(run_dir / checkpoint.RECIPE, stored=True)
    run = read_run_record(run_dir)
    tokenizer = models.load_tokenizer(str(run_dir / checkpoint.TOKENIZER))
    source = models.resolve_model(recipe.model.name, recipe.model.gguf_file, recipe.model.revision)
    model = build_model(recipe, source, tokenizer, run["label_names"])
    fold = method_of(recipe.method).fold
    if fold:  # method.safetensors holds what the reparameterisation produced, not the reparameterisation
        fold(model)
    checkpoint.load_weights(run_dir, model)
    model.eval()
    return recipe, model, tokenizer
