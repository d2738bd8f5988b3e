"""QLoRA in the recipe: `model.quantization` refused for the methods that train base weights, its fields validated,
the bitsandbytes optimizers (8-bit and paged state, saved and loaded), and `ftune train --set model.quantization=...`
counting 4-bit weights by their logical shape."""

from __future__ import annotations

import io
import json

import pytest
import torch

from conftest import recipe_doc
from ftune import assemble
from ftune.errors import RecipeError
from ftune.methods import METHODS, method_of
from ftune.methods.base import Trains, count_parameters
from ftune.recipe import validate_recipe
from ftune.step.optim import make_optimizer
from qlora_helpers import _recipe, _train

bnb = pytest.importorskip("bitsandbytes")


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
