"""Loss curves as PNG, read from metrics.jsonl: `loss.png` in every run dir (the loop redraws it at each evaluation
and at the end) and `ftune plot RUN...` (several runs overlaid in one figure).

Left panel: training loss against optimizer step (solid), validation loss (dashed, dots) where the run evaluates.
Right panel: one validation metric against step: `--metric`, else the recipe's train.best_metric, else the first
metric the run reports besides loss. Drawn on matplotlib's Agg canvas without pyplot, so no window opens and no
global backend is switched (a notebook that trains keeps its own); matplotlib is imported only when drawing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftune import rundir
from ftune.errors import RecipeError, RunDirError

PLOT = rundir.PLOT
SIZE_INCHES, DPI = (10.0, 4.0), 100
"""Every figure is 1000 x 400 pixels."""


@dataclass
class Curves:
    """One run's log: (step, training loss) and (step, validation metrics), in step order."""

    name: str
    train: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    best_metric: str | None = None
    """The recipe's train.best_metric, the default for the right panel."""

    def metrics(self) -> list[str]:
        """The numeric validation metrics the run reports, in the order its first evaluation gives them."""
        seen = {}
        for _, scores in self.validation:
            seen |= {k: None for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return list(seen)


def read_curves(run_dir: str | Path, name: str | None = None) -> Curves:
    """A run dir's metrics.jsonl (finished or in progress). RunDirError for a folder that is not a run or has not
    logged yet; a torn last line (a killed run) is skipped."""
    run_dir = Path(run_dir)
    record = run_dir / rundir.RECORD
    if not (record.exists() or record.is_symlink()):
        raise RunDirError(f"{run_dir}: not an ftune run dir (no {rundir.RECORD}); give the output_dir of a run")
    rundir.read_record(run_dir)  # a record that is not ftune's, or not a plain file inside the run: said why
    curves = Curves(name or run_dir.name, best_metric=_best_metric(run_dir))
    for entry in rundir.read_metrics_log(run_dir):
        if isinstance(entry.get("validation"), dict):
            curves.validation.append((entry["step"], entry["validation"]))
        elif isinstance(entry.get("loss"), (int, float)):
            curves.train.append((entry["step"], float(entry["loss"])))
    if not curves.train and not curves.validation:
        raise RunDirError(f"{run_dir / rundir.METRICS_LOG}: holds no log line yet")
    return curves


def _best_metric(run_dir: Path) -> str | None:
    """The run's train.best_metric, read through the recipe reader (bounded on any input); None if unreadable."""
    from ftune.errors import FtuneError
    from ftune.recipe import load_recipe

    try:
        return load_recipe(rundir.recipe_file(run_dir), stored=True).train.best_metric
    except FtuneError:
        return None


def chosen_metric(runs: list[Curves], metric: str | None) -> str | None:
    """The right panel's metric: `metric` if some run reports it (RecipeError otherwise), else the first run's
    train.best_metric, else the first metric besides loss; None when no run has evaluated."""
    reported = list(dict.fromkeys(m for run in runs for m in run.metrics()))
    if metric is not None:
        if metric not in reported:
            known = ", ".join(reported) or "none: no run has evaluated"
            raise RecipeError(f"--metric: {metric!r} is not a validation metric of these runs; use one of {known}")
        return metric
    if runs[0].best_metric in reported:
        return runs[0].best_metric
    return next((m for m in reported if m != "loss"), reported[0] if reported else None)


def draw(runs: list[Curves], metric: str | None) -> bytes:
    """The figure as PNG bytes, SIZE_INCHES at DPI."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    losses, scores = figure.subplots(1, 2)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        if run.train:
            single = len(run.train) == 1  # one log line: a dot, since a line needs two
            losses.plot(*zip(*run.train), color=color, marker="." if single else None, label=f"{run.name} train")
        validation_loss = [(s, m["loss"]) for s, m in run.validation if isinstance(m.get("loss"), (int, float))]
        if validation_loss:
            losses.plot(*zip(*validation_loss), color=color, linestyle="--", marker=".", label=f"{run.name} validation")
        points = [(s, m[metric]) for s, m in run.validation if isinstance(m.get(metric), (int, float))]
        if points:
            scores.plot(*zip(*points), color=color, marker="o", label=run.name)
    losses.set(xlabel="step", ylabel="loss", title="loss")
    if metric is None:
        scores.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=scores.transAxes)
        scores.set_axis_off()
    else:
        scores.set(xlabel="step", ylabel=metric, title=f"validation {metric}")
    for axes in (losses, scores):
        if axes.get_legend_handles_labels()[0]:  # an empty legend is a warning on stderr
            axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps
    figure.tight_layout()  # moves the axes inside the canvas; the canvas keeps its size (no bbox_inches="tight")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=DPI)
    return png.getvalue()


def plot_runs(run_dirs: list[Path], out: Path | None = None, metric: str | None = None) -> Path:
    """`ftune plot`: the runs overlaid, written to `out` (one run: by default its own loss.png, redrawn; several:
    `out` is required). Never overwrites a file other than a run's own loss.png."""
    if out is None:
        if len(run_dirs) > 1:
            raise RecipeError("--out: name the PNG file to write when plotting several runs, e.g. --out runs.png")
        out = Path(run_dirs[0]) / PLOT
    elif out.suffix.lower() != ".png":
        raise RecipeError(f"--out: {out} is not a .png file name")
    elif out.exists() and not any(out.resolve() == (Path(r) / PLOT).resolve() for r in run_dirs):
        raise RunDirError(f"--out: {out} exists; choose a new file")
    names = [Path(r).name for r in run_dirs]
    labels = names if len(set(names)) == len(names) else [str(r) for r in run_dirs]  # a name twice: the paths
    runs = [read_curves(r, label) for r, label in zip(run_dirs, labels)]
    png = draw(runs, chosen_metric(runs, metric))
    if not out.parent.is_dir():
        raise RunDirError(f"--out: {out.parent} is not a folder")
    rundir.write_bytes(out, png)
    return out


def refresh(run_dir: Path) -> str | None:
    """Redraw a run's loss.png from its metrics.jsonl. A figure must never stop training, so any failure comes back
    as one line for the caller to print (None when drawn)."""
    try:
        curves = read_curves(run_dir)
        rundir.write_bytes(Path(run_dir) / PLOT, draw([curves], chosen_metric([curves], None)))
    except Exception as e:  # noqa: BLE001 - reported to the caller, never raised into the training loop
        reason = (str(e).strip().splitlines() or [""])[0]
        return f"{PLOT} not redrawn ({type(e).__name__}{': ' + reason if reason else ''})"
    return None
