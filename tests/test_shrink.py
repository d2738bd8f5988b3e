"""Shrinking (ftune/methods/shrink.py): which blocks each drop mode keeps, composition, the removal schedule, merged
models that AutoModelFor* loads, exact resume mid-schedule, `ftune validate`'s estimate, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import build_bert, build_llama, build_t5, recipe_doc, s2s_recipe_doc, write_recipe
from ftune import models
from ftune.assemble import load_run
from ftune.cli import app
from ftune.errors import MethodError
from ftune.layers.lora import LoRALinear
from ftune.methods import attach, method_of
from ftune.methods.compose import Config as Compose
from ftune.models.arch import transformer_blocks
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.rundir import latest_checkpoint
from ftune.serve.export import merge_run

runner = CliRunner()
DEPTH = 6


def _deepen(folder: Path, **counts) -> Path:
    """The conftest model in `folder` rebuilt with DEPTH blocks (same tokenizer, seeded weights)."""
    config = transformers.AutoConfig.from_pretrained(folder)
    for key, value in counts.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    getattr(transformers, config.architectures[0])(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deep")
    return {
        "bert": _deepen(build_bert(root / "bert"), num_hidden_layers=DEPTH),
        "llama": _deepen(build_llama(root / "llama"), num_hidden_layers=DEPTH),
        "t5": _deepen(build_t5(root / "t5"), num_layers=DEPTH, num_decoder_layers=DEPTH),
    }


TASKS = {"bert": "sequence_classification", "llama": "causal_lm", "t5": "seq2seq"}


def _build(deep, arch: str, parts: list[dict]):
    """(model with `parts` attached, the unshrunk blocks of each stack in order, the config)."""
    torch.manual_seed(0)
    model, missing = models.load_model(TASKS[arch], str(deep[arch]), num_labels=2, pad_token_id=0)
    stacks = [model.get_encoder(), model.get_decoder()] if arch == "t5" else [model]
    originals = [list(transformer_blocks(s) if arch != "t5" else s.block) for s in stacks]
    cfg = Compose(methods=parts)
    return attach(model, cfg, models.head_parameters(model, TASKS[arch], missing)), originals, cfg


def _stacks(model, arch):
    return [model.get_encoder().block, model.get_decoder().block] if arch == "t5" else [transformer_blocks(model)]


MODES = {  # drop section -> blocks kept of 6
    "top-k": ({"drop": "top-k", "k": 2}, [0, 1, 2, 3]),
    "top-k-default-half": ({}, [0, 1, 2]),
    "every-other": ({"drop": "every-other"}, [0, 2, 4]),
    "every-other-top-1": ({"drop": "every-other", "k": 1}, [0, 1, 2, 3, 4]),
    "list": ({"drop": "list", "blocks": [4, 1]}, [0, 2, 3, 5]),
}


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_keeps_the_right_blocks(deep, arch, mode):
    section, kept = MODES[mode]
    model, originals, _ = _build(deep, arch, [{"name": "shrink", **section}, {"name": "full"}])
    for stack, original in zip(_stacks(model, arch), originals):
        assert list(stack) == [original[i] for i in kept]
        for new, block in enumerate(stack):  # cache slots follow the new order
            assert {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)} == {new}
    counted = (
        (model.config.num_layers, model.config.num_decoder_layers)
        if arch == "t5"
        else (model.config.num_hidden_layers,)
    )
    assert set(counted) == {len(kept)}


def test_composes_with_lora_and_full(deep):
    parts = [{"name": "lora", "r": 2, "targets": "query-value"}, {"name": "shrink", "drop": "top-k", "k": 4}]
    lora, _, _ = _build(deep, "bert", parts)
    wrapped = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 2  # query and value of the 2 blocks left: shrink went first whatever the list order
    factors = {id(p) for m in wrapped for p in [*m.lora_A.parameters(), *m.lora_B.parameters()]}
    in_blocks = {id(p) for p in lora.bert.encoder.parameters() if p.requires_grad}
    assert in_blocks == factors  # the head (classifier, new pooler) trains beside them
    full, _, _ = _build(deep, "bert", [{"name": "shrink", "drop": "top-k", "k": 4}, {"name": "full"}])
    assert all(p.requires_grad for p in full.parameters())
    assert sum(p.numel() for p in full.parameters()) < sum(p.numel() for p in lora.parameters())  # no LoRA factors


def test_schedule_removes_blocks_at_evenly_spaced_steps(deep):
    """top-k 3 from step 2 to 6 of 8: blocks 5, 4, 3 go after steps 2, 4, 6; a fraction names the nearest step."""
    for schedule in ({"start": 2, "end": 6}, {"start": 0.25, "end": 0.75}):
        model, originals, cfg = _build(
            deep, "bert", [{"name": "shrink", "k": 3, "schedule": schedule}, {"name": "full"}]
        )
        method, kept_after = method_of(cfg), []
        for step in range(1, 9):
            method.hooks.on_step_end(model, step, 8)
            kept_after.append([originals[0].index(b) for b in transformer_blocks(model)])
        assert kept_after == [[0, 1, 2, 3, 4, 5], *[[0, 1, 2, 3, 4]] * 2, *[[0, 1, 2, 3]] * 2, *[[0, 1, 2]] * 3]
        assert model.config.num_hidden_layers == 3


def test_merge_of_a_schedule_midway_equals_the_run_and_unmerge_restores(deep):
    """Two of three blocks dropped: merge re-keys the 4 kept blocks 0..3 (LoRA folded in), unmerge brings back all 6."""
    parts = [{"name": "shrink", "k": 3, "schedule": {"start": 1, "end": 3}}, {"name": "lora", "r": 2}]
    model, _, cfg = _build(deep, "bert", parts)
    method = method_of(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    method.hooks.on_step_end(model, 2, 3)
    model.eval()
    batch = {"input_ids": torch.randint(5, 25, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    reference, names = model(**batch).logits, {n for n, _ in model.named_parameters()}
    method.merging.merge(model)
    assert {n.split(".")[3] for n, _ in model.named_parameters() if n.startswith("bert.encoder.layer.")} == set("0123")
    torch.testing.assert_close(model(**batch).logits, reference, rtol=0, atol=1e-5)
    method.merging.unmerge(model)
    assert {n for n, _ in model.named_parameters()} == names
    torch.testing.assert_close(model(**batch).logits, reference, rtol=0, atol=1e-5)


def _trained(doc: dict) -> Path:
    train(validate_recipe(doc))
    return Path(doc["output_dir"])


def test_a_dropped_block_stops_training_when_its_step_comes(deep, cls_data, tmp_path):
    method = [{"name": "shrink", "k": 2, "schedule": {"start": 2, "end": 4}}, {"name": "full"}]
    run = _trained(
        recipe_doc(
            "cls",
            deep["bert"],
            cls_data,
            tmp_path / "run",
            method,
            max_steps=6,
            save_every=1,
            keep_checkpoints=10,
            weight_decay=0.1,
        )
    )
    saved = [load_file(run / "checkpoints" / f"step-{s:08d}" / "method.safetensors") for s in range(1, 7)]
    for block, removed_after in ((5, 2), (4, 4), (3, 6)):  # block 3 stays: it is a control that trains throughout
        weight = f"bert.encoder.layer.{block}.output.dense.weight"
        moved = [not torch.equal(saved[s][weight], saved[s - 1][weight]) for s in range(1, 6)]  # steps 2..6
        assert moved == [step <= removed_after for step in range(2, 7)], block
    assert saved[-1]["bert.encoder.layer.dropped"].tolist() == [False] * 4 + [True] * 2


def _batch(tokenizer):
    return tokenizer(["the movie was good", "a dull plot and weak actors"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("schedule", [None, {"start": 1, "end": 2}], ids=["before", "scheduled"])
def test_merged_classifier_loads_with_fewer_blocks_and_equal_logits(deep, cls_data, tmp_path, schedule):
    method = [
        {"name": "shrink", "drop": "every-other", **({"schedule": schedule} if schedule else {})},
        {"name": "lora", "r": 2},
    ]
    run = _trained(recipe_doc("cls", deep["bert"], cls_data, tmp_path / "run", method, max_steps=3))
    _, model, tokenizer = load_run(run)
    merge_run(run, tmp_path / "merged")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.num_hidden_layers == len(merged.bert.encoder.layer) == 3
    batch = _batch(tokenizer)
    torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)


def test_merged_causal_lm_without_its_first_block_generates_as_the_run(deep, sft_data, tmp_path):
    """Block 0 goes: the kept blocks' cache slots are renumbered, so generation with a cache matches too."""
    method = [{"name": "shrink", "drop": "list", "blocks": [0, 3]}, {"name": "lora", "r": 2}]
    run = _trained(recipe_doc("sft", deep["llama"], sft_data, tmp_path / "run", method, max_steps=2))
    _, model, tokenizer = load_run(run)
    merge_run(run, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.num_hidden_layers == 4
    ids = tokenizer(["repeat the word good"], return_tensors="pt").input_ids
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    greedy = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(merged.generate(ids, **greedy), model.generate(ids, **greedy))


def test_merged_t5_loads_with_fewer_blocks_in_both_stacks(deep, s2s_data, tmp_path):
    method = [{"name": "shrink", "k": 2}, {"name": "full"}]
    run = _trained(s2s_recipe_doc(deep["t5"], s2s_data, tmp_path / "run", method, max_steps=2))
    _, model, tokenizer = load_run(run)
    merge_run(run, tmp_path / "merged")
    merged = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    assert (merged.config.num_layers, merged.config.num_decoder_layers) == (4, 4)
    batch = _batch(tokenizer) | {"decoder_input_ids": torch.tensor([[0, 5, 6], [0, 7, 8]])}
    torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)


