"""Soft prompts: ftune's prompt tuning, P-tuning and prefix tuning equal peft's on the same weights; padding side and
position ids are right (a padded row gives what it gives alone); the reparameterisation folds away on save; peft
loads `ftune export --format peft`; gradient checkpointing works (input prompts) or is refused (prefixes)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import peft_side, recipe_doc
from ftune import models, rundir
from ftune.assemble import load_run
from ftune.errors import RecipeError
from ftune.layers.soft_prompts import Prompt
from ftune.methods import METHODS, attach
from ftune.recipe import validate_recipe
from ftune.run import checkpoint
from ftune.run.train import train
from ftune.serve import export

peft = pytest.importorskip("peft")

N = 4
OURS = {  # method config, and the peft config with the same structure
    "prompt_tuning": ({"n_tokens": N}, lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N)),
    "p_tuning-mlp": (
        {"n_tokens": N, "encoder_hidden": 16},
        lambda task: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=16),
    ),
    "p_tuning-lstm": (
        {"n_tokens": N, "encoder": "lstm", "encoder_hidden": 8},
        lambda task: peft.PromptEncoderConfig(
            task_type=task, num_virtual_tokens=N, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
        ),
    ),
    "prefix_tuning": (
        {"n_tokens": N, "mlp_hidden": 16},
        lambda task: peft.PrefixTuningConfig(
            task_type=task, num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16
        ),
    ),
    "p_tuning_v2": (
        {"n_tokens": N, "dropout": 0.0},
        lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N),
    ),
}
TASKS = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2")


def _ours(case: str, folder, task: str, **extra):
    name = case.split("-")[0]
    cfg = METHODS[name].config_cls(name=name, **OURS[case][0], **extra)
    torch.manual_seed(0)
    base, missing = models.load_model(task, str(folder), num_labels=2, pad_token_id=0)
    reference = copy.deepcopy(base)
    model = attach(base, cfg, models.head_parameters(base, task, missing))
    with torch.no_grad():  # away from the initial values, so equality means something
        for p in model.source.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), reference


def _batch(rows: int = 3, width: int = 9, seed: int = 0):
    ids = torch.randint(5, 25, (rows, width), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("case", OURS)
def test_equals_peft_on_the_same_weights(case, arch, task, tiny_bert, tiny_llama):
    if arch == "bert" and task == "causal_lm":
        pytest.skip("the tiny BERT is an encoder: no causal LM")
    ours, base = _ours(case, tiny_bert if arch == "bert" else tiny_llama, task)
    theirs = peft.get_peft_model(base, OURS[case][1](TASKS[task])).eval()
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        if isinstance(ours.source, Prompt):  # a plain tensor: peft keeps it as its embedding table
            encoder.embedding.weight.copy_(ours.source.weight)
        else:
            encoder.load_state_dict(ours.source.state_dict())
    batch = _batch()
    with torch.no_grad():
        mine, reference = ours(**batch).logits, peft_side(lambda: theirs(**batch).logits)
    if task == "causal_lm" and not case.startswith(("prefix", "p_tuning_v2")):
        reference = reference[:, N:]  # peft returns the virtual positions too; ftune drops them
    assert mine.shape == reference.shape
    assert (mine - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("case", ["prompt_tuning", "p_tuning-mlp", "prefix_tuning"])
def test_padded_rows_equal_rows_alone(case, task, tiny_llama, tiny_bert):
    """Left- and right-padded decoder batches (and a right-padded encoder batch) give each row its unpadded output."""
    setups = [(tiny_llama, "left"), (tiny_llama, "right")] + ([(tiny_bert, "right")] if task != "causal_lm" else [])
    for folder, side in setups:
        model, _ = _ours(case, folder, task)
        rows = [torch.randint(5, 25, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5, 7)]
        ids, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(9 - len(row), 9) if side == "left" else slice(0, len(row))
            ids[i, span], mask[i, span] = row, 1
        with torch.no_grad():
            together = model(input_ids=ids, attention_mask=mask).logits
            for i, row in enumerate(rows):
                alone = model(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long)).logits[0]
                got = together[i][mask[i].bool()] if task == "causal_lm" else together[i]
                assert (got - alone).abs().max() <= 1e-5, (folder.name, side, i)


@pytest.mark.parametrize("case", ["p_tuning-lstm", "prefix_tuning"])
def test_reparameterisation_folds_away(case, tiny_bert, tmp_path):
    """method.safetensors holds the produced prompt only; a model rebuilt from it computes the same outputs."""
    model, _ = _ours(case, tiny_bert, "sequence_classification")
    method = METHODS[case.split("-")[0]]
    checkpoint.save_weights(tmp_path, model, {"method": method.name}, method.saving.weights(model))
    fresh, _ = _ours(case, tiny_bert, "sequence_classification")
    method.saving.fold(fresh)
    rundir.load_weights(tmp_path, fresh)
    assert sum(p.numel() for p in fresh.source.parameters()) == model.source().numel()
    batch = _batch()
    with torch.no_grad():
        assert (fresh(**batch).logits - model(**batch).logits).abs().max() <= 1e-6


def test_virtual_tokens_after_the_input(tiny_llama):
    """P-tuning's template x [P...] for a decoder classifier: the classifier reads the last virtual token."""
    model, _ = _ours("p_tuning-mlp", tiny_llama, "sequence_classification", tokens_before=1)
    batch = _batch()
    batch["attention_mask"][1, 6:] = 0
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(input_ids=batch["input_ids"][1:2, :6], attention_mask=torch.ones(1, 6, dtype=torch.long)).logits
    assert (together[1] - alone[0]).abs().max() <= 1e-5
    with pytest.raises(Exception, match="sequence classification only"):
        model(**batch, labels=batch["input_ids"])


