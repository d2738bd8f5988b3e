"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow, ... through accelerate's tracker
integration. Off by default; each receives the lines of metrics.jsonl as scalars (`train/loss`, `validation/accuracy`,
...) at their step, on the main process only.

Offline by default where the tracker allows it: TensorBoard writes event files under `<run>/tracking/<run name>/`;
W&B keeps its files under `<run>/tracking/` (`WANDB_MODE=offline` keeps them off the network).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from ftune import rundir
from ftune.errors import RecipeError

TRACKING_DIR = rundir.TRACKING
"""Under the run dir: where trackers that write local files write them."""

# accelerate's tracker names (LoggerType, less "all") -> the pip package that provides each
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def known_trackers(value: Any) -> Any:
    """The recipe's `train.report_to` check: one name or a list of names, each a key of TRACKERS (did-you-mean)."""
    names = value if isinstance(value, list) else [value]
    for name in names:
        if isinstance(name, str) and name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown tracker {name!r}{hint}; one of {', '.join(TRACKERS)}")
    return names


def accelerator_options(report_to: list[str], out: Path) -> dict[str, Any]:
    """`Accelerator(**...)` keywords for the recipe's trackers (none: no keywords). Refuses a tracker whose package
    is not installed (RecipeError), before anything is loaded or written: accelerate would silently drop it."""
    if not report_to:
        return {}
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in report_to:
        if name not in available:
            raise RecipeError(
                f"train.report_to: {name} needs the {TRACKERS[name]} package, which is not installed; "
                f"pip install {TRACKERS[name]} (or remove {name} from train.report_to)"
            )
    return {"log_with": list(report_to), "project_dir": str(out / TRACKING_DIR)}


def start(accelerator, report_to: list[str], recipe_config: dict[str, Any], out: Path, step: int) -> None:
    """Open the trackers on the main process (after the run dir is ready), with the recipe as their configuration.

    A run resumed at `step` drops TensorBoard's events past it (`purge_step`), as metrics.jsonl drops its lines.
    """
    if not report_to or not accelerator.is_main_process:
        return
    (out / TRACKING_DIR).mkdir(exist_ok=True)
    options = {"wandb": {"dir": str(out / TRACKING_DIR)}}
    if step:
        options["tensorboard"] = {"purge_step": step + 1}
    accelerator.init_trackers(out.resolve().name, config=_flat(recipe_config), init_kwargs=options)


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line as tracker scalars: `train/<key>` for a training line, `validation/<metric>` for an
    evaluation; the step is given apart, and non-numbers are left out."""
    if "validation" in entry:
        return {f"validation/{k}": v for k, v in _flat(entry["validation"], "/").items() if _is_number(v)}
    return {f"train/{k}": v for k, v in entry.items() if k != "step" and _is_number(v)}


def finish(accelerator) -> None:
    """Close the trackers (flush TensorBoard, end the W&B run). `accelerator.end_training()` would also destroy the
    process group, which a later run in the same interpreter (`ftune compare`, tests, notebooks) still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()


def _flat(values: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys; lists as JSON text and None as "null" (hyperparameter stores take scalars)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flat(value, sep, f"{prefix}{key}{sep}")
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) or value is None else value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
