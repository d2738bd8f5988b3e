"""Hot-swap of mergeable runs on one loaded base ((W + ΔW) - ΔW + ΔW'), and the weighted combination of LoRA runs.

Each row through the hot-swapped base equals that run alone (`load_run`), merge -> unmerge gives the base weights
back, and Σ w_i ΔW_i built by concatenating ranks equals the dense update. Classification runs are on the tiny Llama:
conftest's BERT tokenizer maps every word to [UNK], so its runs could not tell sentences apart.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import random

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from conftest import FILLER, recipe_doc
from ftune.assemble import load_run
from ftune.cli import app
from ftune.errors import MethodError, RecipeError, RunDirError
from ftune.methods import METHODS, lora
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.serve import hotswap
from ftune.serve.predict import load_tasks, predict

HAS_DORA = "dora" in lora.Config.model_fields
FAMILIES = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2, "targets": ["q_proj", "v_proj", "down_proj"]},
}
if HAS_DORA:
    FAMILIES["dora"] = FAMILIES["lora"] | {"dora": True}


@pytest.fixture(scope="module")
def three_class_data(tmp_path_factory):
    """A second task with another label set (3 classes, by sentence length)."""
    folder, rng = tmp_path_factory.mktemp("three"), random.Random(3)
    for split, n in (("train", 36), ("validation", 9)):
        rows = ["sentence\tlabel"] + [
            f"{' '.join(rng.sample(FILLER, 2 + i % 3))}\t{['short', 'medium', 'long'][i % 3]}" for i in range(n)
        ]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


def _train(doc):
    train(validate_recipe(doc), console=Console(file=io.StringIO()))
    return doc["output_dir"]


@pytest.fixture(scope="module")
def runs(tiny_llama, cls_data, three_class_data, tmp_path_factory):
    """Per family: a sentiment run (2 labels) and a length run (3 labels); plus a second sentiment LoRA run."""
    root, out = tmp_path_factory.mktemp("swap"), {}
    for family, method in FAMILIES.items():
        out[family] = [
            _train(recipe_doc("cls", tiny_llama, cls_data, root / f"{family}-sentiment", method, lr=3e-2)),
            _train(recipe_doc("cls", tiny_llama, three_class_data, root / f"{family}-length", method, lr=3e-2, seed=1)),
        ]
    out["lora"].append(
        _train(recipe_doc("cls", tiny_llama, cls_data, root / "lora-sentiment-2", FAMILIES["lora"], lr=5e-2, seed=2))
    )
    return {k: [type(root)(p) for p in v] for k, v in out.items()}


@pytest.fixture(scope="module")
def lm_runs(tiny_llama, sft_data, tmp_path_factory):
    """Two causal-LM LoRA runs with different ranks and scalings (plain and rsLoRA) on the same layers."""
    root = tmp_path_factory.mktemp("swap-lm")
    targets = ["q_proj", "v_proj", "up_proj"]
    return [
        type(root)(_train(recipe_doc("sft", tiny_llama, sft_data, root / name, method, lr=3e-2, seed=seed)))
        for name, method, seed in (
            ("lm-a", {"name": "lora", "r": 4, "alpha": 8, "targets": targets}, 0),
            ("lm-b", {"name": "lora", "r": 2, "alpha": 6, "rslora": True, "targets": targets}, 1),
        )
    ]


@functools.cache
def _loaded(run):
    return load_run(run)


def _rows(names):
    rng = random.Random(7)
    return [{"task": names[i % len(names)], "sentence": " ".join(rng.sample(FILLER, 2 + i % 4))} for i in range(9)]


def _alone(run, sentence):
    _, model, tokenizer = _loaded(run)
    batch = tokenizer([sentence], return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]


def _base_weights(bank):
    swapped = set().union(*bank.states)
    return {n: p.detach().clone() for n, p in bank.model.named_parameters() if n not in swapped}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_then_unmerge_restores_the_base(family, runs):
    _, model, _ = load_run(runs[family][0])
    method = METHODS[FAMILIES[family]["name"]]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    method.merging.merge(model)
    moved = max(float((p - before[n]).abs().max()) for n, p in model.named_parameters() if n in before)
    assert moved > 1e-4  # the merge really changed the base weights
    method.merging.unmerge(model)
    drift = max(float((p - before[n]).abs().max()) for n, p in model.named_parameters() if n in before)
    assert drift <= 1e-6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hot_swapped_rows_equal_each_run_alone(family, runs):
    pair = runs[family][:2]
    bank, tasks, tokenizer = load_tasks(pair)
    assert isinstance(bank, hotswap.HotSwap)
    original = _base_weights(bank)
    rows = _rows([p.name for p in pair])
    predictions = predict(bank, tasks, tokenizer, rows + rows, batch_size=4)  # several swaps: each task twice
    assert [p["task"] for p in predictions] == [r["task"] for r in rows + rows]  # input order kept
    differ = 0.0
    for row, p in zip(rows + rows, predictions):
        run = pair[[q.name for q in pair].index(row["task"])]
        alone = _alone(run, row["sentence"])
        assert len(p["logits"]) == len(alone)  # 2 labels for sentiment, 3 for length: each run's own head
        assert (torch.tensor(p["logits"]) - alone).abs().max() <= 1e-5, row
        other = _alone(pair[1 - pair.index(run)], row["sentence"])
        width = min(len(alone), len(other))
        differ = max(differ, float((alone[:width] - other[:width]).abs().max()))
    assert differ > 1e-3  # the two runs really answer differently, so a missed swap would show
    assert bank.last_drift <= 1e-6  # unmerge alone (before restore) gave the base back in fp32
    after = _base_weights(bank)
    assert max(float((after[n] - original[n]).abs().max()) for n in original) <= 1e-6


def test_same_label_set_runs_swap_too(runs):
    """Two sentiment runs and a length run: three swaps per pass, every row equal to its run alone."""
    trio = runs["lora"][:3]
    bank, tasks, tokenizer = load_tasks(trio)
    rows = _rows([p.name for p in trio])
    for row, p in zip(rows, predict(bank, tasks, tokenizer, rows)):
        alone = _alone(trio[[q.name for q in trio].index(row["task"])], row["sentence"])
        assert (torch.tensor(p["logits"]) - alone).abs().max() <= 1e-5


def test_a_broken_unmerge_is_caught(runs):
    bank, tasks, tokenizer = load_tasks(runs["lora"][:2])
    broken = dataclasses.replace(bank.method.merging, unmerge=lambda model: None)
    bank.method = dataclasses.replace(bank.method, merging=broken)
    with pytest.raises(MethodError, match="unmerge left"):
        predict(bank, tasks, tokenizer, _rows([p.name for p in runs["lora"][:2]]))


def test_cli_eval_several_runs_equals_each_alone(runs):
    pair = runs["lora"][:2]
    result = CliRunner().invoke(app, ["eval", *map(str, pair)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["run"] for line in lines] == [str(p) for p in pair]
    for run, scored in zip(pair, lines):
        single = CliRunner().invoke(app, ["eval", str(run)])
        assert single.exit_code == 0, single.output
        alone = json.loads(single.stdout)
        assert scored.keys() - {"run"} == alone.keys()
        for key, value in alone.items():
            assert scored[key] == pytest.approx(value, abs=1e-6), key


def test_cli_predict_hot_swaps(runs, tmp_path):
    pair = runs["lora"][:2]
    source = tmp_path / "rows.jsonl"
    rows = _rows([p.name for p in pair])
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["predict", *map(str, pair), "--input", str(source)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["task"] for line in lines] == [r["task"] for r in rows]


def test_runs_of_another_shape_are_refused(runs, tiny_llama, cls_data, tmp_path):
    other = _train(recipe_doc("cls", tiny_llama, cls_data, tmp_path / "r8", FAMILIES["lora"] | {"r": 8}))
    with pytest.raises(RunDirError, match=r"method\.r is 8"):
        load_tasks([runs["lora"][0], type(tmp_path)(other)])
    with pytest.raises(RunDirError, match="method is adalora"):
        load_tasks([runs["lora"][0], runs["adalora"][0]])
    result = CliRunner().invoke(app, ["eval", str(runs["lora"][0]), str(other)])
    assert result.exit_code != 0 and "method.r is 8" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_weighted_combination_equals_the_dense_update(lm_runs, tiny_llama):
    from transformers import AutoModelForCausalLM

    weights = [0.7, -0.3]
    _, combined, _, _ = hotswap.mix_runs(lm_runs, weights)
    singles = [load_run(run)[1] for run in lm_runs]
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    layers = {n: m for n, m in combined.named_modules() if isinstance(m, lora.LoRALinear)}
    assert len(layers) == 6 and all(m.lora_A.weight.shape[0] == 6 for m in layers.values())  # ranks 4 + 2
    with torch.no_grad():
        for name, layer in layers.items():
            update = sum(w * s.get_submodule(name).delta_weight() for w, s in zip(weights, singles))
            assert float(update.abs().max()) > 1e-4
            dense.get_submodule(name).weight.add_(update)
        ids = torch.randint(4, 30, (2, 10), generator=torch.Generator().manual_seed(0))
        # unmerged forward of the combined adapter equals the dense model
        assert (combined(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() <= 1e-5
        for name, layer in layers.items():
            layer.merge()
            assert (layer.base_layer.weight - dense.get_submodule(name).weight).abs().max() <= 1e-6


def test_cli_eval_with_weights(lm_runs):
    result = CliRunner().invoke(app, ["eval", *map(str, lm_runs), "--weights", "0.5,0.5"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["weights"] == [0.5, 0.5] and scored["perplexity"] > 1
    # weight 1 on one run and 0 on the other scores exactly that run
    only_a = json.loads(CliRunner().invoke(app, ["eval", *map(str, lm_runs), "--weights", "1,0"]).stdout)
    alone = json.loads(CliRunner().invoke(app, ["eval", str(lm_runs[0])]).stdout)
    assert only_a["loss"] == pytest.approx(alone["loss"], abs=1e-5)


def test_weights_refusals(runs, lm_runs):
    with pytest.raises(RecipeError, match="heads of different runs"):
        hotswap.mix_runs(runs["lora"][:2], [0.5, 0.5])
    with pytest.raises(RecipeError, match="2 values for 3 runs"):
        hotswap.mix_runs([*lm_runs, lm_runs[0]], [0.5, 0.5])
    with pytest.raises(RecipeError, match="is adalora"):
        hotswap.mix_runs([runs["lora"][0], runs["adalora"][0]], [0.5, 0.5])
    result = CliRunner().invoke(app, ["eval", *map(str, lm_runs), "--weights", "a,b"])
    assert result.exit_code == 2 and "comma-separated numbers" in result.output