def test_a_schedule_distils_from_the_unshrunk_base(deep, sft_data, tmp_path):
    """The natural pair: blocks go one at a time while the student learns the unshrunk model's distribution."""
    doc = recipe_doc(
        "sft",
        deep["llama"],
        sft_data,
        tmp_path / "run",
        [{"name": "shrink", "k": 2, "schedule": {"start": 1, "end": 3}}, {"name": "full"}],
        max_steps=4,
    )
    doc["objective"] = {"name": "distill", "teacher": str(deep["llama"]), "temperature": 1.0}
    run = _trained(doc)
    losses = [line["loss"] for line in _log_without_timing(run) if "loss" in line and "validation" not in line]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert load_file(run / "method.safetensors")["model.layers.dropped"].tolist() == [False] * 4 + [True] * 2


def test_per_layer_config_lists_follow_the_kept_blocks(tmp_path):
    """Qwen2's layer_types (one entry per block) keeps the kept blocks' entries, so the saved config loads."""
    config = transformers.Qwen2Config(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    types = list(config.layer_types)
    assert len(set(types)) == 2  # full attention below max_window_layers, sliding above
    attach(model, Compose(methods=[{"name": "shrink", "drop": "list", "blocks": [1, 2]}, {"name": "full"}]), [])
    assert model.config.layer_types == [types[0], types[3]]
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == [types[0], types[3]]
    ids = torch.randint(4, 40, (1, 9))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def _log_without_timing(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]


def test_resume_mid_schedule_equals_uninterrupted(deep, cls_data, tmp_path):
    """Blocks go after steps 2, 4 and 5; the run is cut after the step-4 checkpoint, with one removal still to come.
    The best weights (by loss) may come from mid-schedule: they carry the blocks dropped when they were saved."""
    method = [{"name": "shrink", "k": 3, "schedule": {"start": 2, "end": 5}}, {"name": "lora", "r": 2, "dropout": 0.1}]
    doc = recipe_doc(
        "cls",
        deep["bert"],
        cls_data,
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
    run = _trained(doc)
    expected, expected_log = load_file(run / "method.safetensors"), _log_without_timing(run)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    assert latest_checkpoint(run).name == "step-00000004"
    assert load_file(run / "checkpoints/step-00000004/method.safetensors")["bert.encoder.layer.dropped"].sum() == 2
    train(validate_recipe(doc), resume=True)
    resumed = load_file(run / "method.safetensors")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[name], tensor) for name, tensor in expected.items())
    assert _log_without_timing(run) == expected_log
    result = runner.invoke(app, ["eval", str(run)])  # rebuilt from the run dir: the saved structure, the same scores
    assert result.exit_code == 0, result.output
    final = json.loads((run / "metrics.json").read_text())
    assert json.loads(result.stdout)["loss"] == pytest.approx(final["best"]["loss"], rel=1e-6)


