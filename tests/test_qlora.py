"""QLoRA: a 4/8-bit bitsandbytes base under ftune's LoRA (and the other methods that train outside the base linears).

Training on CPU through `train()`: the loss falls, and the adapter keeps learning after an evaluation (bitsandbytes'
AVX512-BF16 inference repack would otherwise cut the input gradient of every repacked layer; a negative control
shows that it does on this CPU). Also: 8-bit loading, the recipe's refusals, the bitsandbytes optimizers, equality
with peft over the same quantised weights, and `ftune merge` of a quantised-base run.
"""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import recipe_doc
from ftune import assemble, models, rundir
from ftune.errors import MethodError, RecipeError
from ftune.layers.lora import LoRALinear
from ftune.methods import METHODS, attach, compose, lora, method_of
from ftune.methods.base import Trains, count_parameters
from ftune.models import quantize
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.serve import export
from ftune.step.optim import make_optimizer

bnb = pytest.importorskip("bitsandbytes")

NF4 = {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}


def _recipe(kind, model, data, out, method=None, quantization=None, **train_args):
    doc = recipe_doc(kind, model, data, out, method or {"name": "lora", "r": 4, "alpha": 8}, **train_args)
    doc["model"]["quantization"] = quantization or NF4
    return validate_recipe(doc)


def _train(recipe):
    return train(recipe, console=Console(file=io.StringIO()))


def _inputs():
    ids = torch.randint(5, 25, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


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


def _refused() -> list[str]:
    """The methods whose test_methods case trains base weights (a composite: by what its parts train); not a part
    that only joins a list (l2sp), which is refused alone before any other check."""
    from test_methods import CASES

    return [
        name
        for name, m in METHODS.items()
        if m.trains is not Trains.NOTHING
        if not (
            m.runs_with.quantized_base
            or (
                isinstance(CASES[name], dict)
                and method_of(m.config_cls(name=name, **CASES[name])).runs_with.quantized_base
            )
        )
    ]


REFUSED = _refused()


@pytest.mark.parametrize("name", REFUSED)
def test_quantization_refused_for_methods_that_train_base_weights(name, tiny_llama, sft_data, tmp_path):
    from test_methods import CASES

    assert {"full", "bitfit", "layers"} <= set(REFUSED)
    doc = recipe_doc("sft", tiny_llama, sft_data, tmp_path / "run", {"name": name, **CASES[name]})
    doc["model"]["quantization"] = {"bits": 4}
    with pytest.raises(RecipeError) as caught:
        validate_recipe(doc)
    message = str(caught.value)
    assert "\n" not in message and "model.quantization" in message and name in message


@pytest.mark.parametrize(
    "quantization,expected",
    [
        ({"bits": 8, "quant_type": "fp4"}, "quant_type applies to 4-bit"),
        ({"bits": 8, "double_quant": False}, "double_quant applies to 4-bit"),
        ({"bits": 4, "int8_threshold": 3.0}, "int8_threshold applies to 8-bit"),
        ({"bits": 3}, "model.quantization.bits"),
        ({"bits": 4, "block_size": 128}, "model.quantization.block_size: unknown key"),
    ],
)
def test_quantization_fields_are_validated(quantization, expected, tiny_llama, sft_data, tmp_path):
    doc = recipe_doc("sft", tiny_llama, sft_data, tmp_path / "run")
    doc["model"]["quantization"] = quantization
    with pytest.raises(RecipeError, match=expected):
        validate_recipe(doc)


@pytest.mark.parametrize(
    "name,state_dtype",
    [
        ("adamw_8bit", torch.uint8),
        ("paged_adamw_8bit", torch.uint8),
        ("paged_adamw_32bit", torch.float32),
        ("paged_adamw", torch.float32),
    ],
)
def test_bitsandbytes_optimizers(name, state_dtype):
    weight = torch.nn.Parameter(torch.randn(128, 64))  # >= 4096 elements: bitsandbytes keeps smaller ones in 32 bits
    optimizer = make_optimizer(name, [weight], lr=1e-2, weight_decay=0.0)
    assert type(optimizer).__module__.startswith("bitsandbytes")
    weight.grad = torch.randn_like(weight)
    before = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, weight)
    assert optimizer.state[weight]["state1"].dtype == state_dtype
    reloaded = make_optimizer(name, [weight], lr=1e-2, weight_decay=0.0)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))  # ftune's checkpoints load weights_only


def test_paged_8bit_optimizer_through_the_recipe(tiny_llama, sft_data, tmp_path):
    recipe = _recipe("sft", tiny_llama, sft_data, tmp_path / "run", max_steps=3, optimizer="paged_adamw_8bit")
    assert recipe.train.optimizer == "paged_adamw_8bit"
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):  # bitsandbytes says so on CPU
        result = _train(recipe)
    assert result["step"] == 3 and torch.isfinite(torch.tensor(result["validation"]["loss"]))


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


def test_cli_train_with_set_quantization(tiny_llama, sft_data, tmp_path):
    from typer.testing import CliRunner

    from conftest import write_recipe
    from ftune.cli import app

    path = write_recipe(tmp_path / "r.yaml", recipe_doc("sft", tiny_llama, sft_data, tmp_path / "run", max_steps=2))
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(path),
            "--set",
            "model.quantization={bits: 4, compute_dtype: float32}",
            "--set",
            "train.optimizer=adamw_8bit",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    unquantized = validate_recipe(recipe_doc("sft", tiny_llama, sft_data, tmp_path / "other"))
    source, tokenizer = assemble.source_and_tokenizer(unquantized)
    expected = count_parameters(assemble.build_model(unquantized, source, tokenizer, None))
    assert (record["trainable_params"], record["total_params"]) == expected  # 4-bit weights count their logical shape


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


@pytest.mark.parametrize("which", ["sft", "sft-dora"])
def test_peft_export_of_a_qlora_run_loads_over_a_quantised_base(which, qlora_runs, tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    out = export.export_peft(qlora_runs[which], tmp_path / "adapter")
    base, _ = models.load_model("causal_lm", str(tiny_llama), quantization=quantize.Quantization(**NF4))
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    _, ours, _ = assemble.load_run(qlora_runs[which])
    with torch.no_grad():
        assert (loaded(**_inputs()).logits - ours(**_inputs()).logits).abs().max() <= 1e-5
