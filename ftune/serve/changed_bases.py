"""Before a finished run is served (eval, predict, merge, export): its base model's files checked against those it
trained on, as run.json's fingerprints recorded them (ftune/data/fingerprint.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ftune import models
from ftune.assemble import stored_recipe


def warn_changed_bases(run_dirs: list[Path], trust_remote_code: bool, note: Callable[[str], None]) -> None:
    """`note` one warning line for each run whose base model's files (config.json, weights) are not those it was
    trained on: run.json's fingerprints.model against the folder `stored_recipe` loads now (ftune/data/fingerprint.py).
    Silent for a run recorded before fingerprints, and for a base that is not a local folder."""
    from ftune.data import fingerprint

    for run_dir in run_dirs:
        recipe, record = stored_recipe(run_dir, trust_remote_code)
        recorded, spec = record.fingerprints.get("model"), recipe.model
        if not recorded:
            continue
        source = models.resolve_model(spec.name, spec.gguf_file, spec.revision)
        changes = fingerprint.model_changes(recorded, fingerprint.model_fingerprints(source, fingerprint.model_cache()))
        if changes:
            note(
                f"warning: {run_dir}: its base model {source} is not the one it was trained on "
                f"({'; '.join(changes)}); what follows is of another model than the one trained"
            )
