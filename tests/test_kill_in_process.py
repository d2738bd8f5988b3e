"""Kills simulated in-process, on the pieces a kill can interrupt: keep_checkpoints rotation on a toy model (an
incomplete folder never counts as kept; a kill part-way through deleting an old checkpoint leaves no broken
'complete' one), --overwrite killed part-way through removing the old run (still a run --overwrite accepts), and a
finished run resumed, as after a kill past the final checkpoint (nothing logged twice, the checkpoint untouched).
The kills of a real process: tests/test_kill_resume.py and tests/test_kill_races.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import recipe_doc
from ftune import rundir
from ftune.run import checkpoint
from kill_harness import _assert_checkpoints_load, _complete, _log_lines


def _toy():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    model, optimizer, scheduler = _toy()
    for step in range(1, 6):
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"step": step}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    # an incomplete folder (a kill mid-write or mid-delete) never counts as one of the kept
    (tmp_path / "checkpoints" / "step-00000007").mkdir()
    checkpoint.save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"step": 6}, keep=2)
    assert [p.name for p in rundir.complete_checkpoints(tmp_path)] == ["step-00000005", "step-00000006"]
    assert rundir.latest_checkpoint(tmp_path).name == "step-00000006"


def test_a_kill_while_rotating_leaves_no_broken_complete_checkpoint(tmp_path, monkeypatch):
    """Deleting an old checkpoint is not atomic; a kill part-way must not leave a 'complete' one with files gone."""
    model, optimizer, scheduler = _toy()
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"step": step}, keep=2)

    class Killed(BaseException):
        pass

    real_rmtree = checkpoint.shutil.rmtree

    def killed_part_way(path, *args, **kwargs):
        if Path(path).name == "step-00000001":
            (Path(path) / rundir.WEIGHTS).unlink()  # the first file goes, then the process dies
            raise Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_part_way)
    try:
        checkpoint.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"step": 3}, keep=2)
    except Killed:
        pass
    monkeypatch.undo()
    assert [p.name for p in rundir.complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    _assert_checkpoints_load(tmp_path, "after a kill mid-rotation")
    # the half-deleted folder is swept when the run resumes, and so is a half-written one
    (tmp_path / "checkpoints" / ".step-00000004.tmp").mkdir()
    rundir.write_record(tmp_path, _record())
    (tmp_path / rundir.RECIPE).write_text("x: 1\n")
    lock, latest = rundir.prepare_output_dir(tmp_path, "x: 1\n", None, resume=True, overwrite=False)
    lock.release()
    assert latest.name == "step-00000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def _record(**fields) -> rundir.RunRecord:
    return rundir.RunRecord(versions={"ftune": "test"}, **fields)


def test_a_kill_during_overwrite_leaves_a_run_that_overwrite_accepts(tmp_path, monkeypatch):
    """--overwrite deletes the old run's files, its record last (replaced by the new one); a kill part-way must not
    leave a folder ftune refuses as 'not an ftune run'."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / rundir.METRICS_LOG).write_text("{}\n")
    (run / rundir.RECIPE).write_text("old: 1\n")
    rundir.write_record(run, _record(seed=1))

    class Killed(BaseException):
        pass

    def killed_part_way(path, *args, **kwargs):  # the worst order: the recipe goes first, if it is in there
        (Path(path).parent / rundir.RECIPE).unlink(missing_ok=True)
        raise Killed

    monkeypatch.setattr(rundir.output.shutil, "rmtree", killed_part_way)
    with pytest.raises(Killed):
        rundir.prepare_output_dir(run, "new: 1\n", _record(seed=2), resume=False, overwrite=True)
    monkeypatch.undo()
    assert rundir.read_record(run).seed == 1  # still the old run, which --overwrite accepts
    lock, latest = rundir.prepare_output_dir(run, "new: 1\n", _record(seed=2), resume=False, overwrite=True)
    lock.release()
    assert latest is None
    assert sorted(p.name for p in run.iterdir()) == sorted([rundir.LOCK, rundir.RECIPE, rundir.RECORD])
    assert (run / rundir.RECIPE).read_text() == "new: 1\n" and rundir.read_record(run).seed == 2


def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_bert, cls_data):
    """What a kill after the final checkpoint leads to: the resume reruns only the final evaluation. It must not log
    it twice, nor delete and rewrite the final checkpoint (with keep_checkpoints 1, the only one)."""
    import io

    from rich.console import Console

    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    run = tmp_path / "run"
    recipe = validate_recipe(recipe_doc("cls", tiny_bert, cls_data, run, max_steps=3, save_every=1, eval_every=2))
    train(recipe, console=Console(file=io.StringIO()))
    log, final = _log_lines(run), json.loads((run / "metrics.json").read_text())
    (final_ckpt,) = _complete(run)
    ckpt_files = {f.name: (f.stat().st_ino, f.read_bytes()) for f in final_ckpt.iterdir()}

    (run / "metrics.json").unlink()  # as if killed before it was written
    train(recipe, resume=True, console=Console(file=io.StringIO()))

    assert _log_lines(run) == log
    assert json.loads((run / "metrics.json").read_text())["validation"] == final["validation"]
    assert _complete(run) == [final_ckpt]
    assert {f.name: (f.stat().st_ino, f.read_bytes()) for f in final_ckpt.iterdir()} == ckpt_files
