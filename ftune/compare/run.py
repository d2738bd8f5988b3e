"""Runs a comparison: each planned method in turn, in its own process (worker.py), reusing what is already done.

A method's run directory is `<out>/<method>`, and the recipe it runs is written to `<out>/recipes/<method>.yaml`
(`ftune train` on it reruns that method alone). Before anything is started, every run directory is checked:
    finished (metrics.json, same recipe)      reused; only measured again if compare.json lacks the forward timing
    interrupted (same recipe, a checkpoint)   resumed (`train --resume`), not trained again from the start
    started, no checkpoint yet (same recipe)  started again
    absent or empty                           started
    another recipe or budget, not a run       refused (RunDirError), with nothing written
The methods run one after another: on one machine several at once would share its processors or GPU and distort
each other's timings (on several GPUs, run one `ftune compare --methods ...` per GPU with CUDA_VISIBLE_DEVICES set
and the same --out: each reuses what the others finished).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from ftune import rundir
from ftune.compare import plan as planning
from ftune.compare import table
from ftune.compare.worker import REFUSED
from ftune.errors import RunDirError
from ftune.recipe import Recipe, dump_recipe, load_recipe

ACTIONS = {
    "fresh": ("training", []),
    "restart": ("training again (no checkpoint was saved)", ["--overwrite"]),
    "resume": ("resuming from its last checkpoint", ["--resume"]),
    "measure": ("timing a forward", ["--measure-only"]),
    "reuse": ("finished before: reused", None),
}


@dataclass
class Comparison:
    """What `ftune compare` ran and measured: the table's rows, left-out and failed methods, the files written."""

    rows: list[dict]
    metric: str
    """The metric the rows are ranked by (`final_<metric>`, `best_<metric>`)."""
    left_out: dict[str, str]
    failed: dict[str, str]
    recommendation: list[str]
    files: list[Path] = field(default_factory=list)


def state_of(run_dir: Path, recipe_yaml: str) -> str:
    """One of ACTIONS' keys, or RunDirError for a directory this comparison must not touch."""
    if run_dir.is_dir() and rundir.is_empty(run_dir) or not run_dir.exists():
        return "fresh"
    if not run_dir.is_dir() or not rundir.is_run(run_dir):
        raise RunDirError(f"{run_dir}: exists and is not an ftune run; choose another --out")
    if rundir.read_recipe_text(run_dir) != recipe_yaml:
        raise RunDirError(
            f"{run_dir}: holds a run of another recipe or budget than this comparison's; choose another "
            f"--out, or delete {run_dir} to train {run_dir.name} again"
        )
    if rundir.has_metrics(run_dir):
        return "reuse" if table.forward_of(run_dir) else "measure"
    return "resume" if rundir.latest_checkpoint(run_dir) else "restart"


def launch(recipe_file: Path, flags: list[str]) -> tuple[int, str]:
    """Run one method's worker; its stderr passes through. Returns its exit code and, if not 0, the one line saying
    why (worker.REFUSED: the method does not apply to the model)."""
    command = [sys.executable, "-m", "ftune.compare.worker", str(recipe_file), *flags]
    worker = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    last = ""
    for line in worker.stderr:
        sys.stderr.write(line)
        last = line.strip() or last
    if worker.wait() == 0:
        return 0, ""
    return worker.returncode, last.removeprefix("error: ") or f"the worker exited with code {worker.returncode}"


def compare(
    recipe_path: Path,
    names: str | None,
    every: bool,
    budget_text: str,
    out: Path,
    overrides: list[str],
    evals: int = 4,
    memory_limit: str | None = None,
    console: Console | None = None,
) -> Comparison:
    """Plan, check, run what is not done, then write comparison.md, comparison.json and pareto.png into `out`."""
    console = console or Console(stderr=True)
    budget = planning.parse_budget(budget_text)  # every bad input is refused before anything is loaded or written
    limit = planning.parse_size(memory_limit, "--memory-limit") if memory_limit else None
    base = load_recipe(recipe_path, overrides)
    recipes, left_out = planning.plan(base, names, every, budget, out, evals)
    states = {m: state_of(Path(r.output_dir), dump_recipe(r)) for m, r in recipes.items()}
    for method, why in left_out.items():
        console.print(f"left out: {method} {why}", soft_wrap=True, markup=False, highlight=False)
    failed = {}
    for i, (method, recipe) in enumerate(recipes.items(), 1):
        what, flags = ACTIONS[states[method]]
        console.print(f"[{i}/{len(recipes)}] {method} (lr {recipe.train.lr:g}, {budget}): {what}", markup=False)
        if flags is None:
            continue
        recipe_file = write_recipe(out, method, recipe)
        code, why = launch(recipe_file, flags)
        if code == REFUSED and every:  # --all: a method this model cannot take is left out, as at planning
            left_out[method] = f"does not apply to this model: {why}"
        elif code:
            failed[method] = why
        if code:
            console.print(f"{method}: {why}", soft_wrap=True, markup=False, highlight=False)
    done = {m: r for m, r in recipes.items() if m not in failed and m not in left_out}
    return _report(recipe_path, base, budget, done, left_out, failed, limit, out)


def write_recipe(out: Path, method: str, recipe: Recipe) -> Path:
    """`<out>/recipes/<method>.yaml`: the recipe a worker runs (and `ftune train` reruns by hand)."""
    path = out / "recipes" / f"{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_text(path, f"# written by ftune compare; rerun alone: ftune train {path}\n" + dump_recipe(recipe))
    return path


def _report(
    recipe_path: Path,
    base: Recipe,
    budget: planning.Budget,
    done: dict[str, Recipe],
    left_out: dict[str, str],
    failed: dict[str, str],
    limit: int | None,
    out: Path,
) -> Comparison:
    from ftune.compare import pareto, recommend

    metric, mode = table.metric_of(base)
    rows = [table.read_row(m, r, metric, mode) for m, r in done.items()]
    context = table.context(recipe_path, budget, metric, mode)
    advice = recommend.recommend(rows, metric, mode, limit, context) if rows else []
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "comparison.md", out / "comparison.json"]
    rundir.write_text(files[0], table.markdown(rows, context, left_out, failed, advice))
    rundir.write_json(
        files[1], {**context, "rows": rows, "left_out": left_out, "failed": failed, "recommendation": advice}
    )
    if rows:
        files.append(pareto.plot(rows, metric, mode, out / "pareto.png"))
    return Comparison(rows, metric, left_out, failed, advice, files)
