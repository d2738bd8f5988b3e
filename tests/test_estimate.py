"""The memory estimate of `ftune validate` (ftune/estimate/) against the peak each test measures itself.

The estimate runs the recipe's optimizer step on fake tensors and counts what it allocates; the measurement runs
the same step for real (`measure`: torch's profiler on CPU). Both are the memory a training step needs on top of the
loaded model, at the recipe's batch × max_length. Tiny models keep the tests fast; their steps still need a few MiB
(activations at 8 × 32 and 8 × 128 tokens dominate), far above any fixed overhead, which the increment leaves out.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import pref_recipe_doc, recipe_doc, write_recipe
from ftune import assemble
from ftune.cli import app
from ftune.estimate.report import estimate_recipe
from ftune.recipe import validate_recipe

LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}
CASES = {  # kind, method, gradient checkpointing
    "bert-lora": ("cls", LORA, False),
    "bert-full": ("cls", {"name": "full"}, False),
    "bert-lora-checkpointed": ("cls", LORA, True),
    "llama-lora": ("sft", LORA, False),
    "llama-lora-checkpointed": ("sft", LORA, True),
    # AdapterDrop (Rücklé et al. 2021): block 0's adapter skipped, so backward stops at block 1
    "bert-adapter-drop": ("cls", {"name": "adapter_drop", "drop_first": 1}, False),
    # robust: k ~ U{0, 1} per batch; the measured steps make the simulated step's draw
    "bert-adapter-drop-robust": ("cls", {"name": "adapter_drop", "drop_first": 1, "robust": True}, False),
    # DPO: the reference is the policy with LoRA switched off; one pair of 16 tokens, so that the step is small
    # beside the weights (a reference forward on the real weights would count them again)
    "llama-dpo": ("pref", LORA, False),
}
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def estimated(tiny_bert, tiny_llama, cls_data, sft_data, pref_data, tmp_path_factory):
    """case name -> (recipe, model, Estimate with a measurement), each built once for the module."""
    root = tmp_path_factory.mktemp("estimate")

    @functools.cache
    def run(name: str):
        kind, method, checkpointing = CASES[name]
        if kind == "pref":
            doc = pref_recipe_doc(
                tiny_llama,
                pref_data,
                root / name,
                {"name": "dpo"},
                method,
                batch_size=1,
                gradient_checkpointing=checkpointing,
            )
            doc["data"]["max_length"] = 16
        else:
            model, data = (tiny_bert, cls_data) if kind == "cls" else (tiny_llama, sft_data)
            doc = recipe_doc(kind, model, data, root / name, method, gradient_checkpointing=checkpointing)
        return _estimate(validate_recipe(doc), measure_steps=1)

    return run


def _estimate(recipe, measure_steps=None):
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    rows = assemble.read_split(recipe, "train")
    names = assemble.label_names(recipe, rows)
    model = assemble.build_model(recipe, source, tokenizer, names)
    return recipe, model, estimate_recipe(recipe, model, tokenizer, names, rows, measure_steps)


@pytest.mark.parametrize("case", CASES)
def test_estimate_is_within_15_percent_of_the_measured_peak(estimated, case):
    recipe, _, e = estimated(case)
    ratio = e.step.peak / e.measured.peak
    assert 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, (case, e.step, e.measured)
    rows, length, _ = e.batch
    per_example = 2 if assemble.recipe_task(recipe).paired else 1  # a preference pair is two rows
    assert (rows, length) == (per_example * recipe.train.batch_size, recipe.data.max_length)


def test_simulation_runs_the_hooks_on_its_copy_and_keeps_the_generator(tiny_bert, cls_data, tmp_path):
    """AdapterDrop's pre-hook closes over the adapters it switches: the simulated step switches the copy's (so it
    does not run block 0's adapter) and leaves the model's, and the caller's random generator, as they were."""
    from ftune.estimate import step
    from ftune.estimate.simulate import simulate
    from ftune.layers.bottleneck import adapters_by_block

    plain = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "plain", {"name": "adapter"})
    recipe = validate_recipe(
        recipe_doc(
            "cls", tiny_bert, cls_data, tmp_path / "drop", {"name": "adapter_drop", "drop_first": 1, "robust": True}
        )
    )
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    rows = assemble.read_split(recipe, "train")
    names = assemble.label_names(recipe, rows)
    model = assemble.build_model(recipe, source, tokenizer, names)
    setup, batch = step.prepare_step(recipe, model, tokenizer, names, rows, torch.device("cpu"))
    torch.manual_seed(1)  # the robust draw from this state is k = 1 (block 0's adapter skipped)
    before = torch.get_rng_state()
    k = int(torch.randint(0, 2, ()))
    torch.set_rng_state(before)
    dropped = simulate(model, batch, setup, False)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(w.active for wrappers in adapters_by_block(model) for w in wrappers)
    _, _, every = _estimate(validate_recipe(plain))
    assert k == 1 and dropped.saved_for_backward < every.step.saved_for_backward


@pytest.mark.parametrize("case", ["bert-lora", "llama-lora-checkpointed"])
def test_parts_add_up_and_weights_are_the_model_bytes(estimated, case):
    _, model, e = estimated(case)
    assert e.peak == e.weight_bytes + sum(e.step.at_peak.values())
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
    }
    assert e.weight_bytes == sum(storages.values())
    assert e.step.at_peak["gradients"] <= e.gradient_bytes
    assert e.step.saved_for_backward > 0 and e.step.flops > 0


