"""merge / export: a merged model and a peft adapter dir reproduce the trained run's outputs; ftune's LoRA
equals peft's LoRA on the same weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import recipe_doc
from ftune.assemble import load_run
from ftune.errors import MethodError
from ftune.methods import lora
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.serve import export

peft = pytest.importorskip("peft")


def _train(kind, model, data, out, method):
    train(validate_recipe(recipe_doc(kind, model, data, out, method)))
    return out


@pytest.fixture(scope="module")
def lora_cls_run(tiny_bert, cls_data, tmp_path_factory):
    return _train(
        "cls", tiny_bert, cls_data, tmp_path_factory.mktemp("runs") / "lora", {"name": "lora", "r": 4, "alpha": 8}
    )


@pytest.fixture(scope="module")
def lora_lm_run(tiny_llama, sft_data, tmp_path_factory):
    return _train(
        "sft",
        tiny_llama,
        sft_data,
        tmp_path_factory.mktemp("runs") / "lora_lm",
        {"name": "lora", "r": 4, "rslora": True},
    )


def _inputs():
    ids = torch.randint(5, 25, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run_logits(run):
    _, model, _ = load_run(run)
    with torch.no_grad():
        return model(**_inputs()).logits


def test_merge_loads_with_transformers(lora_cls_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(export.merge_run(lora_cls_run, tmp_path / "m")).eval()
    with torch.no_grad():
        assert (merged(**_inputs()).logits - _run_logits(lora_cls_run)).abs().max() <= 1e-4


def test_merge_causal_lm(lora_lm_run, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(export.merge_run(lora_lm_run, tmp_path / "m")).eval()
    with torch.no_grad():
        assert (merged(**_inputs()).logits - _run_logits(lora_lm_run)).abs().max() <= 1e-4


@pytest.mark.parametrize("which", ["lora_cls_run", "lora_lm_run"])
def test_peft_export_loads_in_peft(which, request, tmp_path, tiny_bert, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run = request.getfixturevalue(which)
    out = export.export_peft(run, tmp_path / "adapter")
    if which == "lora_cls_run":
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        assert (loaded(**_inputs()).logits - _run_logits(run)).abs().max() <= 1e-5


def test_merge_refused_for_method_without_merge(lora_cls_run, tmp_path, monkeypatch):
    from ftune.methods import METHODS

    monkeypatch.setitem(METHODS, "lora", dataclasses.replace(METHODS["lora"], merging=None))
    with pytest.raises(MethodError, match="cannot be folded"):
        export.merge_run(lora_cls_run, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_equals_peft(rslora, tiny_llama):
    """Same base, same A/B copied across: ftune's LoRA and peft's give the same logits (fp32)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ours = lora.apply(
        copy.deepcopy(base), lora.Config(r=4, alpha=12, rslora=rslora, targets=["q_proj", "v_proj", "down_proj"])
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=12, use_rslora=rslora, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, lora.LoRALinear):
                module.lora_B.weight.normal_()
                target = theirs.base_model.model.get_submodule(name)
                target.lora_A["default"].weight.copy_(module.lora_A.weight)
                target.lora_B["default"].weight.copy_(module.lora_B.weight)
        delta = (ours(**_inputs()).logits - theirs(**_inputs()).logits).abs().max()
    assert delta <= 1e-5
