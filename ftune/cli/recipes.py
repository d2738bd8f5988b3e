"""Commands that start from a recipe: train, validate, methods, compare, schema."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from ftune import launch
from ftune.cli.app import Overrides, command, err


@command
def train(
    recipe: Path,
    set_: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in output_dir.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a previous run in output_dir.")] = False,
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            help="Train on N processes on this machine (N GPUs, or N CPU "
            "processes): runs `accelerate launch --multi_gpu --num_processes N -m ftune "
            "train ...`.",
        ),
    ] = 1,
    allow_changed_data: Annotated[bool, typer.Option(help="Resume on changed data files (run.json notes it).")] = False,
) -> None:
    """Train a recipe; weights, metrics and a reproducible record go to its output_dir."""
    flags = {"resume": resume, "overwrite": overwrite, "allow_changed_data": allow_changed_data}
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # not inside a launch already
        raise typer.Exit(launch.launch(nproc, recipe, set_ or [], flags))
    from ftune.recipe import load_recipe
    from ftune.run.train import train as run_training

    result = run_training(load_recipe(recipe, set_ or []), console=err, **flags)
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        print(json.dumps(result, indent=2))


@command
def validate(
    recipe: Path,
    set_: Overrides = None,
    measure: Annotated[
        bool,
        typer.Option(
            help="Also run a few real training steps at the recipe's batch and "
            "length: measured peak memory and time per step beside the estimate."
        ),
    ] = False,
) -> None:
    """Dry run: print the resolved recipe, the trainable / total parameters and (on stderr) the memory a training
    step needs, estimated without training."""
    from ftune import assemble
    from ftune.estimate.report import estimate_recipe, render
    from ftune.estimate.simulate import NotSimulated
    from ftune.methods.base import count_parameters
    from ftune.methods.shrink import validate_lines
    from ftune.recipe import dump_recipe, load_recipe

    r = load_recipe(recipe, set_ or [])
    source, tokenizer = assemble.source_and_tokenizer(r)
    rows = assemble.read_split(r, "train")  # for the class names and the estimate's batch
    names = assemble.label_names(r, rows)
    model = assemble.build_model(r, source, tokenizer, names)
    trainable, total = count_parameters(model)
    print(dump_recipe(r), end="")
    print(
        f"# model source: {source}\n# trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    )
    for line in validate_lines(r, model, assemble.model_config):  # a recipe that drops blocks: blocks, speed-up
        print(f"# {line}")
    try:
        table, notes = render(estimate_recipe(r, model, tokenizer, names, rows, 3 if measure else None))
        err.print(table)
    except NotSimulated as why:  # an operation that needs the values of the data: no estimate, the recipe is fine
        notes = [f"memory estimate: not available for this model and method ({why})"]
    for line in notes:
        err.print(line, soft_wrap=True, markup=False, highlight=False)


@command
def methods(markdown: Annotated[bool, typer.Option(help="Print a Markdown table.")] = False) -> None:
    """List the registered fine-tuning methods."""
    from ftune.methods import METHODS

    if markdown:
        print("| method | what trains | recommended lr | paper |\n|---|---|---|---|")
    for m in METHODS.values():
        fields = ", ".join(
            f"{k}=" + ("<required>" if v.is_required() else _shown(v.get_default(call_default_factory=True)))
            for k, v in m.config_cls.model_fields.items()
            if k != "name"
        )
        lr = f"{m.about.recommended.lr:g}" if m.about.recommended else "-"
        print(
            f"| `{m.name}` | {m.about.summary} | {lr} | {m.about.paper} |"
            if markdown
            else f"{m.name:<14} {m.about.summary}  [{fields}]  recommended lr {lr}"
        )


def _shown(default) -> str:
    """A default as a recipe would write it; a hybrid's part as {name, options} without the part's own head flag."""
    if hasattr(default, "model_dump"):
        return repr(default.model_dump(exclude={"train_head"}))
    return repr(default)


@command
def compare(
    recipe: Path,
    methods: Annotated[
        str | None,
        typer.Option("--methods", help="Methods to compare, comma-separated, e.g. lora,adapter,prefix_tuning."),
    ] = None,
    every: Annotated[
        bool,
        typer.Option(
            "--all", help="Every registered method that applies to the recipe (the others are listed with the reason)."
        ),
    ] = False,
    budget: Annotated[
        str, typer.Option(help="Training per method: steps, epochs or seconds, e.g. 200steps, 1epoch, 600s.")
    ] = "200steps",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the runs (<out>/<method>), the table and the plot; default runs/compare-<recipe name>."
        ),
    ] = None,
    memory_limit: Annotated[
        str | None, typer.Option(help="Also recommend the best method within this peak memory, e.g. 2GB.")
    ] = None,
    evals: Annotated[
        int, typer.Option(min=1, help="Evaluations per run under a step budget (for the best-so-far column).")
    ] = 4,
    set_: Overrides = None,
) -> None:
    """Train several methods on one recipe's model, task and data, each with its recommended learning rate, on one
    budget; then a table (terminal, comparison.md, comparison.json), a Pareto plot and a recommendation. Finished runs
    are reused and an interrupted comparison resumes."""
    from rich.console import Console

    from ftune.compare.run import compare as run_compare
    from ftune.compare.table import rich_table

    folder = (out or Path("runs") / f"compare-{recipe.stem}").expanduser()
    result = run_compare(recipe, methods, every, budget, folder, set_ or [], evals, memory_limit, err)
    # a pipe or file has no width: 80 columns would cut every cell, so the table is printed at its natural width
    shown = Console() if Console().is_terminal else Console(width=240)
    if result.rows:
        shown.print(rich_table(result.rows, result.metric))
    for line in result.recommendation:
        shown.print(line, soft_wrap=True, highlight=False)
    err.print("written: " + ", ".join(str(f) for f in result.files), soft_wrap=True, highlight=False)
    if result.failed:
        raise typer.Exit(1)


@command
def schema() -> None:
    """Print the recipe's JSON schema (for editor completion of YAML recipes)."""
    from ftune.recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))
