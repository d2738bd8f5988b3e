"""Finished QLoRA runs (NF4, fp32 compute; the module's `qlora_runs`): the loss falls through train() with
evaluations; `ftune merge` dequantises and folds into a plain model that transformers loads; the hot-swap merge is
refused on a quantised base; the peft export loads over a quantised base. And ftune's LoRA and DoRA forward equals
peft's over the same quantised weights."""

from __future__ import annotations

import json

import pytest
import torch

from ftune import assemble, models
from ftune.errors import MethodError
from ftune.layers.lora import LoRALinear
from ftune.methods import METHODS, lora
from ftune.models import quantize
from ftune.serve import export
from qlora_helpers import NF4, _inputs, _recipe, _train

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qlora_runs(tiny_bert, tiny_llama, cls_data, sft_data, tmp_path_factory):
    """Finished NF4 runs (fp32 compute): classification on tiny BERT, SFT on tiny Llama, and DoRA SFT."""
    root, runs = tmp_path_factory.mktemp("qlora-runs"), {}
    for name, kind, model, data, method in (
        ("cls", "cls", tiny_bert, cls_data, None),
        ("sft", "sft", tiny_llama, sft_data, None),
        ("sft-dora", "sft", tiny_llama, sft_data, {"name": "lora", "r": 4, "alpha": 8, "dora": True}),
    ):
        runs[name] = root / name
        runs[name + "/metrics"] = _train(_recipe(kind, model, data, root / name, method, max_steps=12, eval_every=4))
    return runs


def test_nf4_training_loss_falls(qlora_runs):
    """12 steps on the learnable SFT data, evaluated every 4 (each evaluation is an eval-mode forward without grad)."""
    run = qlora_runs["sft"]
    losses = [
        e["loss"]
        for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "loss" in e and "validation" not in e
    ]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    _, model, _ = assemble.load_run(run)
    wrapped = [m.base_layer for m in model.modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(isinstance(b, bnb.nn.Linear4bit) and b.weight.quant_type == "nf4" for b in wrapped)
    assert all(b.weight.quant_state.nested for b in wrapped)  # double_quant defaults on


@pytest.mark.parametrize(
    "which,auto",
    [
        ("cls", "AutoModelForSequenceClassification"),
        ("sft", "AutoModelForCausalLM"),
        ("sft-dora", "AutoModelForCausalLM"),
    ],
)
def test_merged_qlora_model_loads_with_transformers(which, auto, qlora_runs, tmp_path):
    """`ftune merge` dequantises, folds, and writes a plain model. Tolerance 1e-4, as for unquantised merges: with
    compute dtype fp32 the 4-bit forward multiplies by exactly the dequantised weight the merged model stores, so
    only fp32 summation order differs (W x + s B A x against (W + s B A) x)."""
    import transformers

    out = export.merge_run(qlora_runs[which], tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = getattr(transformers, auto).from_pretrained(out).eval()
    assert not any(quantize.is_quantized_linear(m) for m in merged.modules())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    _, quantized, _ = assemble.load_run(qlora_runs[which])
    assert quantize.is_quantized(quantized)
    with torch.no_grad():
        assert (merged(**_inputs()).logits - quantized(**_inputs()).logits).abs().max() <= 1e-4


def test_hot_swap_merge_refused_on_a_quantised_base(qlora_runs):
    _, model, _ = assemble.load_run(qlora_runs["sft"])
    with pytest.raises(MethodError, match="quantised"):
        METHODS["lora"].merging.merge(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_forward_equals_peft_over_the_same_quantised_weights(dora, wide_llama):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]

    def quantized():
        return models.load_model("causal_lm", str(wide_llama), quantization=quantize.Quantization(**NF4))[0]

    ours = lora.apply(quantized(), lora.Config(r=4, alpha=12, dora=dora, targets=targets))
    theirs = peft.get_peft_model(
        quantized(), peft.LoraConfig(r=4, lora_alpha=12, use_dora=dora, target_modules=targets)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_()
                target = theirs.base_model.model.get_submodule(name)
                assert isinstance(target.base_layer, bnb.nn.Linear4bit)
                target.lora_A["default"].weight.copy_(module.lora_A.weight)
                target.lora_B["default"].weight.copy_(module.lora_B.weight)
                if dora:
                    torch.testing.assert_close(
                        module.lora_magnitude_vector.weight,
                        target.lora_magnitude_vector["default"].weight,
                        rtol=0,
                        atol=1e-6,
                    )
                    module.lora_magnitude_vector.weight.mul_(1.1)
                    target.lora_magnitude_vector["default"].weight.copy_(module.lora_magnitude_vector.weight)
        ours.eval(), theirs.eval()
        assert (ours(**_inputs()).logits - theirs(**_inputs()).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("which", ["sft", "sft-dora"])
def test_peft_export_of_a_qlora_run_loads_over_a_quantised_base(which, qlora_runs, tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    out = export.export_peft(qlora_runs[which], tmp_path / "adapter")
    base, _ = models.load_model("causal_lm", str(tiny_llama), quantization=quantize.Quantization(**NF4))
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    _, ours, _ = assemble.load_run(qlora_runs[which])
    with torch.no_grad():
        assert (loaded(**_inputs()).logits - ours(**_inputs()).logits).abs().max() <= 1e-5
