"""The comparison table, read from each method's run directory (never from memory: a reused run and a fresh one are
read alike), and rendered for the terminal (rich), as Markdown, and as JSON rows.

Per method: trainable parameters and their share of the model (metrics.json), bytes of method.safetensors, peak
memory and wall time (compare.json, written by worker.py), training tokens/s, the task metric's best value over the
run's evaluations and its final value (metrics.jsonl, metrics.json), and the cost of a forward relative to the base.
Tokens/s is the step-weighted harmonic mean of the logged windows, leaving out windows that contain an evaluation or
a checkpoint save (the loop's clock runs through them), so it is tokens over seconds of training proper.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

from ftune import rundir
from ftune.errors import RunDirError
from ftune.recipe import Recipe
from ftune.rundir import COMPARE as RESULT  # written by worker.py


def metric_of(recipe: Recipe) -> tuple[str, str]:
    """The metric the table ranks by and whether larger is better: the recipe's train.best_metric, else loss."""
    t = recipe.train
    return (t.best_metric, t.best_mode) if t.best_metric else ("loss", "min")


def forward_of(run_dir: Path) -> dict[str, Any] | None:
    return measurements(run_dir).get("forward")


def measurements(run_dir: Path) -> dict[str, Any]:
    """compare.json (worker.py's measurements), read as data: inside the run, a regular file, bounded; {} if none."""
    return rundir.read_json(run_dir, RESULT) if (Path(run_dir) / RESULT).is_file() else {}


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    return rundir.read_metrics_log(run_dir)


def tokens_per_s(log: list[dict[str, Any]], eval_every: int | None, save_every: int | None) -> float | None:
    """Step-weighted harmonic mean of the windows' tokens/s, windows holding an evaluation or a save left out.

    An evaluation or save at step s runs after step s is logged, so it falls in the window that ends after s."""
    windows, previous = [], 0
    for entry in log:
        if "tokens_per_s" in entry:
            windows.append((previous, entry["step"], entry["tokens_per_s"]))
            previous = entry["step"]
    pauses = {s for every in (eval_every, save_every) if every for s in range(every, previous + 1, every)}
    clean = [w for w in windows if not any(w[0] <= s < w[1] for s in pauses)] or windows
    steps = sum(end - start for start, end, rate in clean if rate > 0)
    seconds = sum((end - start) / rate for start, end, rate in clean if rate > 0)
    return steps / seconds if seconds else None


def read_row(method: str, recipe: Recipe, metric: str, mode: str) -> dict[str, Any]:
    """A method's row, read from its run directory; RunDirError (one line) for files that are not what ftune wrote."""
    try:
        return _row(method, recipe, metric, mode)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise RunDirError(
            f"{recipe.output_dir}: its {rundir.METRICS}, {rundir.METRICS_LOG} or {RESULT} is not what "
            f"ftune writes ({type(e).__name__}: {e}); delete the folder to train {method} "
            "again"
        ) from None


def _row(method: str, recipe: Recipe, metric: str, mode: str) -> dict[str, Any]:
    out = Path(recipe.output_dir)
    final = rundir.read_metrics(out)
    measured, log = measurements(out), read_log(out)
    scores = [e["validation"][metric] for e in log if metric in e.get("validation", {})]
    forward = measured.get("forward") or {}
    t = recipe.train
    return {
        "method": method,
        "lr": t.lr,
        "steps": final["step"],
        "trainable_params": final["trainable_params"],
        "total_params": final["total_params"],
        "trainable_pct": 100 * final["trainable_params"] / final["total_params"],
        "saved_bytes": rundir.weights_file(out).stat().st_size,
        "peak_memory_bytes": measured.get("peak_memory_bytes"),
        "memory_kind": measured.get("memory"),
        "tokens_per_s": tokens_per_s(log, t.eval_every, t.save_every),
        "wall_seconds": measured.get("wall_seconds"),
        "train_seconds": final["train_seconds"],
        "resumed": measured.get("resumed", False),
        f"best_{metric}": (max if mode == "max" else min)(scores) if scores else None,
        f"final_{metric}": final["validation"].get(metric),
        "forward_relative": forward.get("relative"),
        "forward_merged": forward.get("merged"),
        "forward_ms": forward.get("method_ms"),
        "base_forward_ms": forward.get("base_ms"),
        "run_dir": str(out),
    }


def context(recipe_path: Path, budget: Any, metric: str, mode: str) -> dict[str, Any]:
    """Where the numbers come from: recipe, budget, metric, machine and date."""
    import torch

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores, {platform.machine()}), no GPU"
    )
    return {
        "recipe": str(recipe_path),
        "budget": str(budget),
        "metric": metric,
        "mode": mode,
        "machine": device,
        "date": datetime.date.today().isoformat(),
    }


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cells(row: dict[str, Any], metric: str) -> list[str]:
    forward = row["forward_relative"]
    return [
        row["method"],
        f"{row['lr']:g}",
        f"{row['trainable_params']:,}",
        f"{row['trainable_pct']:.3g}",
        _size(row["saved_bytes"]),
        _size(row["peak_memory_bytes"]),
        "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}",
        _number(row["wall_seconds"], 0),
        _number(row[f"best_{metric}"]),
        _number(row[f"final_{metric}"]),
        "-" if forward is None else f"{forward:.2f}x" + (" (merged)" if row["forward_merged"] else ""),
    ]


def headers(metric: str) -> list[str]:
    return [
        "method",
        "lr",
        "trainable params",
        "% of model",
        "saved",
        "peak memory",
        "train tokens/s",
        "wall s",
        f"best {metric}",
        f"final {metric}",
        "forward vs base",
    ]


def markdown(
    rows: list[dict[str, Any]], ctx: dict[str, Any], left_out: dict[str, str], failed: dict[str, str], advice: list[str]
) -> str:
    metric = ctx["metric"]
    where = f"{ctx['machine']}, {ctx['date']}; {metric}: {'higher' if ctx['mode'] == 'max' else 'lower'} is better"
    memory = f"peak memory: {rows[0]['memory_kind'] if rows else '-'}"
    lines = [
        f"# ftune compare: {ctx['recipe']}, {ctx['budget']} per method",
        "",
        f"{where}; {memory}.",
        "",
        "| " + " | ".join(headers(metric)) + " |",
        "|" + "---|" * len(headers(metric)),
    ]
    lines += ["| " + " | ".join(cells(r, metric)) + " |" for r in rows]
    lines += [""] + [f"- left out: {m} {why}" for m, why in left_out.items()]
    lines += [f"- failed: {m}: {why}" for m, why in failed.items()]
    return "\n".join(lines + [""] + advice) + "\n"


def rich_table(rows: list[dict[str, Any]], metric: str):
    from rich.table import Table

    shown = Table(*headers(metric))
    for row in rows:
        shown.add_row(*cells(row, metric))
    return shown
