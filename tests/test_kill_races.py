"""--overwrite killed while it removes, two processes racing for one output_dir, a full disk (issue 22), each with
real `ftune train` processes (tests/kill_harness.py) or, for the full disk, a small tmpfs: the folder is always a run
ftune accepts again, the loser of a race exits 1 in one line and leaves the winner's run alone, and a checkpoint that
does not fit leaves the previous one intact; each ends as an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import recipe_doc, write_recipe
from ftune import rundir
from ftune.run import checkpoint
from kill_harness import TIMEOUT, _assert_checkpoints_load, _complete, _launch, _safetensors_parts, _wait


def _launch_doc(tmp: Path, name: str, doc: dict) -> Path:
    return write_recipe(tmp / f"{name}.yaml", doc)


def _seed_of(out: Path) -> int:
    return json.loads((out / rundir.RECORD).read_text())["seed"]


def test_a_kill_while_overwrite_removes_the_old_run(tmp_path, tiny_bert, cls_data):
    """`ftune train --overwrite` over a run with many checkpoint files, SIGKILLed once the first of them has gone:
    the folder is still the old run (its record is removed last), --overwrite accepts it again, and the result
    equals an uninterrupted run's."""
    out, copies = tmp_path / "run", 1500
    old = _launch_doc(tmp_path, "old", recipe_doc("cls", tiny_bert, cls_data, out, max_steps=2, save_every=1, seed=0))
    new_doc = recipe_doc("cls", tiny_bert, cls_data, out, max_steps=3, save_every=1, seed=1)
    new = _launch_doc(tmp_path, "new", new_doc)
    reference = _launch_doc(tmp_path, "reference", new_doc | {"output_dir": str(tmp_path / "reference")})
    proc = _launch(old, [], tmp_path / "old.err")
    assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "old.err").read_text()
    first = _complete(out)[0]
    for k in range(copies):  # hard links: cheap to make, one unlink each to remove
        shutil.copytree(first, out / "checkpoints" / f"step-{100 + k:08d}", copy_function=os.link)
    names = set(os.listdir(out)) - {rundir.LOCK}
    count = len(os.listdir(out / "checkpoints"))

    def removing() -> bool:
        try:
            return not names <= set(os.listdir(out)) or len(os.listdir(out / "checkpoints")) < count
        except FileNotFoundError:
            return True

    proc = _launch(new, ["--overwrite"], tmp_path / "killed.err")
    assert _wait(proc, removing, 0.0002), (tmp_path / "killed.err").read_text()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL, (tmp_path / "killed.err").read_text()
    assert _seed_of(out) == 0, "killed after the removal was done: the kill did not land while removing"
    assert rundir.is_run(out)

    refused = _launch(new, [], tmp_path / "refused.err")  # still a run: replaced only with --overwrite
    assert refused.wait(timeout=TIMEOUT) == 1
    assert "holds another run" in (tmp_path / "refused.err").read_text()
    for recipe, flags, err in ((new, ["--overwrite"], "again.err"), (reference, [], "reference.err")):
        proc = _launch(recipe, flags, tmp_path / err)
        assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / err).read_text()
    assert _seed_of(out) == 1
    assert _safetensors_parts(out / rundir.WEIGHTS) == _safetensors_parts(tmp_path / "reference" / rundir.WEIGHTS)
    assert [p.name for p in _complete(out)] == ["step-00000003"]  # none of the old run's checkpoints is left
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000003"]


