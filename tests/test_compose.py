"""Methods applied together (a recipe's `method:` list) and the MAM adapter, which is prefix tuning + a parallel
adapter composed from those two methods; on the tiny BERT and Llama from conftest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from conftest import recipe_doc
from ftune import models
from ftune.assemble import load_run
from ftune.cli import app
from ftune.errors import MethodError, RecipeError
from ftune.layers.lora import LoRALinear
from ftune.methods import METHODS, attach, method_of
from ftune.methods.adapter import Bottleneck
from ftune.methods.base import count_parameters
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.serve import export

PREFIX = {"name": "prefix_tuning", "n_tokens": 3, "mlp_hidden": 16}
MAM = {"name": "mam_adapter", "prefix": {"n_tokens": 3, "mlp_hidden": 16}, "adapter": {"bottleneck": 8}}


def _config(section):
    doc = recipe_doc("cls", Path("unused"), Path("unused"), Path("runs/unused"), section)
    doc["data"]["train"] = "train.tsv"
    return validate_recipe(doc).method


def _build(folder, section, task="sequence_classification"):
    torch.manual_seed(0)
    model, missing = models.load_model(task, str(folder), num_labels=2, pad_token_id=0)
    cfg = _config(section)
    return attach(model, cfg, models.head_parameters(model, task, missing)), cfg


def _batch():
    ids = torch.randint(5, 25, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "arch,task", [("bert", "sequence_classification"), ("llama", "sequence_classification"), ("llama", "causal_lm")]
)
def test_mam_with_its_adapter_scaled_to_zero_is_prefix_tuning(arch, task, tiny_bert, tiny_llama):
    folder = tiny_bert if arch == "bert" else tiny_llama
    mam, _ = _build(folder, MAM, task)
    _perturb(mam)
    prefix, _ = _build(folder, PREFIX, task)
    shared = {k: v for k, v in mam.state_dict().items() if k in prefix.state_dict()}
    assert any(k.startswith("source.") for k in shared)  # the prefix MLP is copied across
    prefix.load_state_dict(shared, strict=False)
    mam.eval(), prefix.eval()
    with torch.no_grad():
        scaled = mam(**_batch()).logits
        for bottleneck in (m for m in mam.modules() if isinstance(m, Bottleneck)):
            bottleneck.scaling = 0.0
        torch.testing.assert_close(mam(**_batch()).logits, prefix(**_batch()).logits, rtol=0, atol=1e-6)
    assert (scaled - prefix(**_batch()).logits).abs().max() > 1e-3  # the adapter does act at its real scale


def test_mam_defaults_and_partial_parts():
    default = _config({"name": "mam_adapter"})
    assert (default.prefix.n_tokens, default.prefix.reparameterize) == (30, False)  # direct: see mam_adapter.py
    assert (default.adapter.placement, default.adapter.bottleneck, default.adapter.scaling) == ("parallel", 512, 4.0)
    partial = _config({"name": "mam_adapter", "adapter": {"bottleneck": 16, "scaling": 2}})
    assert (partial.adapter.placement, partial.adapter.parallel_at, partial.adapter.bottleneck) == (
        "parallel",
        "ffn",
        16,
    )
    with pytest.raises(RecipeError, match=r"method\.adapter: MAM's adapter is parallel"):
        _config({"name": "mam_adapter", "adapter": {"placement": "pfeiffer"}})


def test_parts_apply_in_the_order_the_model_needs(tiny_bert):
    """LoRA goes in before the adapters whatever the list order, so it never adapts the adapters' own layers."""
    adapter = {"name": "adapter", "placement": "houlsby", "bottleneck": 4}
    lora = {"name": "lora", "r": 2, "targets": "all-linear"}
    first, _ = _build(tiny_bert, [adapter, lora])
    second, _ = _build(tiny_bert, [lora, adapter])
    assert _trainable(first) == _trainable(second)
    for bottleneck in (m for m in first.modules() if isinstance(m, Bottleneck)):
        assert not any(isinstance(m, LoRALinear) for m in bottleneck.modules())
    first.eval(), second.eval()
    torch.testing.assert_close(first(**_batch()).logits, second(**_batch()).logits, rtol=0, atol=0)


def test_what_trains_is_the_union_of_the_parts(tiny_bert):
    both, _ = _build(tiny_bert, [{"name": "lora", "r": 2}, {"name": "bitfit"}])
    lora, _ = _build(tiny_bert, {"name": "lora", "r": 2})
    bitfit, _ = _build(tiny_bert, {"name": "bitfit"})
    head = sum(p.numel() for n, p in bitfit.named_parameters() if n.startswith(("classifier", "bert.pooler")))
    assert count_parameters(both)[0] == count_parameters(lora)[0] + count_parameters(bitfit)[0] - head
    assert {n for n in _trainable(both) if "lora_" in n} == {n for n in _trainable(lora) if "lora_" in n}


