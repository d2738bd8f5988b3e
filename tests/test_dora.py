"""DoRA (`lora.dora: true`): equal to peft's use_dora on the same weights (forward and gradients, eval and training
with dropout), magnitude init, merge/unmerge exactness, the method battery's checks, and `export --format peft`."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import recipe_doc
from ftune import models, rundir
from ftune.assemble import load_run
from ftune.methods import METHODS, attach, lora
from ftune.methods.base import count_parameters, unwrap_merged
from ftune.recipe import validate_recipe
from ftune.run import checkpoint
from ftune.run.train import train
from ftune.serve import export

peft = pytest.importorskip("peft")

TARGETS = {"bert": ["query", "value", "output.dense"], "llama": ["q_proj", "v_proj", "down_proj"]}


def _inputs():
    ids = torch.randint(5, 25, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _base(arch, folders):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if arch == "bert":
        return AutoModelForSequenceClassification.from_pretrained(folders[arch], num_labels=2)
    return AutoModelForCausalLM.from_pretrained(folders[arch])


@pytest.fixture(scope="module")
def folders(tiny_bert, tiny_llama):
    return {"bert": tiny_bert, "llama": tiny_llama}


def _twins(arch, folders, dropout=0.0, rslora=False):
    """ftune's DoRA and peft's on copies of one base, with the same random A, B and a perturbed magnitude."""
    base = _base(arch, folders)
    cfg = lora.Config(r=4, alpha=12, dropout=dropout, rslora=rslora, dora=True, targets=TARGETS[arch])
    ours = lora.apply(copy.deepcopy(base), cfg)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4, lora_alpha=12, lora_dropout=dropout, use_rslora=rslora, use_dora=True, target_modules=TARGETS[arch]
        ),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, lora.LoRALinear):
                module.lora_B.weight.normal_()
                module.lora_magnitude_vector.weight.mul_(1 + 0.1 * torch.rand_like(module.lora_magnitude_vector.weight))
                target = theirs.base_model.model.get_submodule(name)
                target.lora_A["default"].weight.copy_(module.lora_A.weight)
                target.lora_B["default"].weight.copy_(module.lora_B.weight)
                target.lora_magnitude_vector["default"].weight.copy_(module.lora_magnitude_vector.weight)
    return ours, theirs


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_magnitude_starts_at_the_row_norms_and_peft_agrees(arch, folders):
    base = _base(arch, folders)
    ours = lora.apply(copy.deepcopy(base), lora.Config(r=4, dora=True, targets=TARGETS[arch]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, use_dora=True, target_modules=TARGETS[arch]))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, lora.LoRALinear)}
    assert len(layers) > 0
    for name, module in layers.items():
        norms = torch.linalg.norm(module.base_layer.weight, dim=1)
        torch.testing.assert_close(module.lora_magnitude_vector.weight, norms, rtol=0, atol=0)
        peft_magnitude = theirs.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(module.lora_magnitude_vector.weight, peft_magnitude, rtol=0, atol=1e-6)
    ours.eval(), base.eval()
    with torch.no_grad():  # B = 0 and m = ||W||: step 0 is the base model
        assert (ours(**_inputs()).logits - base(**_inputs()).logits).abs().max() <= 1e-6


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_forward_and_gradients_equal_peft(arch, rslora, folders):
    """fp32, eval: same logits; one backward: same gradients for A, B and m (the row norm is detached in both)."""
    ours, theirs = _twins(arch, folders, rslora=rslora)
    ours.eval(), theirs.eval()
    inputs = _inputs()
    ours_logits, theirs_logits = ours(**inputs).logits, theirs(**inputs).logits
    assert (ours_logits - theirs_logits).abs().max() <= 1e-5
    ours_logits.square().mean().backward()
    theirs_logits.square().mean().backward()
    peft_params = dict(theirs.base_model.model.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        if ".lora_" not in name:
            continue
        peft_name = name.replace(".weight", ".default.weight")
        torch.testing.assert_close(p.grad, peft_params[peft_name].grad, rtol=1e-4, atol=1e-6)
        compared += 1
    assert compared == 3 * len([m for m in ours.modules() if isinstance(m, lora.LoRALinear)])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_training_forward_with_dropout_equals_peft(arch, folders):
    """With lora dropout active, DoRA recomputes the base path on the dropped input; same RNG, same output."""
    ours, theirs = _twins(arch, folders, dropout=0.3)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    ours_logits = ours(**_inputs()).logits
    torch.manual_seed(5)
    theirs_logits = theirs(**_inputs()).logits
    assert (ours_logits - theirs_logits).abs().max() <= 1e-5
    ours.eval()
    with torch.no_grad():  # and dropout does change the training output: the check above is not vacuous
        assert (ours(**_inputs()).logits - ours_logits).abs().max() > 1e-3


def _dora_model(arch, folders, task="sequence_classification"):
    torch.manual_seed(0)
    model, missing = models.load_model(task, str(folders[arch]), num_labels=2, pad_token_id=0)
    head = models.head_parameters(model, task, missing)
    return attach(model, lora.Config(r=4, alpha=8, dora=True), head), head


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 25, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_battery_trains_only_the_factors_magnitudes_and_head(arch, folders):
    """The method battery's checks (tests/test_methods.py) for the DoRA option."""
    model, head = _dora_model(arch, folders)
    layers = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert trainable == sum(p.numel() for p in head) + sum(
        m.lora_A.weight.numel() + m.lora_B.weight.numel() + m.lora_magnitude_vector.weight.numel() for m in layers
    )
    with torch.no_grad():  # B away from zero, so that A's gradient is not vanishingly small in a 2-layer model
        for m in layers:
            m.lora_B.weight.normal_(std=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(2):
        model(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != p.requires_grad, f"{n}: changed {not torch.equal(before[n], p)}"


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_weights_round_trip(arch, folders, tmp_path):
    model, _ = _dora_model(arch, folders)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    checkpoint.save_weights(tmp_path, model, {"method": "lora"})
    assert any(n.endswith("lora_magnitude_vector.weight") for n, p in model.named_parameters() if p.requires_grad)
    fresh, _ = _dora_model(arch, folders)
    rundir.load_weights(tmp_path, fresh)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(**_batch()).logits, model(**_batch()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_merge_equals_unmerged_and_unmerge_restores(arch, folders):
    model, _ = _dora_model(arch, folders)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    reference = model(**_batch()).logits
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    METHODS["lora"].merging.merge(model)
    assert all(m.merged for m in model.modules() if isinstance(m, lora.LoRALinear))
    torch.testing.assert_close(model(**_batch()).logits, reference, rtol=0, atol=1e-5)
    METHODS["lora"].merging.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, base_weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(**_batch()).logits, reference, rtol=0, atol=1e-6)
    METHODS["lora"].merging.merge(model)
    plain = unwrap_merged(copy.deepcopy(model))
    assert not any(isinstance(m, lora.LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(**_batch()).logits, reference, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def dora_runs(tiny_bert, tiny_llama, cls_data, sft_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dora-runs")
    runs = {}
    for kind, model, data, extra in (("cls", tiny_bert, cls_data, {}), ("sft", tiny_llama, sft_data, {"rslora": True})):
        method = {"name": "lora", "r": 4, "alpha": 8, "dora": True, **extra}
        train(validate_recipe(recipe_doc(kind, model, data, root / kind, method)))
        runs[kind] = root / kind
    return runs


def _run_logits(run):
    _, model, _ = load_run(run)
    with torch.no_grad():
        return model(**_inputs()).logits


@pytest.mark.parametrize("kind", ["cls", "sft"])
def test_peft_export_round_trip(kind, dora_runs, folders, tmp_path):
    """`ftune export --format peft` of a DoRA run: use_dora and the magnitudes under peft's key; peft's outputs
    equal."""
    import json

    from safetensors.torch import load_file

    run = dora_runs[kind]
    out = export.export_peft(run, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert any(k.endswith(".lora_magnitude_vector.weight") for k in keys)
    base = _base("bert" if kind == "cls" else "llama", folders)
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        assert (loaded(**_inputs()).logits - _run_logits(run)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["cls", "sft"])
def test_merged_run_loads_with_transformers(kind, dora_runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if kind == "cls" else AutoModelForCausalLM
    merged = auto.from_pretrained(export.merge_run(dora_runs[kind], tmp_path / "m")).eval()
    with torch.no_grad():
        assert (merged(**_inputs()).logits - _run_logits(dora_runs[kind])).abs().max() <= 1e-4
