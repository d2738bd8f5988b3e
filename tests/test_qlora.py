"""QLoRA: a 4/8-bit bitsandbytes base under ftune's LoRA (and the other methods that train outside the base linears),
on CPU.

The adapter keeps learning after an evaluation (bitsandbytes' AVX512-BF16 inference repack would otherwise cut the
input gradient of every repacked layer; a negative control shows that it does on this CPU). Also: 8-bit loading, the
head and missing layers left unquantised, the k-bit preparation, every quantizable method training over a 4-bit base,
and resume equal to an uninterrupted run.

Elsewhere: the recipe's refusals and the bitsandbytes optimizers (tests/test_qlora_recipe.py); finished runs, their
merge and peft export, and equality with peft (tests/test_qlora_runs.py).
"""

from __future__ import annotations

import io
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import recipe_doc
from ftune import assemble, models, rundir
from ftune.layers.lora import LoRALinear
from ftune.methods import METHODS, attach, compose, lora
from ftune.methods.base import Trains, count_parameters
from ftune.models import quantize
from ftune.recipe import validate_recipe
from ftune.run.train import train
from qlora_helpers import NF4, _inputs, _recipe, _train

bnb = pytest.importorskip("bitsandbytes")


def _checkpoint_weights(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / rundir.WEIGHTS))


def _moved_after_evaluation(wide_llama, sft_data, out) -> dict[str, bool]:
    """Train 2 steps, evaluate, train 2 more: which adapter tensors changed over the 2 steps after the evaluation.

    LoRA on q_proj and v_proj only: their gradient reaches them only through o_proj's quantised base path.
    """
    method = {"name": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
    _train(
        _recipe("sft", wide_llama, sft_data, out, method, max_steps=4, eval_every=2, save_every=2, keep_checkpoints=2)
    )
    before, after = _checkpoint_weights(out, 2), _checkpoint_weights(out, 4)
    assert before.keys() == after.keys() and len(before) == 2 * 2 * 2  # A and B of 2 linears in 2 blocks
    return {name: not torch.equal(before[name], after[name]) for name in before}


def _gradients_before_and_after_an_evaluation(wide_llama):
    """All-linear LoRA (B nonzero) over NF4: the gradients of one batch, before and after an eval-mode forward."""
    torch.manual_seed(0)
    model, missing = models.load_model("causal_lm", str(wide_llama), quantization=quantize.Quantization(**NF4))
    model = attach(model, lora.Config(r=4, alpha=8), models.head_parameters(model, "causal_lm", missing))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.1)
    batch = _inputs() | {"labels": _inputs()["input_ids"]}

    def gradients():
        model.train()
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(**_inputs())
    return before, gradients()


def test_adapter_keeps_learning_after_an_evaluation(wide_llama, sft_data, tmp_path):
    moved = _moved_after_evaluation(wide_llama, sft_data, tmp_path / "run")
    assert all(moved.values()), sorted(name for name, changed in moved.items() if not changed)


def test_an_evaluation_leaves_the_gradients_unchanged(wide_llama):
    before, after = _gradients_before_and_after_an_evaluation(wide_llama)
    for name, grad in before.items():
        assert after[name] is not None, name
        torch.testing.assert_close(after[name], grad, rtol=0, atol=0)


def _unfixed(monkeypatch):
    fixed = quantize.after_loading

    def unfixed(model, missing_keys, dtype):
        fixed(model, missing_keys, dtype)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True

    monkeypatch.setattr(quantize, "after_loading", unfixed)


NO_AVX512_BF16 = "this CPU lacks AVX512-BF16, so bitsandbytes never repacks Linear4bit weights here"


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason=NO_AVX512_BF16)
def test_without_the_fix_adapters_stop_learning(wide_llama, sft_data, tmp_path, monkeypatch):
    """Negative control: bitsandbytes' CPU inference repack left on; after the evaluation q/v adapters learn nothing."""
    _unfixed(monkeypatch)
    moved = _moved_after_evaluation(wide_llama, sft_data, tmp_path / "run")
    assert not any(moved.values()), "the repack did not stop the adapters: the trap no longer reproduces here"


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason=NO_AVX512_BF16)
def test_without_the_fix_the_gradients_go_wrong(wide_llama, monkeypatch):
    """Negative control, all-linear: every adapter still gets a gradient (through its neighbours' LoRA paths), but
    not the right one: the quantised base path no longer passes gradient to its input."""
    _unfixed(monkeypatch)
    before, after = _gradients_before_and_after_an_evaluation(wide_llama)
    wrong = [n for n, g in before.items() if after[n] is None or not torch.allclose(after[n], g, rtol=1e-3, atol=1e-7)]
    assert wrong and any(".layers.0." in n for n in wrong)


