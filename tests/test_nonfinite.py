"""A NaN/inf loss or gradient norm: `train.on_nonfinite: stop` ends the run naming the optimizer step and saves
nothing of it (the last checkpoint stays intact and resumable); `skip` drops that step whole and counts it.

Two mechanisms: a real one (a learning rate so large that fp32 overflows after one step), and a deterministic one
(the real model, with a forward hook that poisons the k-th training forward pass, installed by monkeypatching
`ftune.assemble.build_model`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune import assemble, rundir
from ftune.cli import app
from ftune.errors import RecipeError, TrainingError
from ftune.recipe import validate_recipe
from ftune.run import checkpoint
from ftune.run.train import train


def _quiet() -> Console:
    return Console(file=io.StringIO())


def _poisoned(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if what == "loss":
        return tensor * float("nan")
    tensor.register_hook(lambda grad: grad * float("inf"))
    return tensor


def _poison(monkeypatch, at_call: int, what: str) -> dict:
    """From now on, built models turn their `at_call`-th training forward pass bad: NaN logits, so a NaN loss
    (`what="loss"`), or finite logits whose gradient is infinite (`what="grad"`). Returns a counter of training
    forward passes."""
    real = assemble.build_model
    seen = {"calls": 0}

    def build(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):
            if not module.training:
                return output  # evaluation is never poisoned
            seen["calls"] += 1
            if seen["calls"] == at_call:
                # a causal LM's loss may come from the last hidden state, not the logits (ftune/kernels/linear_ce.py)
                if output.hidden_states is not None:
                    output.hidden_states = (*output.hidden_states[:-1], _poisoned(output.hidden_states[-1], what))
                output.logits = _poisoned(output.logits, what)
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(assemble, "build_model", build)
    return seen


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_saves(monkeypatch) -> dict:
    """The sha256 of every file of a checkpoint and of <run>/method.safetensors, right after ftune wrote it."""
    saved = {}
    save_checkpoint, save_weights = checkpoint.save_checkpoint, checkpoint.save_weights

    def record_checkpoint(out, step, *args, **kwargs):
        save_checkpoint(out, step, *args, **kwargs)
        for f in (out / "checkpoints" / f"step-{step:08d}").iterdir():
            saved[f] = _sha(f)

    def record_weights(folder, *args, **kwargs):
        save_weights(folder, *args, **kwargs)
        saved[folder / rundir.WEIGHTS] = _sha(folder / rundir.WEIGHTS)

    monkeypatch.setattr(checkpoint, "save_checkpoint", record_checkpoint)
    monkeypatch.setattr(checkpoint, "save_weights", record_weights)
    return saved


def _finite(path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_timing(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in log]


def _assert_checkpoints_intact(run, saved: dict, steps: list[int]) -> None:
    done = rundir.complete_checkpoints(run)
    assert [int(p.name.split("-")[1]) for p in done] == steps
    for folder in done:
        for f in folder.iterdir():
            assert _sha(f) == saved[f], f"{f} changed after it was saved"
        assert _finite(folder / rundir.WEIGHTS)
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        assert state["optimizer"]["state"], folder
        assert json.loads((folder / "state.json").read_text())["step"] == int(folder.name.split("-")[1])
    assert not list((run / "checkpoints").glob(".step-*")), "a half-written checkpoint was left behind"


STOPS = {  # what goes bad, train.max_grad_norm
    "nan-loss": ("loss", 1.0),
    "inf-grad-clipped": ("grad", 1.0),  # the norm accelerate's clip_grad_norm_ returns
    "inf-grad-unclipped": ("grad", None),  # no clipping: the norm is computed anyway
}


@pytest.mark.parametrize("case", STOPS)
def test_stop_names_the_step_and_keeps_the_last_checkpoint(case, monkeypatch, tmp_path, tiny_bert, cls_data):
    what, max_grad_norm = STOPS[case]
    run = tmp_path / "run"
    doc = recipe_doc(
        "cls",
        tiny_bert,
        cls_data,
        run,
        max_steps=5,
        save_every=1,
        keep_checkpoints=5,
        eval_every=1,
        best_metric="loss",
        best_mode="min",
        max_grad_norm=max_grad_norm,
    )
    _poison(monkeypatch, at_call=3, what=what)  # grad_accum 1: the third forward pass is optimizer step 3
    saved = _record_saves(monkeypatch)

    with pytest.raises(TrainingError) as caught:
        train(validate_recipe(doc), console=_quiet())
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 1
    kind = "loss" if what == "loss" else "gradient norm"
    assert message.startswith(f"step 3 of 5: non-finite {kind}"), message
    assert "checkpoints/step-00000002, is intact" in message, message

    _assert_checkpoints_intact(run, saved, [1, 2])
    weights = run / rundir.WEIGHTS  # the best weights so far (best_metric), never overwritten by the bad step
    assert _sha(weights) == saved[weights] and _finite(weights)
    assert max(e["step"] for e in _log(run)) == 2
    assert not (run / "metrics.json").exists()


def test_resume_after_a_stop_equals_an_uninterrupted_run(monkeypatch, tmp_path, tiny_llama, sft_data):
    """The checkpoint a stop leaves is a real resume point: with the fault gone, resuming ends bitwise equal to a run
    that never met it."""
    doc = recipe_doc(
        "sft",
        tiny_llama,
        sft_data,
        tmp_path / "run",
        {"name": "full"},
        max_steps=5,
        save_every=2,
        eval_every=2,
        grad_accum=2,
    )
    clean = doc | {"output_dir": str(tmp_path / "clean")}
    train(validate_recipe(clean), console=_quiet())

    _poison(monkeypatch, at_call=6, what="loss")  # grad_accum 2: the second micro-batch of step 3
    with pytest.raises(TrainingError, match=r"^step 3 of 5: non-finite loss"):
        train(validate_recipe(doc), console=_quiet())
    monkeypatch.undo()
    train(validate_recipe(doc), resume=True, console=_quiet())

    run, reference = tmp_path / "run", tmp_path / "clean"
    resumed, expected = load_file(run / rundir.WEIGHTS), load_file(reference / rundir.WEIGHTS)
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    assert _without_timing(_log(run)) == _without_timing(_log(reference))
    record = json.loads((run / "run.json").read_text())
    assert [r["from"] for r in record["resumes"]] == ["checkpoints/step-00000002"]


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_skip_drops_the_step_and_counts_it(what, monkeypatch, tmp_path, tiny_bert, cls_data):
    run = tmp_path / "run"
    doc = recipe_doc(
        "cls",
        tiny_bert,
        cls_data,
        run,
        max_steps=4,
        grad_accum=2,
        save_every=2,
        eval_every=2,
        on_nonfinite="skip",
        max_grad_norm=None if what == "grad" else 1.0,
    )
    seen = _poison(monkeypatch, at_call=3, what=what)  # grad_accum 2: the first micro-batch of optimizer step 2

    result = train(validate_recipe(doc), console=_quiet())

    assert result["step"] == 4 and result["skipped_steps"] == 1
    assert json.loads((run / "metrics.json").read_text())["skipped_steps"] == 1
    assert seen["calls"] == 2 * (4 + 1)  # the skipped step's data was consumed, not retried
    steps = [e for e in _log(run) if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert [e["skipped_steps"] for e in steps] == [0, 1, 1, 1]
    assert all(math.isfinite(e["loss"]) for e in steps)
    # the scheduler did not move for the skipped step (linear decay from 1e-2 over 4 steps) ...
    assert [e["lr"] for e in steps] == pytest.approx([1e-2 * (1 - s / 4) for s in (1, 2, 3, 4)])
    # ... nor did the optimizer
    final = rundir.latest_checkpoint(run)
    assert final.name == "step-00000004"
    state = torch.load(final / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {4}
    assert json.loads((final / "state.json").read_text())["skipped_steps"] == 1
    assert _finite(run / rundir.WEIGHTS) and _finite(final / rundir.WEIGHTS)


def test_overflowing_lr_stops_with_one_line_and_exit_code_1(tmp_path, tiny_bert, cls_data):
    """The real thing, through the CLI: lr 1e30 makes the LoRA update overflow fp32 after one step."""
    run = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", recipe_doc("cls", tiny_bert, cls_data, run, max_steps=4, save_every=1, lr=1e30)
    )
    result = CliRunner().invoke(app, ["train", str(recipe)])

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    found = re.match(r"error: step (\d) of 4: non-finite (loss|gradient norm)", last)
    assert found, last
    bad = int(found.group(1))
    assert bad >= 2
    latest = rundir.latest_checkpoint(run)
    assert latest.name == f"step-{bad - 1:08d}" and f"checkpoints/{latest.name}, is intact" in last
    assert _finite(latest / rundir.WEIGHTS)
    torch.load(latest / "optimizer.pt", weights_only=True)
    assert not (run / rundir.WEIGHTS).exists()  # the final weights are written only by a finished run


def test_skip_gives_up_when_every_step_is_bad(tmp_path, tiny_bert, cls_data):
    """skip is for a passing spike: weights that overflow make every later step bad, and the run stops anyway."""
    doc = recipe_doc(
        "cls", tiny_bert, cls_data, tmp_path / "run", max_steps=4, save_every=1, lr=1e30, on_nonfinite="skip"
    )
    with pytest.raises(TrainingError, match=r"^step 2 of 4: 25 steps in a row skipped, the last for a non-finite") as e:
        train(validate_recipe(doc), console=_quiet())
    assert "on_nonfinite: skip" not in str(e.value)  # no advice to do what it already does


def test_on_nonfinite_is_validated(tmp_path, tiny_bert, cls_data):
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", on_nonfinite="ignore")
    with pytest.raises(RecipeError, match="train.on_nonfinite"):
        validate_recipe(doc)
