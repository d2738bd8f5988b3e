"""L2-SP (ftune/methods/l2sp.py): the penalty against a direct computation, its gradients, weight decay off for its
parameters, its place in a method list (with full, sparse) and the refusals."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import recipe_doc
from ftune import models
from ftune.errors import RecipeError
from ftune.methods import attach, method_of
from ftune.recipe import validate_recipe
from ftune.run.setup import prepare
from ftune.run.train import train
from ftune.rundir import latest_checkpoint

TASK = "sequence_classification"
ALPHA, BETA = 0.3, 0.2


def _build(tiny_bert, parts):
    cfg = validate_recipe(recipe_doc("cls", tiny_bert, tiny_bert, tiny_bert / "unused", parts)).method
    torch.manual_seed(0)
    model, missing = models.load_model(TASK, str(tiny_bert), num_labels=2, pad_token_id=0)
    model = attach(model, cfg, models.head_parameters(model, TASK, missing))
    method = method_of(cfg)
    method.hooks.calibrate(model, cfg, [], None)
    return model, method


def _split(model):
    """(pretrained trainable, head) by hand: the head is what lies outside the body (BERT's classifier)."""
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {n: p for n, p in trained.items() if n not in head}, {n: p for n, p in trained.items() if n in head}


def test_penalty_is_the_formula_and_zero_at_start(tiny_bert):
    model, method = _build(tiny_bert, [{"name": "full"}, {"name": "l2sp", "alpha": ALPHA, "beta": BETA}])
    pretrained, head = _split(model)
    head_term = BETA / 2 * sum(p.detach().square().sum() for p in head.values())
    torch.testing.assert_close(method.hooks.loss_term(model).detach(), head_term)  # w = w0: only β's part
    start = {n: p.detach().clone() for n, p in pretrained.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    direct = ALPHA / 2 * sum((p - start[n]).square().sum() for n, p in pretrained.items()) + BETA / 2 * sum(
        p.square().sum() for p in head.values()
    )
    torch.testing.assert_close(method.hooks.loss_term(model), direct)


def test_gradients_pull_toward_the_start_and_decay_the_head(tiny_bert):
    model, method = _build(tiny_bert, [{"name": "full"}, {"name": "l2sp", "alpha": ALPHA, "beta": BETA}])
    pretrained, head = _split(model)
    start = {n: p.detach().clone() for n, p in pretrained.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    method.hooks.loss_term(model).backward()
    for n, p in pretrained.items():
        torch.testing.assert_close(p.grad, ALPHA * (p.detach() - start[n]))
    for p in head.values():
        torch.testing.assert_close(p.grad, BETA * p.detach())


def test_with_sparse_the_penalty_is_on_the_values(tiny_bert):
    model, method = _build(
        tiny_bert,
        [{"name": "sparse", "selection": "random", "density": 0.05}, {"name": "l2sp", "alpha": ALPHA, "beta": 0.0}],
    )
    values = model.bert.sparse_delta.values
    assert method.hooks.loss_term(model) == 0
    with torch.no_grad():
        values.normal_()
    torch.testing.assert_close(method.hooks.loss_term(model), ALPHA / 2 * values.detach().square().sum())


def test_weight_decay_is_off_for_its_parameters(tiny_bert, cls_data, tmp_path):
    parts = [{"name": "layers", "top_k": 1}, {"name": "l2sp"}]
    recipe = validate_recipe(recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", parts, weight_decay=0.1))
    run = prepare(recipe, resume=False, overwrite=False, console=Console(file=io.StringIO()))
    groups = run.optimizer.param_groups
    trained = {id(p) for p in run.raw_model.parameters() if p.requires_grad}
    assert {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]} == trained
    plain = validate_recipe(
        recipe_doc("cls", tiny_bert, cls_data, tmp_path / "plain", {"name": "layers", "top_k": 1}, weight_decay=0.1)
    )
    groups = prepare(plain, resume=False, overwrite=False, console=Console(file=io.StringIO())).optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1]


@pytest.mark.parametrize(
    "parts,needle",
    [
        ([{"name": "l2sp"}], "method: l2sp trains nothing itself"),
        (
            [{"name": "lora"}, {"name": "l2sp"}],
            "method: l2sp pulls trained pretrained weights toward their start, but lora",
        ),
        ([{"name": "full"}, {"name": "bitfit"}, {"name": "l2sp"}], "full already trains every weight"),
    ],
    ids=["alone", "lora", "full-and-more"],
)
def test_refused_at_validation_in_one_line(parts, needle, tiny_bert):
    with pytest.raises(RecipeError) as caught:
        validate_recipe(recipe_doc("cls", tiny_bert, tiny_bert, tiny_bert / "unused", parts))
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_resume_equals_uninterrupted(tmp_path, tiny_bert, cls_data):
    """w0 travels in the checkpoint: a resumed run pulls toward the pretrained weights, not the resumed ones."""
    parts = [{"name": "full"}, {"name": "l2sp", "alpha": 1.0, "beta": 0.1}]
    doc = recipe_doc(
        "cls",
        tiny_bert,
        cls_data,
        tmp_path / "run",
        parts,
        max_steps=6,
        save_every=2,
        keep_checkpoints=3,
        weight_decay=0.1,
    )
    recipe, run = validate_recipe(doc), tmp_path / "run"
    train(recipe)
    expected = load_file(run / "method.safetensors")
    expected_final = json.loads((run / "metrics.json").read_text())["validation"]
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    assert latest_checkpoint(run).name == "step-00000004"
    train(recipe, resume=True)
    resumed = load_file(run / "method.safetensors")
    assert all(torch.equal(resumed[n], t) for n, t in expected.items())
    assert json.loads((run / "metrics.json").read_text())["validation"] == expected_final