def test_a_part_that_turns_the_head_off_freezes_it(tiny_bert):
    model, cfg = _build(tiny_bert, [{"name": "lora", "r": 2, "train_head": False}, {"name": "bitfit"}])
    assert cfg.train_head is False
    assert not any(p.requires_grad for p in model.classifier.parameters() if p.dim() == 2)  # the bias is bitfit's


@pytest.mark.parametrize(
    "parts,needle",
    [
        ([{"name": "lora"}, {"name": "adalora"}], "method: lora and adalora both rebuild the linear layers"),
        ([{"name": "full"}, {"name": "bitfit"}], "method: full already trains every weight"),
        ([{"name": "lora"}, {"name": "lora", "r": 4}], "method: lora is listed twice"),
        ([{"name": "prompt_tuning"}, PREFIX], "both rebuild the whole model"),
        ([{"name": "adapter"}, {"name": "adapter_drop"}], "both rebuild the sub-block outputs"),
        ([MAM, {"name": "adapter"}], "mam_adapter and adapter both rebuild"),
        ([{"name": "lora", "rr": 2}, {"name": "bitfit"}], "method[0].rr: unknown key (did you mean 'r'?)"),
        ([{"name": "lora"}, {"name": "bitfitt"}], "method[1].name: unknown method 'bitfitt' (did you mean 'bitfit'?)"),
    ],
    ids=["linears", "full", "twice", "wrappers", "adapters", "hybrid", "part-key", "part-name"],
)
def test_conflicting_or_bad_parts_are_one_clear_line(parts, needle):
    with pytest.raises(RecipeError) as caught:
        _config(parts)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_gradient_checkpointing_is_refused_when_a_part_refuses_it():
    doc = recipe_doc(
        "cls",
        Path("unused"),
        Path("unused"),
        Path("runs/unused"),
        [{"name": "lora"}, PREFIX],
        gradient_checkpointing=True,
    )
    doc["data"]["train"] = "train.tsv"
    with pytest.raises(RecipeError, match="train.gradient_checkpointing: lora\\+prefix_tuning keeps"):
        validate_recipe(doc)


def test_training_state_of_a_part_round_trips(tiny_bert):
    """AdaLoRA's rank masks and importance averages travel in checkpoints, prefixed by the part's name."""
    parts = [{"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0, "deltaT": 1}, {"name": "bitfit"}]
    model, cfg = _build(tiny_bert, parts)
    method = method_of(cfg)
    model(**_batch(), labels=torch.tensor([0, 1, 1])).loss.backward()
    method.hooks.on_step_end(model, 1, 4)
    state = method.hooks.resume.save(model)
    assert state and all(k.startswith("adalora.") for k in state)
    fresh, _ = _build(tiny_bert, parts)
    method.hooks.resume.load(fresh, state)
    for key, value in method.hooks.resume.save(fresh).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def runs(tiny_bert, cls_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("compose-runs")
    out = {}
    for name, method in (("mam", MAM), ("lora-bitfit", [{"name": "lora", "r": 4, "alpha": 8}, {"name": "bitfit"}])):
        train(validate_recipe(recipe_doc("cls", tiny_bert, cls_data, root / name, method)))
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["mam", "lora-bitfit"])
def test_a_finished_run_reloads_to_its_final_scores(name, runs):
    result = CliRunner().invoke(app, ["eval", str(runs[name])])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    expected = json.loads((runs[name] / "metrics.json").read_text())["validation"]
    for key, value in expected.items():
        assert scored[key] == pytest.approx(value, abs=1e-6), key


def test_merge_works_when_every_part_merges(runs, tmp_path):
    _, model, _ = load_run(runs["lora-bitfit"])
    with torch.no_grad():
        expected = model(**_batch()).logits
    merged = AutoModelForSequenceClassification.from_pretrained(export.merge_run(runs["lora-bitfit"], tmp_path / "m"))
    with torch.no_grad():
        assert (merged.eval()(**_batch()).logits - expected).abs().max() <= 1e-5


def test_merge_and_peft_export_are_refused_otherwise(runs, tmp_path):
    with pytest.raises(MethodError, match="mam_adapter adds modules that cannot be folded"):
        export.merge_run(runs["mam"], tmp_path / "m")
    with pytest.raises(MethodError, match="peft has no equivalent of lora\\+bitfit"):
        export.export_peft(runs["lora-bitfit"], tmp_path / "p")
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()
    assert "compose" in METHODS and "mam_adapter" in METHODS


def test_a_quantised_base_needs_every_part_to_train_outside_it():
    def with_quantization(method):
        doc = recipe_doc("cls", Path("unused"), Path("unused"), Path("runs/unused"), method)
        doc["data"]["train"], doc["model"]["quantization"] = "train.tsv", {"bits": 4}
        return validate_recipe(doc)

    assert with_quantization(MAM).model.quantization.bits == 4
    with pytest.raises(RecipeError, match="model.quantization: lora\\+bitfit trains weights inside"):
        with_quantization([{"name": "lora"}, {"name": "bitfit"}])