def test_validate_prints_parameters_and_the_estimated_speed_up(deep, cls_data, tmp_path):
    doc = recipe_doc("cls", deep["bert"], cls_data, tmp_path / "run", [{"name": "shrink", "k": 3}, {"name": "full"}])
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    assert "# shrink: 6 -> 3 blocks (drops 5, 4, 3, before training)" in result.stdout
    # by hand, tiny BERT (d 32, FFN 64, 2 labels) at data.max_length 32: a block's linears, 4 d² + 2 d·FFN weights;
    # outside the blocks the pooler (d²) and the classifier (2 d); 2 FLOPs per weight, 2 n_ctx d per block
    d, ffn, n_ctx = 32, 64, doc["data"]["max_length"]
    block, outside = 2 * (4 * d * d + 2 * d * ffn) + 2 * n_ctx * d, 2 * (d * d + 2 * d)
    assert f"speed-up estimate: {(6 * block + outside) / (3 * block + outside):.2f}x" in result.stdout
    full = sum(
        p.numel()
        for p in transformers.AutoModelForSequenceClassification.from_pretrained(
            deep["bert"], num_labels=2
        ).parameters()
    )
    per_block = full - sum(
        p.numel()
        for p in transformers.AutoModelForSequenceClassification.from_pretrained(
            deep["bert"], num_labels=2, num_hidden_layers=5
        ).parameters()
    )
    assert f"parameters: {full:,} unshrunk -> {full - 3 * per_block:,} shrunk" in result.stdout


