"""Pinned expected-loss traces (torchtune's regression idea): every registered method x {tiny BERT, tiny Llama},
trained for STEPS optimizer steps by the real path (`ftune.run.train.train`, a validated recipe; CPU, fp32, seed 0,
log_every 1, no evaluation), must log the same per-step training loss as tests/pinned_losses.json, within a relative
1e-5 (absolute floor 1e-7).

The tiny BERT learns conftest's sentiment classification (a new head); the tiny Llama learns conftest's SFT data as
a causal LM (no new head: the loss moves only through what the method trains, its own parameters or, for `full`,
`layers` and `head`, the base weights). All methods run at one learning rate, 1e-2 (conftest's), high enough that a
method's own parameters move the loss clearly within the steps, also beside BERT's new head (at 1e-3 the head
dominated: a 5% change of LoRA's scaling moved BERT's trace by only 1.4e-5 relative). Step 1 is the loss before any
update: it shows a method's initialisation (LoRA's zero B and a zero-initialised adapter leave it at the base
model's).

A change to a method's numerics (initialisation, scaling, forward, regulariser, which parameters train) fails here.
If the change is intended, regenerate the file in the same commit, so the diff shows the new traces:

    FTUNE_REGEN_PINNED=1 .venv/bin/python -m pytest tests/test_pinned_losses.py

Regeneration rewrites the traces of the cases that ran (a -k selection updates only those) and keeps the others.
A method added to the registry runs with its config's defaults (add a case to CASES when it needs options) and fails
until its traces are pinned.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest
from rich.console import Console

from conftest import recipe_doc
from ftune.errors import MethodError
from ftune.methods import METHODS
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.rundir import read_metrics_log

PINNED = Path(__file__).with_name("pinned_losses.json")
REGEN_ENV = "FTUNE_REGEN_PINNED"
REGENERATE = f"{REGEN_ENV}=1 .venv/bin/python -m pytest tests/test_pinned_losses.py"
STEPS, BATCH, LR, SEED = 5, 8, 1e-2, 0
RTOL, ATOL = 1e-5, 1e-7
ARCHES = {"bert": "cls", "llama": "sft"}  # architecture -> conftest recipe kind (sequence classification, causal LM)

# The method section of each case: the config's defaults, plus options it cannot run without or that make it train
# something at this size (2 blocks); a method not listed runs with {"name": name}. Methods that only run in company
# get the company tests/test_learns.py gives them; on the Llama, whose linears have no biases, compose pairs LoRA
# with prefix tuning instead (tests/test_methods.py's pair). adapter_fusion's section gets conftest's stage-1 runs.
CASES: dict[str, dict | list[dict]] = {
    "layers": {"name": "layers", "top_k": 1},
    "adapter_drop": {"name": "adapter_drop", "drop_first": 1},  # the default 5 drops both blocks' adapters
    "adapter_fusion": {"name": "adapter_fusion"},
    "compose": [{"name": "lora"}, {"name": "bitfit"}],
    "l2sp": [{"name": "full"}, {"name": "l2sp"}],
    "shrink": [{"name": "shrink", "k": 1}, {"name": "lora"}],
}
LLAMA_CASES: dict[str, dict | list[dict]] = {"compose": [{"name": "lora"}, {"name": "prefix_tuning"}]}
# (method, architecture) pairs ftune refuses with a MethodError (the tiny Llama's linears and norms have no biases):
# pinned as refusals, so a change that makes them run shows here too.
REFUSED = {("bitfit", "llama")}


def _section(name: str, arch: str) -> dict | list[dict]:
    return (LLAMA_CASES if arch == "llama" else {}).get(name) or CASES.get(name, {"name": name})


def _pinned() -> dict:
    return json.loads(PINNED.read_text()) if PINNED.exists() else {}


@pytest.fixture(scope="module")
def regenerated():
    """The traces measured in this session; written to PINNED at the end when FTUNE_REGEN_PINNED is set."""
    got: dict[str, list[float] | str] = {}
    yield got
    if os.environ.get(REGEN_ENV) and got:
        merged = {k: v for k, v in _pinned().items() if k != "_regenerate"} | got
        doc = {"_regenerate": REGENERATE, **dict(sorted(merged.items()))}
        PINNED.write_text(json.dumps(doc, indent=1) + "\n")


def _trace(arch: str, model: Path, data: Path, out: Path, section) -> list[float]:
    doc = recipe_doc(
        ARCHES[arch],
        model,
        data,
        out,
        section,
        max_steps=STEPS,
        batch_size=BATCH,
        lr=LR,
        seed=SEED,
        log_every=1,
        precision="fp32",
    )
    doc["data"]["validation"] = None  # no evaluation: the trace is the training loss
    train(validate_recipe(doc), console=Console(file=io.StringIO()))
    entries = [e for e in read_metrics_log(out) if "loss" in e]
    assert [e["step"] for e in entries] == list(range(1, STEPS + 1)), f"steps logged: {[e['step'] for e in entries]}"
    return [e["loss"] for e in entries]


def _mismatch(key: str, expected: list[float], got: list[float]) -> str | None:
    how = f"if the change to {key}'s numerics is intended, regenerate in the same commit: {REGENERATE}"
    if len(expected) != len(got):
        return f"{key}: {len(got)} steps, {len(expected)} pinned; {how}"
    for step, (e, g) in enumerate(zip(expected, got, strict=True), start=1):
        if not (math.isfinite(g) and abs(g - e) <= max(RTOL * abs(e), ATOL)):
            return (
                f"{key}: step {step} loss {g!r}, pinned {e!r} (relative difference {abs(g - e) / abs(e):.2e} > "
                f"{RTOL:g}); got {got}, pinned {expected}; {how}"
            )
    return None


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("arch", list(ARCHES))
def test_pinned_loss_trace(arch, name, tiny_bert, tiny_llama, cls_data, sft_data, request, regenerated, tmp_path):
    key = f"{arch}/{name}"
    model, data = {"bert": (tiny_bert, cls_data), "llama": (tiny_llama, sft_data)}[arch]
    section = _section(name, arch)
    if name == "adapter_fusion":  # stage 2 over conftest's two stage-1 `adapter` runs on this architecture
        section = {**section, "adapters": [str(run) for run in request.getfixturevalue("adapter_runs")[arch]]}
    if (name, arch) in REFUSED:
        with pytest.raises(MethodError):
            _trace(arch, model, data, tmp_path / "run", section)
        got: list[float] | str = "refused"
    else:
        got = _trace(arch, model, data, tmp_path / "run", section)
    regenerated[key] = got
    if os.environ.get(REGEN_ENV):
        return
    pinned = _pinned()
    assert key in pinned, f"{key}: no pinned loss trace in {PINNED.name}; regenerate: {REGENERATE}"
    if got == "refused" or pinned[key] == "refused":
        assert got == pinned[key], f"{key}: {got}, pinned {pinned[key]}; regenerate: {REGENERATE}"
    else:
        problem = _mismatch(key, pinned[key], got)
        if problem:
            pytest.fail(problem, pytrace=False)


def test_every_pinned_trace_has_a_method():
    """A trace of a method no longer registered (renamed or removed) is stale: regenerate drops nothing, so say so."""
    stale = {k for k in _pinned() if k != "_regenerate" and k.split("/", 1)[1] not in METHODS}
    assert not stale, f"pinned traces of unregistered methods: {sorted(stale)}; delete them from {PINNED.name}"
