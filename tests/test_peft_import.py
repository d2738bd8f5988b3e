"""`ftune import-peft`: a LoRA adapter saved by peft itself becomes an ftune run whose model equals peft's; what
ftune cannot reproduce exactly is refused in one line, with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune.assemble import load_run
from ftune.cli import app
from ftune.methods import lora
from ftune.serve import export
from ftune.serve.peft_import import import_peft

peft = pytest.importorskip("peft")
HAS_DORA = "dora" in lora.Config.model_fields


def _inputs():
    ids = torch.randint(5, 25, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _randomise(model, seed):
    """Random values in every trainable tensor (A, B, magnitudes, saved modules): nothing left at its init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))


def _peft_adapter(kind, folder, out, seed=0, **options):
    """A peft LoRA model on the tiny model in `folder`, randomised and saved with save_pretrained; returns it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if (
        kind == "cls"
    ):  # the MaskedLM checkpoint has no pooler: it is new, so it travels as modules_to_save like the head
        base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        config = peft.LoraConfig(
            task_type="SEQ_CLS",
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            modules_to_save=["pooler"],
            **options,
        )
    else:
        base = AutoModelForCausalLM.from_pretrained(folder)
        config = peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear", **options
        )
    model = peft.get_peft_model(base, config)
    _randomise(model, seed)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def cls_recipe(tiny_bert, cls_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("import-cls")
    doc = recipe_doc("cls", tiny_bert, cls_data, root / "unused", {"name": "adapter"})
    doc["data"]["labels"] = ["0", "1"]
    return write_recipe(root / "recipe.yaml", doc)


@pytest.fixture(scope="module")
def lm_recipe(tiny_llama, sft_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("import-lm")
    doc = recipe_doc("sft", tiny_llama, sft_data, root / "unused")
    del doc["method"]  # the method section is the adapter's; a recipe may leave it out
    return write_recipe(root / "recipe.yaml", doc)


def _logits(model):
    with torch.no_grad():
        return model(**_inputs()).logits


CASES = [("cls", {}), ("lm", {})] + ([("cls", {"use_dora": True}), ("lm", {"use_dora": True})] if HAS_DORA else [])


@pytest.mark.parametrize(("kind", "options"), CASES, ids=[f"{k}{'-dora' if o else ''}" for k, o in CASES])
def test_imported_run_equals_peft(kind, options, tiny_bert, tiny_llama, cls_recipe, lm_recipe, tmp_path):
    folder, recipe = (tiny_bert, cls_recipe) if kind == "cls" else (tiny_llama, lm_recipe)
    theirs = _peft_adapter(kind, folder, tmp_path / "adapter", **options)
    run = import_peft(tmp_path / "adapter", tmp_path / "run", recipe)

    stored, ours, _ = load_run(run)
    delta = (_logits(ours) - _logits(theirs)).abs().max()
    assert delta <= 1e-5
    assert (
        _logits(ours) - _logits(theirs.get_base_model().__class__.from_pretrained(folder).eval())
    ).abs().max() > 1e-3
    method = stored.method
    assert (method.name, method.r, method.dropout) == ("lora", 4, 0.0)
    saved_targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert method.targets == sorted(saved_targets)  # peft's own form (module names, or full paths), kept
    assert (method.alpha, method.rslora) == ((8.0, False) if kind == "cls" else (16.0, True))
    assert getattr(method, "dora", False) == bool(options)
    record = json.loads((run / "run.json").read_text())
    assert record["label_names"] == (["0", "1"] if kind == "cls" else None)
    assert record["imported_from"] == str(tmp_path / "adapter")
    saved = load_file(str(run / "method.safetensors"))
    peft_file = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(peft_file)  # every peft tensor has its ftune name, and nothing else is saved


def test_eval_merge_and_export_work_on_an_imported_run(tiny_bert, cls_recipe, tmp_path):
    from transformers import AutoModelForSequenceClassification

    theirs = _peft_adapter("cls", tiny_bert, tmp_path / "adapter", seed=3)
    result = CliRunner().invoke(
        app, ["import-peft", str(tmp_path / "adapter"), str(tmp_path / "run"), "--recipe", str(cls_recipe)]
    )
    assert result.exit_code == 0, result.output
    scored = CliRunner().invoke(app, ["eval", str(tmp_path / "run")])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["examples"] == 16
    merged = AutoModelForSequenceClassification.from_pretrained(export.merge_run(tmp_path / "run", tmp_path / "m"))
    assert (_logits(merged.eval()) - _logits(theirs)).abs().max() <= 1e-4
    back = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
        export.export_peft(tmp_path / "run", tmp_path / "again"),
    ).eval()
    assert (_logits(back) - _logits(theirs)).abs().max() <= 1e-5


def _edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.fixture(scope="module")
def saved_adapter(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "adapter"
    _peft_adapter("cls", tiny_bert, out)
    return out


BAD_CONFIGS = [
    ({"rank_pattern": {"query": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"value": 32}}, "alpha_pattern"),
    ({"bias": "lora_only"}, "bias"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"task_type": "CAUSAL_LM"}, "task_type"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
]


@pytest.mark.parametrize(("changes", "named"), BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_unsupported_config_is_one_line_and_writes_nothing(changes, named, saved_adapter, cls_recipe, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(saved_adapter, adapter)
    _edit_config(adapter, **changes)
    _refused(adapter, cls_recipe, tmp_path, named)


def _refused(adapter, recipe, tmp_path, named):
    result = CliRunner().invoke(app, ["import-peft", str(adapter), str(tmp_path / "run"), "--recipe", str(recipe)])
    assert result.exit_code != 0
    assert named in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run*"))  # no half-written run beside it either


def test_missing_config(saved_adapter, cls_recipe, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(saved_adapter, adapter)
    (adapter / "adapter_config.json").unlink()
    _refused(adapter, cls_recipe, tmp_path, "adapter_config.json")


def test_mismatched_base(saved_adapter, cls_recipe, tmp_path):
    """A tensor of another width, as an adapter saved for another base would have."""
    adapter = tmp_path / "adapter"
    shutil.copytree(saved_adapter, adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("query.lora_A.weight"))
    tensors[key] = torch.zeros(4, 48)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    _refused(adapter, cls_recipe, tmp_path, "(4, 48)")


def test_adapter_for_another_architecture(tiny_llama, cls_recipe, tmp_path):
    """A Llama adapter given with the BERT recipe (its task_type removed, so the modules themselves must not fit)."""
    _peft_adapter("lm", tiny_llama, tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", task_type=None)
    _refused(tmp_path / "adapter", cls_recipe, tmp_path, "cannot")


def test_head_missing_from_the_adapter(tiny_bert, cls_recipe, tmp_path):
    """Without the new pooler in modules_to_save, peft itself would draw it at random: refused, named."""
    from transformers import AutoModelForSequenceClassification

    model = peft.get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
        peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query"]),
    )
    model.save_pretrained(tmp_path / "adapter")
    _refused(tmp_path / "adapter", cls_recipe, tmp_path, "bert.pooler.dense")


def test_out_dir_in_use(saved_adapter, cls_recipe, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(
        app, ["import-peft", str(saved_adapter), str(tmp_path / "run"), "--recipe", str(cls_recipe)]
    )
    assert result.exit_code != 0 and "not an empty directory" in result.output
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]
    assert yaml.safe_load(cls_recipe.read_text())["method"] == {"name": "adapter"}  # the recipe file is untouched