def test_gradients_and_adamw_state_follow_the_trainable_parameters(estimated):
    """AdamW keeps two fp32 moments per trainable element and a 0-dim fp32 step count per tensor."""
    counts = {}
    for case in ("bert-lora", "bert-full"):
        _, model, e = estimated(case)
        trained = [p for p in model.parameters() if p.requires_grad]
        assert e.trainable == sum(p.numel() for p in trained)
        assert e.gradient_bytes == 4 * e.trainable  # fp32 weights
        assert e.step.optimizer_state == 2 * 4 * e.trainable + 4 * len(trained)
        counts[case] = e
    full, lora = counts["bert-full"], counts["bert-lora"]
    assert full.trainable > 4 * lora.trainable and full.step.optimizer_state > 4 * lora.step.optimizer_state


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradient_checkpointing_lowers_the_peak_as_measured(estimated, kind):
    _, _, plain = estimated(f"{kind}-lora")
    _, _, checkpointed = estimated(f"{kind}-lora-checkpointed")
    assert checkpointed.step.saved_for_backward < plain.step.saved_for_backward / 2
    assert checkpointed.measured.peak < plain.measured.peak
    assert checkpointed.step.peak < plain.step.peak
    # each simulates the other setting too, and it is the other's own estimate
    assert plain.other.peak == checkpointed.step.peak and checkpointed.other.peak == plain.step.peak


def test_nf4_base_weights_at_their_packed_size(wide_llama, sft_data, tmp_path):
    """QLoRA's NF4 with double quantisation (Dettmers et al. 2023, §2): per weight half a byte, one uint8 absmax
    per 64 weights, one fp32 absmax per 256 of those, an fp32 offset, and the 16-entry NF4 and 256-entry absmax code
    books (fp32) of each layer."""
    bnb = pytest.importorskip("bitsandbytes")
    doc = recipe_doc("sft", wide_llama, sft_data, tmp_path / "out", LORA)
    doc["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}
    _, model, e = _estimate(validate_recipe(doc), measure_steps=1)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    expected = sum(
        n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + 4 * 16 + 4 * 256
        for n in (m.in_features * m.out_features for m in layers)
    )
    assert e.weights["nf4 4-bit"] == expected
    assert 1 - TOLERANCE <= e.step.peak / e.measured.peak <= 1 + TOLERANCE, (e.step, e.measured)


def test_8bit_adamw_state(wide_llama, sft_data, tmp_path):
    """bitsandbytes' AdamW8bit (Dettmers et al. 2022, block-wise quantisation): a tensor of 4,096 elements or more
    keeps two uint8 moments and one fp32 absmax per block of 256 for each; a smaller one two fp32 moments."""
    pytest.importorskip("bitsandbytes")
    doc = recipe_doc("sft", wide_llama, sft_data, tmp_path / "out", {"name": "full"}, optimizer="adamw_8bit")
    _, model, e = _estimate(validate_recipe(doc), measure_steps=1)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    assert any(n >= 4096 for n in sizes) and any(n < 4096 for n in sizes)
    expected = sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 2 * 4 * n for n in sizes)
    assert e.step.optimizer_state == expected
    assert 1 - TOLERANCE <= e.step.peak / e.measured.peak <= 1 + TOLERANCE, (e.step, e.measured)


runner = CliRunner()


def test_validate_prints_the_estimate_and_with_measure_the_measurement(tiny_bert, cls_data, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_doc("cls", tiny_bert, cls_data, tmp_path / "out"))
    plain = runner.invoke(app, ["validate", str(recipe)])
    assert plain.exit_code == 0, plain.output
    assert yaml.safe_load(plain.stdout)["train"]["batch_size"] == 8  # stdout stays the resolved recipe
    assert "memory of one training step" in plain.stderr and "peak" in plain.stderr
    assert "with gradient checkpointing on" in plain.stderr and "measured" not in plain.stderr
    measured = runner.invoke(app, ["validate", str(recipe), "--measure"])
    assert measured.exit_code == 0, measured.output
    assert "measured:" in measured.stderr and "s per optimizer step" in measured.stderr
    assert not (tmp_path / "out").exists()


def test_validate_names_missing_training_data(tiny_bert, cls_data, tmp_path):
    """The estimate's batch comes from the training rows, so validate now reads them even with data.labels set."""
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "out")
    doc["data"] |= {"train": str(tmp_path / "missing.tsv"), "labels": ["negative", "positive"]}
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.tsv" in lines[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_step_that_reads_activation_values_is_not_simulated():
    """A forward that reads a value of an activation (here to choose a shape) cannot run on fake tensors: the
    simulation says so instead of guessing (validate then prints that line in place of the table)."""
    from ftune.estimate.simulate import NotSimulated, simulate
    from ftune.estimate.step import StepSetup
    from ftune.objectives.base import Bound

    class ReadsItsActivations(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, input_ids):
            hidden = self.layer(input_ids.float())
            return hidden[: int(hidden.abs().argmax()) % 2 + 1]

    model = ReadsItsActivations()
    loss = Bound(loss=lambda m, b: (m(b["input_ids"]).sum(), torch.tensor(1)), count=lambda b: torch.tensor(1))
    setup = StepSetup(loss, None, lambda m: torch.optim.AdamW(m.parameters()), None, 1, "fp32", torch.device("cpu"))
    with pytest.raises(NotSimulated, match="_local_scalar_dense"):
        simulate(model, {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.zeros(2)}, setup, False)