def test_t5_keeps_the_block_holding_the_position_bias(deep):
    with pytest.raises(MethodError, match="relative position bias"):
        _build(deep, "t5", [{"name": "shrink", "drop": "list", "blocks": [0]}, {"name": "full"}])


BAD = {  # method section -> (exit code, what the one line says)
    "out-of-range": (
        [{"name": "shrink", "drop": "list", "blocks": [2, 6]}, {"name": "full"}],
        1,
        "shrink.blocks: block 6 does not exist; this model's blocks are 0..5",
    ),
    "duplicate": ([{"name": "shrink", "drop": "list", "blocks": [2, 2]}, {"name": "full"}], 2, "names a block twice"),
    "every-block": (
        [{"name": "shrink", "drop": "list", "blocks": [0, 1, 2, 3, 4, 5]}, {"name": "full"}],
        1,
        "all 6 blocks would be dropped",
    ),
    "top-k-all": ([{"name": "shrink", "k": 6}, {"name": "full"}], 1, "shrink.k: dropping 6 of this model's 6 blocks"),
    "schedule-past-the-run": (
        [{"name": "shrink", "k": 2, "schedule": {"start": 2, "end": 9}}, {"name": "full"}],
        1,
        "shrink.schedule.end: step 9 lies past the run's last step, 4",
    ),
    "fraction-above-one": (
        [{"name": "shrink", "k": 2, "schedule": {"start": 0.5, "end": 1.5}}, {"name": "full"}],
        2,
        "fraction of the run",
    ),
    "alone": ({"name": "shrink", "k": 2}, 2, "shrink trains nothing itself"),
    "schedule-with-prompt": (
        [{"name": "shrink", "k": 2, "schedule": {"start": 1, "end": 2}}, {"name": "p_tuning", "n_tokens": 2}],
        2,
        "each save their weights in a form",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(case, deep, cls_data, tmp_path):
    method, code, needle = BAD[case]
    doc = recipe_doc("cls", deep["bert"], cls_data, tmp_path / "run", method)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr  # besides progress notes (data: ...)
    assert not (tmp_path / "run").exists()
