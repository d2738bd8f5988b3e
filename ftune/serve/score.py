"""`ftune eval`: a run scored on a split of its recipe's data or on a file, under the precision it trained with;
several runs scored in turn, hot-swapped on one loaded base where their method allows it (ftune/serve/hotswap.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ftune import assemble, rundir
from ftune.errors import DataError
from ftune.objectives import OBJECTIVES
from ftune.recipe import Recipe
from ftune.serve.hotswap import load_bank, read_recipes, swappable


def score(
    recipe: Recipe,
    model: nn.Module,
    tokenizer,
    names: list[str] | None,
    split: str,
    data: str | None,
    note: Callable[[str], None] = lambda _: None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """`ftune eval` for one model: {"source", metrics...} on a split of the recipe's data, or on a file, under the
    mixed precision the run trained with (run.json's `precision`), as its evaluations during training were."""
    from ftune.run.evaluate import evaluate
    from ftune.tasks import TASKS
    from ftune.tasks.checks import unscored

    if data and not Path(data).exists():
        raise DataError(f"--data: {data} does not exist")
    rows = assemble.read_split(recipe, split, [data] if data else None)
    encoded = assemble.encode_rows(recipe, rows, tokenizer, names)
    for line in unscored(encoded, len(rows.rows), recipe.data, TASKS[recipe.task]):  # rows dropped, then cut
        note(line)
    loader = assemble.eval_loader(recipe, encoded.examples, tokenizer)
    device = next(model.parameters()).device
    # an objective with its own metrics (DPO's rewards, which need the reference) is bound on the loaded model
    own = OBJECTIVES[recipe.objective.name].own_metrics
    objective = (
        assemble.bind_objective(recipe, model, tokenizer, device, precision, names).bound.evaluation if own else None
    )
    metrics = evaluate(
        model,
        loader,
        assemble.recipe_task(recipe),
        names,
        device,
        precision,
        decoding=assemble.decoding(recipe, tokenizer),
        objective=objective,
    )
    return {"source": rows.source, **metrics}


def score_runs(
    run_dirs: list[Path],
    split: str,
    data: str | None,
    note: Callable[[str], None] = lambda _: None,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """Score each run: hot-swapped on one loaded base for a mergeable method, else each run loaded in turn."""
    run_dirs = [Path(r) for r in run_dirs]
    recipes = read_recipes(run_dirs, trust_remote_code)
    # an objective scoring with the base beside the run (DPO's reference: the method switched off) needs the
    # method unmerged, which a swapped-in run is not: such runs are loaded in turn
    own_metrics = any(OBJECTIVES[r.objective.name].own_metrics for r in recipes)
    if swappable(recipes) and not own_metrics:
        bank = load_bank(run_dirs, recipes, trust_remote_code)
        results = []
        for i, (run, recipe) in enumerate(zip(run_dirs, recipes)):
            with bank.active(i) as model:
                results.append(
                    {
                        "run": str(run),
                        **score(
                            recipe,
                            model,
                            bank.tokenizer,
                            bank.label_names[i],
                            split,
                            data,
                            note,
                            trained_precision(run),
                        ),
                    }
                )
        bank.restore_base()
        return results
    results = []
    for run in run_dirs:
        recipe, model, tokenizer = assemble.load_run(run, trust_remote_code)
        names = rundir.read_record(run).label_names
        results.append(
            {"run": str(run), **score(recipe, model, tokenizer, names, split, data, note, trained_precision(run))}
        )
    return results


def trained_precision(run_dir: str | Path) -> str:
    """The mixed precision a run trained (and evaluated) with, from run.json."""
    return rundir.read_record(run_dir).precision
