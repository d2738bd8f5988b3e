"""Resume equality: a run stopped after a checkpoint and resumed ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from conftest import recipe_doc
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.rundir import latest_checkpoint

CASES = {
    "lora-cls": ("cls", {"name": "lora", "r": 4, "dropout": 0.1}),  # dropout: the RNG state must resume too
    "full-sft": ("sft", {"name": "full"}),
    # robust AdapterDrop draws k from the global RNG every batch: the draws must replay after a resume
    "adapter-drop-cls": (
        "cls",
        {"name": "adapter_drop", "placement": "houlsby", "bottleneck": 4, "drop_first": 1, "robust": True},
    ),
    # composites: AdaLoRA's rank state travels under its part's name; MAM saves its prefix folded mid-run
    "adalora+bitfit-cls": (
        "cls",
        [{"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1}, {"name": "bitfit"}],
    ),
    "mam-cls": (
        "cls",
        {
            "name": "mam_adapter",
            "prefix": {"n_tokens": 3, "mlp_hidden": 8, "dropout": 0.1},
            "adapter": {"bottleneck": 4, "dropout": 0.1},
        },
    ),
}


def _log_without_timing(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("tokens_per_s", None)
    return lines


@pytest.mark.parametrize("case", CASES)
def test_resume_equals_uninterrupted(case, tmp_path, tiny_bert, tiny_llama, cls_data, sft_data):
    kind, method = CASES[case]
    model, data = (tiny_bert, cls_data) if kind == "cls" else (tiny_llama, sft_data)
    # 6 steps over 48 / 32 rows at batch 8 with grad_accum 2 crosses an epoch boundary
    doc = recipe_doc(
        kind,
        model,
        data,
        tmp_path / "run",
        method,
        max_steps=6,
        save_every=2,
        keep_checkpoints=3,
        grad_accum=2,
        eval_every=2,
        best_metric="loss",
        best_mode="min",
    )
    recipe = validate_recipe(doc)
    run = tmp_path / "run"

    train(recipe)
    expected_weights = load_file(run / "method.safetensors")
    expected_log = _log_without_timing(run)
    expected_final = json.loads((run / "metrics.json").read_text())["validation"]

    # simulate a crash right after the step-4 checkpoint: later state never happened
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    assert latest_checkpoint(run).name == "step-00000004"
    train(recipe, resume=True)

    resumed = load_file(run / "method.safetensors")
    assert resumed.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert (resumed[name] == tensor).all(), name
    assert _log_without_timing(run) == expected_log
    assert json.loads((run / "metrics.json").read_text())["validation"] == expected_final