def test_two_runs_racing_for_one_output_dir(tmp_path, tiny_bert, cls_data):
    """Two `ftune train` started together on one fresh output_dir: one trains, the other exits 1 in one line naming
    the holder's pid (it reached the lock second) or the run already there (the winner had finished); the folder
    holds the winner's run alone: its record, recipe and weights."""
    out = tmp_path / "run"
    docs = {seed: recipe_doc("cls", tiny_bert, cls_data, out, max_steps=6, save_every=2, seed=seed) for seed in (1, 2)}
    recipes = {seed: _launch_doc(tmp_path, f"seed-{seed}", doc) for seed, doc in docs.items()}
    procs = {seed: _launch(recipe, [], tmp_path / f"seed-{seed}.err") for seed, recipe in recipes.items()}
    codes = {seed: proc.wait(timeout=TIMEOUT) for seed, proc in procs.items()}
    assert sorted(codes.values()) == [0, 1], codes
    winner = next(seed for seed, code in codes.items() if code == 0)
    loser = 3 - winner
    lines = (tmp_path / f"seed-{loser}.err").read_text().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert f"(pid {procs[winner].pid})" in lines[0] or "holds another run" in lines[0], lines[0]

    record = json.loads((out / rundir.RECORD).read_text())
    assert record["seed"] == winner and str(recipes[winner]) in record["command"]
    assert yaml.safe_load((out / rundir.RECIPE).read_text())["train"]["seed"] == winner
    reference = _launch_doc(tmp_path, "reference", docs[winner] | {"output_dir": str(tmp_path / "reference")})
    proc = _launch(reference, [], tmp_path / "reference.err")
    assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "reference.err").read_text()
    assert _safetensors_parts(out / rundir.WEIGHTS) == _safetensors_parts(tmp_path / "reference" / rundir.WEIGHTS)
    for folder in _complete(out):
        assert _safetensors_parts(folder / rundir.WEIGHTS) == _safetensors_parts(
            tmp_path / "reference" / "checkpoints" / folder.name / rundir.WEIGHTS
        )
    assert rundir.holder(out) is None


def _fill(disk: Path, leave: int) -> Path:
    """Fill the filesystem of `disk` with a filler file, then give back `leave` bytes of it."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def test_a_full_disk_during_a_checkpoint(tmp_path, tiny_bert, cls_data, monkeypatch):
    """A small tmpfs holds the run dir; after the first checkpoint it is filled up but for a few pages, so the next
    checkpoint cannot be written: one error line (exit 1), the first checkpoint intact and loadable, nothing
    half-written left; once space is freed, --resume finishes the run as an uninterrupted one ends."""
    from typer.testing import CliRunner

    from ftune.cli import app

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(disk)], check=False, capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        out = disk / "run"
        doc = recipe_doc("cls", tiny_bert, cls_data, out, method={"name": "full"}, max_steps=3, save_every=1)
        recipe = write_recipe(tmp_path / "recipe.yaml", doc)
        real_save, filled = checkpoint.save_checkpoint, []

        def save_then_fill(out_dir, step, *args, **kwargs):
            real_save(out_dir, step, *args, **kwargs)
            if not filled:
                filled.append(_fill(disk, leave=16 << 10))  # metrics.jsonl's next line fits, a checkpoint does not

        monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_fill)
        result = CliRunner().invoke(app, ["train", str(recipe)])
        monkeypatch.undo()

        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and not (
            result.exception and not isinstance(result.exception, SystemExit)
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
        assert "step-00000002" in errors[0] and "No space left on device" in errors[0], errors[0]
        assert "checkpoints/step-00000001, is intact" in errors[0], errors[0]
        assert [p.name for p in _complete(out)] == ["step-00000001"]
        _assert_checkpoints_load(out, "after a full disk")
        assert sorted(os.listdir(out / "checkpoints")) == ["step-00000001"]  # no .step-00000002.tmp
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        assert rundir.holder(out) is None  # the lock was let go

        filled[0].unlink()
        resumed = CliRunner().invoke(app, ["train", str(recipe), "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert f"resuming from {out / 'checkpoints' / 'step-00000001'} (step 1)" in resumed.stderr
        reference = write_recipe(tmp_path / "reference.yaml", doc | {"output_dir": str(tmp_path / "reference")})
        assert CliRunner().invoke(app, ["train", str(reference)]).exit_code == 0
        assert _safetensors_parts(out / rundir.WEIGHTS) == _safetensors_parts(tmp_path / "reference" / rundir.WEIGHTS)
    finally:
        if subprocess.run(["umount", str(disk)], check=False).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=False)