def test_gradient_checkpointing(tiny_llama, cls_data, tmp_path):
    """Input prompts recompute exactly; prefixes, which live in the attention cache, are refused up front."""

    def gradients(checkpointing: bool):
        model, _ = _ours("prompt_tuning", tiny_llama, "causal_lm")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = _batch()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return model.source.weight.grad

    torch.testing.assert_close(gradients(True), gradients(False), rtol=1e-5, atol=1e-6)
    doc = recipe_doc(
        "cls", tiny_llama, cls_data, tmp_path / "r", {"name": "prefix_tuning"}, gradient_checkpointing=True
    )
    with pytest.raises(RecipeError, match="train.gradient_checkpointing: prefix_tuning"):
        validate_recipe(doc)


@pytest.fixture(scope="module")
def prompt_runs(tiny_bert, tiny_llama, cls_data, sft_data, tmp_path_factory):
    root, runs = tmp_path_factory.mktemp("prompt-runs"), {}
    for name in PROMPT_METHODS:
        for kind, folder, data in (("cls", tiny_bert, cls_data), ("sft", tiny_llama, sft_data)):
            method = {"name": name, "n_tokens": N} | ({"mlp_hidden": 16} if name == "prefix_tuning" else {})
            doc = recipe_doc(kind, folder, data, root / f"{name}-{kind}", method, lr=3e-2)
            train(validate_recipe(doc))
            runs[name, kind] = root / f"{name}-{kind}"
    return runs


@pytest.mark.parametrize("kind", ["cls", "sft"])
@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_peft_export_loads_in_peft(name, kind, prompt_runs, tiny_bert, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run = prompt_runs[name, kind]
    out = export.export_peft(run, tmp_path / "adapter")
    if kind == "cls":
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    _, ours, _ = load_run(run)
    batch = _batch()
    with torch.no_grad():
        mine, reference = ours(**batch).logits, peft_side(lambda: loaded(**batch).logits)
    if kind == "sft" and name != "prefix_tuning":
        reference = reference[:, N:]
    assert (mine - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_training_moves_only_the_prompt_and_head(name, prompt_runs):
    """A finished run's metrics exist and its saved weights are the prompt (folded) plus the head."""
    from safetensors.torch import load_file

    saved = load_file(str(prompt_runs[name, "cls"] / rundir.WEIGHTS))
    assert "source.weight" in saved and all(k == "source.weight" or k.startswith("model.") for k in saved)
    assert not any(k.startswith("source.") and k != "source.weight" for k in saved)


def test_saving_mid_training_stores_the_inference_prompt(tiny_llama):
    """A save during training (best weights, checkpoints) folds the encoder in eval mode: no dropped-out prompt is
    stored, and the random stream training draws from is left untouched (exact resume depends on it)."""
    model, _ = _ours("p_tuning-lstm", tiny_llama, "causal_lm", lstm_dropout=0.5)
    model.train()
    rng = torch.get_rng_state()
    saved = METHODS["p_tuning"].saving.weights(model)["source.weight"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.source.training  # training mode is restored
    model.source.eval()
    with torch.no_grad():
        assert torch.equal(saved, model.source())
