"""Recipe in, components out: the one place (besides the loop) that reads a `Recipe` and unpacks it into the
plain arguments that `models`, `data` and `methods` take. `train`, `eval`, `merge` and `export` all build through
here, so a run rebuilt from its directory is the model that was trained.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from ftune import models, rundir
from ftune.data import encoded_cache, holdout, loader, sources
from ftune.errors import ModelError, RecipeError, RunDirError
from ftune.methods import attach, method_of
from ftune.models import quantize
from ftune.objectives import OBJECTIVES, Bound, Trained, trained_task
from ftune.objectives.base import OtherRun, TrainingData
from ftune.recipe import Recipe, load_recipe
from ftune.tasks import TASKS, Decoding, Encoded, Task, checks


def recipe_task(recipe: Recipe) -> Task:
    """The recipe's task as its objective trains it (a reward model reads preference pairs through a one-output
    head: Objective.shape_task): the record every build and score of the run asks."""
    return trained_task(OBJECTIVES[recipe.objective.name], recipe.objective, TASKS[recipe.task])


def trained(
    recipe: Recipe, model: nn.Module, tokenizer, device, precision: str, names: list[str] | None = None
) -> Trained:
    """What an objective may read of the model being trained (`model` as the method's `attach` returned it): the
    model, its method, and a loader of the bare base (a reference for preference objectives)."""
    return Trained(
        model=model,
        method=method_of(recipe.method),
        device=device,
        precision=precision,
        pad_token_id=tokenizer.pad_token_id,
        load_base=lambda: base_model(recipe, tokenizer, names),
    )


class BoundObjective(NamedTuple):
    bound: Bound
    examples: list[dict[str, Any]] | None
    """The training examples with the objective's per-example values added (None when none were given)."""
    extra: dict[str, nn.Module]
    """The frozen models the objective reads (a teacher), on the device."""


def bind_objective(
    recipe: Recipe,
    model: nn.Module,
    tokenizer,
    device,
    precision: str = "fp32",
    names: list[str] | None = None,
    *,
    task: Task | None = None,
    examples: list[dict[str, Any]] | None = None,
    rows: sources.Rows | None = None,
) -> BoundObjective:
    """The recipe's objective bound to `model` (as the method's `attach` returned it): the one place an objective is
    bound, for training (ftune/run/setup.py), its memory estimate (ftune/estimate/step.py) and scoring a finished
    run. Its extra models are built on `device`. Given training `examples` (and the `rows` they were encoded from;
    read from data.train when needed and not given), the objective's `prepare` checks them and adds its values per
    example. `task`: the task as the loss reads it (default `recipe_task`; training passes the hidden-state route
    where it is exact: kernels.linear_ce.training_task)."""
    objective = OBJECTIVES[recipe.objective.name]
    extra = {
        role: m.to(device)
        for role, m in build_extra_models(recipe, objective.extra_models(recipe.objective), names).items()
    }
    model_in_training = trained(recipe, model, tokenizer, device, precision, names)
    if objective.prepare and examples is not None:  # checks against the data, values its loss reads per example
        data = training_data(
            recipe,
            rows if rows is not None else read_split(recipe, "train"),
            examples,
            tokenizer,
            names,
            device,
            model_in_training,
        )
        fields = objective.prepare(recipe.objective, recipe_task(recipe), data, extra)
        if fields:
            examples = [e | f for e, f in zip(examples, fields, strict=True)]
    bound = objective.bind(recipe.objective, task or recipe_task(recipe), extra, model_in_training)
    return BoundObjective(bound, examples, extra)


def training_data(
    recipe: Recipe,
    rows: sources.Rows,
    examples: list[dict[str, Any]],
    tokenizer,
    names: list[str] | None,
    device,
    model_in_training: Trained | None = None,
) -> TrainingData:
    """What an objective's `prepare` reads, with the builders it may need (bound to this recipe)."""
    return TrainingData(
        rows=rows,
        examples=examples,
        tokenizer=tokenizer,
        label_names=names,
        device=device,
        encode=lambda other_rows, other_tokenizer: encode_rows(recipe, other_rows, other_tokenizer, names).examples,
        load_model=lambda role, where: build_extra_models(recipe, {role: where}, names)[role],
        open_run=lambda path: other_run(path, recipe.model.trust_remote_code),
        trust_remote_code=recipe.model.trust_remote_code,
        trained=model_in_training,
    )


def other_run(run_dir: Path, trust_remote_code: bool = False) -> OtherRun:
    """A finished run as an objective reads it (a teacher): its task, classes, tokenizer and defining files."""
    recipe, record = stored_recipe(run_dir, trust_remote_code)
    m = recipe.model
    base = models.resolve_model(m.name, m.gguf_file, m.revision)
    return OtherRun(
        recipe.task,
        record.label_names,
        run_tokenizer(run_dir, recipe, base),
        [rundir.recipe_file(run_dir), rundir.weights_file(run_dir)],
        [rundir.tokenizer_dir(run_dir), Path(base)],
    )


def base_model(recipe: Recipe, tokenizer, names: list[str] | None = None) -> nn.Module:
    """A fresh copy of the base model the recipe trains, without its method: frozen, in eval mode."""
    spec = recipe.model
    model, _ = models.load_model(
        recipe_task(recipe),
        models.resolve_model(spec.name, spec.gguf_file, spec.revision),
        spec.dtype,
        label_names=names,
        pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=spec.trust_remote_code,
        revision=spec.revision,
    )
    return model.eval().requires_grad_(False)


def source_and_tokenizer(recipe: Recipe):
    """(resolved model source, tokenizer)."""
    spec = recipe.model
    source = models.resolve_model(spec.name, spec.gguf_file, spec.revision)
    return source, models.load_tokenizer(source, spec.trust_remote_code, spec.revision)


def label_names(recipe: Recipe, train_rows: sources.Rows | None = None) -> list[str] | None:
    """Class (tag) names: data.labels, else the training labels (read here when `train_rows` is not given); None for
    a task without classes."""
    task = recipe_task(recipe)
    if not task.has_classes:
        return None
    if recipe.data.labels:
        return list(recipe.data.labels)
    return task.class_names(train_rows or read_split(recipe, "train"), recipe.data)


def eval_loader(recipe: Recipe, examples: list[dict[str, Any]], tokenizer):
    """Evaluation batches, the same for `train` and `ftune eval`: the rows sorted longest first (stable), so a batch
    pads little (about half the tokens of data order on SST-2) and the widest batch, the peak, comes first. Every
    metric is a sum or a statistic over all rows, so the order changes no score."""
    t = recipe.train
    examples = sorted(examples, key=loader.example_length, reverse=True)
    return loader.make_loader(
        examples, t.eval_batch_size or 2 * t.batch_size, tokenizer.pad_token_id, t.seed, shuffle=False
    )


def decoding(recipe: Recipe, tokenizer) -> Decoding | None:
    """What scoring needs besides the model for a task that generates text (the tokenizer and the recipe's
    generation settings); None for other tasks."""
    return Decoding(tokenizer, recipe.generation.model_dump()) if TASKS[recipe.task].generate else None


def build_model(recipe: Recipe, source: str, tokenizer, names: list[str] | None) -> nn.Module:
    """The base model with the recipe's method attached and exactly the method's parameters trainable."""
    spec = recipe.model
    model, missing = models.load_model(
        recipe_task(recipe),
        source,
        spec.dtype,
        label_names=names,
        pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=spec.trust_remote_code,
        revision=spec.revision,
        quantization=spec.quantization,
    )
    if spec.quantization:  # fp32 norms and head; input grads for checkpointed segments
        quantize.prepare_for_training(model, recipe.train.gradient_checkpointing)
    head = models.head_parameters(model, recipe_task(recipe), missing)
    return attach(model, recipe.method, head)


def read_split(recipe: Recipe, split: str, given: list[Any] | None = None) -> sources.Rows:
    """Rows of `split`: data.train or data.validation (or, with data.validation_fraction, the two parts of
    data.train); any other split only from a recipe folder's `<split>.*`."""
    d = recipe.data
    limit = d.max_train_rows if split == "train" else d.max_validation_rows
    task = TASKS[recipe.task]
    conll_columns = (d.tokens_column, d.tags_column) if task.reads_conll else None
    if d.validation_fraction and not given and split in ("train", "validation"):
        rows = sources.read_rows(d.train, "train", d.max_train_rows, conll_columns)
        group = (lambda row: task.holdout_group(row, d)) if task.holdout_group else holdout.row_key
        return holdout.split(
            rows,
            d.validation_fraction,
            group,
            split == "validation",
            d.max_validation_rows if split == "validation" else None,
        )
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
        raise RecipeError(
            f"--split {split}: the recipe has no {split} split (only data.train and data.validation, "
            f"no folder holding {split}.*); use one of those or score a file with --data"
        )
    return folders


def encode_rows(recipe: Recipe, rows: sources.Rows, tokenizer, names: list[str] | None) -> Encoded:
    task = TASKS[recipe.task]
    extra = {"config": model_config(recipe)} if task.encodes_with_config else {}
    return task.encode(rows, tokenizer, recipe.data, names, **extra)


def encoded_splits(recipe: Recipe, tokenizer) -> tuple[encoded_cache.Splits, str]:
    """(label names, encoded training split, encoded validation split or None) and a note for the console, one line
    per fact: read from the encoded-data cache when this data, tokenizer and encoding were seen before (data.cache),
    else read, encoded and cached (ftune/data/encoded_cache.py); then checked either way (ftune/tasks/checks.py:
    a DataError for data that cannot be trained on as the recipe says, and a line for each thing cut or dropped)."""
    splits, note = _encoded_splits(recipe, tokenizer)
    return splits, "\n".join([note, *checks.check_splits(TASKS[recipe.task], recipe.data, *splits)])


def _encoded_splits(recipe: Recipe, tokenizer) -> tuple[encoded_cache.Splits, str]:
    d, task = recipe.data, TASKS[recipe.task]

    def build() -> encoded_cache.Splits:
        rows = read_split(recipe, "train")
        names = label_names(recipe, rows)
        held_out = d.validation or d.validation_fraction
        return (
            names,
            encode_rows(recipe, rows, tokenizer, names),
            encode_rows(recipe, read_split(recipe, "validation"), tokenizer, names) if held_out else None,
        )

    if not d.cache:
        return build(), "encoded (data.cache: false)"
    config = model_config(recipe).to_json_string() if task.encodes_with_config else None
    settings = {"task": recipe.task, "objective": recipe.objective.model_dump(mode="json"), "config": config}
    task_file = Path(inspect.getsourcefile(task.encode))
    return encoded_cache.load_or_build(
        encoded_cache.identity(d, task_file, task.reads_conll, tokenizer, settings), build
    )


def model_config(recipe: Recipe):
    """The base model's transformers config (read without loading weights), for a task that encodes with it."""
    from transformers import AutoConfig

    spec = recipe.model
    source = models.resolve_model(spec.name, spec.gguf_file, spec.revision)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(
            f"model.name: cannot load the config of {source}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
        ) from None


def build_extra_models(recipe: Recipe, needs: dict[str, str], names: list[str] | None = None) -> dict[str, nn.Module]:
    """The frozen models an objective reads (a teacher, a reference), by role (the objective's field that names
    it): each a finished ftune run dir (its base with its method) or a model name (loaded for the recipe's task, with
    a head for `names`, the run's classes); in eval mode, without gradients, built once beside the trained model."""
    import torch

    built = {}
    for role, where in needs.items():
        # a fresh head's initialisation draws nothing from the run's generator: the same dropout masks follow,
        # whether a teacher was built or its outputs read from a cache
        with torch.random.fork_rng(devices=[]):
            if (Path(where).expanduser() / rundir.RECORD).is_file():
                _, model, _ = load_run(Path(where).expanduser(), recipe.model.trust_remote_code)
            else:
                model = _named_extra_model(recipe, role, where, names)
        built[role] = model.eval().requires_grad_(False)
    return built


def _named_extra_model(recipe: Recipe, role: str, where: str, names: list[str] | None) -> nn.Module:
    """A model named by folder or Hub id, used as it is: every weight must come from its checkpoint (a frozen model
    with a freshly initialised head would be noise)."""
    if models.missing_folder(where):
        raise ModelError(f"objective.{role}: {where}: no such run directory or model folder")
    try:
        model, missing = models.load_model(
            recipe_task(recipe),
            models.resolve_model(where),
            label_names=names,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except ModelError as e:
        raise ModelError(
            f"objective.{role}: {where} is neither a finished ftune run directory (no "
            f"{rundir.RECORD}) nor a loadable model ({str(e).removeprefix('model.name: ')})"
        ) from None
    if missing:
        missing = sorted(missing)
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise ModelError(
            f"objective.{role}: {where} has no trained weights for {', '.join(missing[:4])}{more}; give "
            f"a finished ftune run directory or a model already fine-tuned for {recipe.task}"
        )
    return model


def stored_recipe(run_dir: str | Path, trust_remote_code: bool = False) -> tuple[Recipe, rundir.RunRecord]:
    """A finished run's (recipe, record), read as data: the run must not be training now; a run never enables remote
    code itself (`trust_remote_code` is the caller's own consent: a command-line flag, or the recipe being trained);
    its base model is the one the record says was used, and never a folder inside the run."""
    run_dir = Path(run_dir)
    record = rundir.finished(run_dir)
    recipe = load_recipe(rundir.recipe_file(run_dir), stored=True)
    spec = recipe.model
    if spec.trust_remote_code and not trust_remote_code:
        raise RunDirError(
            f"{run_dir}: trained with model.trust_remote_code: true, so loading it runs code from "
            f"{spec.name}; a run never allows that by itself: pass --trust-remote-code if you trust it"
        )
    recorded = record.model_source
    for where in (spec.name, recorded):
        if where and _lies_in(Path(where).expanduser(), run_dir):
            raise RunDirError(
                f"{run_dir}: its base model {where} lies inside the run directory; a run's base model "
                "is read from outside it (a run is data, not code)"
            )
    if recorded and Path(recorded).expanduser().is_dir():  # the folder it was trained from (a GGUF already converted)
        spec = spec.model_copy(update={"name": recorded, "gguf_file": None})
    spec = spec.model_copy(update={"trust_remote_code": spec.trust_remote_code and trust_remote_code})
    return recipe.model_copy(update={"model": spec}), record


def _lies_in(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def run_tokenizer(run_dir: Path, recipe: Recipe, source: str):
    """The run's tokenizer, read as data: never with code from the run directory. One that needs code (its
    tokenizer_config.json names an auto_map: a model trusted with --trust-remote-code) comes from the base model's
    own folder, whose code the flag consents to; the run saved that very tokenizer."""
    folder = rundir.tokenizer_dir(run_dir)
    spec = recipe.model
    config = rundir.read_json(folder, "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if spec.trust_remote_code and "auto_map" in config:
        return models.load_tokenizer(source, True, spec.revision)
    return models.load_tokenizer(str(folder), False)


def load_run(run_dir: str | Path, trust_remote_code: bool = False):
    """Rebuild (recipe, model with trained method weights, tokenizer) from a run directory (`stored_recipe`)."""
    run_dir = Path(run_dir)
    recipe, record = stored_recipe(run_dir, trust_remote_code)
    source = models.resolve_model(recipe.model.name, recipe.model.gguf_file, recipe.model.revision)
    tokenizer = run_tokenizer(run_dir, recipe, source)
    model = build_model(recipe, source, tokenizer, record.label_names)
    fold = method_of(recipe.method).saving.fold
    if fold:  # method.safetensors holds what the reparameterisation produced, not the reparameterisation
        fold(model)
    rundir.load_weights(run_dir, model)
    model.eval()
    return recipe, model, tokenizer