def test_8bit_loads_and_trains(tiny_llama):
    model, missing = models.load_model("causal_lm", str(tiny_llama), quantization=quantize.Quantization(bits=8))
    model = attach(model, lora.Config(r=4, alpha=8), models.head_parameters(model, "causal_lm", missing))
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(isinstance(m.base_layer, bnb.nn.Linear8bitLt) for m in wrapped)
    assert all(m.base_layer.weight.dtype == torch.int8 for m in wrapped)
    with torch.no_grad():
        for m in wrapped:
            m.lora_B.weight.normal_(std=0.1)
    batch = _inputs() | {"labels": _inputs()["input_ids"]}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_head_and_missing_layers_stay_unquantised_and_train(tiny_bert):
    """BERT classification over a masked-LM checkpoint: the new classifier and the missing pooler must train, so
    they are plain nn.Linear; the encoder's linears are 4-bit; parameter counts use the logical shapes."""
    quantization = quantize.Quantization(**NF4)
    model, missing = models.load_model(
        "sequence_classification", str(tiny_bert), num_labels=2, quantization=quantization
    )
    plain, _ = models.load_model("sequence_classification", str(tiny_bert), num_labels=2)
    assert type(model.classifier) is torch.nn.Linear and type(model.bert.pooler.dense) is torch.nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert count_parameters(model)[1] == count_parameters(plain)[1]
    model = attach(model, lora.Config(r=4), models.head_parameters(model, "sequence_classification", missing))
    assert model.classifier.weight.requires_grad
    assert model.bert.pooler.dense.base_layer.weight.requires_grad  # LoRA wraps it (a body linear); it trains too


def test_preparation_keeps_norms_and_head_fp32_and_feeds_checkpointed_inputs(tiny_llama, sft_data, tmp_path):
    doc = recipe_doc("sft", tiny_llama, sft_data, tmp_path / "run", gradient_checkpointing=True)
    doc["model"] |= {"dtype": "bfloat16", "quantization": {"bits": 4}}
    recipe = validate_recipe(doc)
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    model = assemble.build_model(recipe, source, tokenizer, None)
    quantized = {id(m.weight) for m in model.modules() if quantize.is_quantized_linear(m)}
    others = [p for p in model.parameters() if id(p) not in quantized]
    assert quantized and others and all(p.dtype == torch.float32 for p in others)
    embedded = model.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    assert embedded.requires_grad  # a checkpointed segment always has a graph input, even with the body frozen


QUANTIZABLE = [name for name, m in METHODS.items() if m.runs_with.quantized_base and name != "adapter_fusion"]


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_every_quantizable_method_trains_over_a_4bit_base(name, tiny_llama):
    """The methods that declare `quantized_base` take a training step over NF4 linears (adapter_fusion: its stage-1
    adapters are the `adapter` method, checked here)."""
    from test_methods import CASES

    cfg = METHODS[name].config_cls(name=name, **CASES[name])
    if METHODS[name].trains is Trains.NOTHING:  # a part that trains nothing alone (shrink) joins LoRA
        cfg = compose.Config(methods=[cfg, lora.Config(r=4)])
    torch.manual_seed(0)
    model, missing = models.load_model("causal_lm", str(tiny_llama), quantization=quantize.Quantization(**NF4))
    model = attach(model, cfg, models.head_parameters(model, "causal_lm", missing))
    assert quantize.is_quantized(model)
    batch = _inputs() | {"labels": _inputs()["input_ids"]}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for m in model.modules() if quantize.is_quantized_linear(m) for p in m.parameters())


def test_resume_equals_uninterrupted(tiny_llama, sft_data, tmp_path):
    """A QLoRA DoRA run with 8-bit AdamW, stopped after a checkpoint and resumed, ends bitwise equal (the base is
    re-quantised on load: bitsandbytes' quantisation is deterministic)."""
    method = {"name": "lora", "r": 4, "alpha": 8, "dora": True, "dropout": 0.1}
    recipe = _recipe(
        "sft",
        tiny_llama,
        sft_data,
        tmp_path / "run",
        method,
        max_steps=6,
        save_every=2,
        keep_checkpoints=3,
        eval_every=2,
        optimizer="adamw_8bit",
    )
    run = tmp_path / "run"
    _train(recipe)
    expected = load_file(str(run / rundir.WEIGHTS))
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    train(recipe, resume=True, console=Console(file=io.StringIO()))
    resumed = load_file(str(run / rundir.WEIGHTS))
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
