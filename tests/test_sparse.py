"""Sparse fine-tuning (ftune/methods/sparse.py): the three mask selections against by-hand computations, sparse
storage and counts, exact merge, the optimizer's state, and a run end to end (eval, reload, resume)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune import assemble, models
from ftune.cli import app
from ftune.layers.sparse import stores
from ftune.methods import attach, method_of
from ftune.methods.base import count_parameters
from ftune.methods.sparse import Config
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.rundir import latest_checkpoint
from ftune.tasks import TASKS

TASK = "sequence_classification"


def _plain(tiny_bert):
    torch.manual_seed(0)
    model, missing = models.load_model(TASK, str(tiny_bert), num_labels=2, pad_token_id=0)
    return model, models.head_parameters(model, TASK, missing)


def _sparse(tiny_bert, **cfg):
    model, head = _plain(tiny_bert)
    cfg = Config(**cfg)
    return attach(model, cfg, head), cfg


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 25, (3, 8), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1])})
    return out


def _loss(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return TASKS[TASK].loss(model(**inputs).logits, batch["labels"])


def _body_params(model):
    return list(dict.fromkeys(model.base_model.parameters()))


def test_fisher_is_top_k_of_summed_squared_gradients(tiny_bert):
    model, cfg = _sparse(tiny_bert, selection="fisher", density=0.01, samples=5)
    method_of(cfg).hooks.calibrate(model, cfg, _batches(), _loss)
    reference, _ = _plain(tiny_bert)  # by hand: one example at a time, eval mode, squared gradients summed
    reference.eval()
    body = _body_params(reference)
    scores = [torch.zeros_like(p) for p in body]
    rows = [{k: v[i : i + 1] for k, v in b.items()} for b in _batches() for i in range(3)][:5]
    for row in rows:
        total, count = _loss(reference, row)
        grads = torch.autograd.grad(total / count, body, allow_unused=True)
        for s, g in zip(scores, grads):
            if g is not None:
                s += g.square()
    flat = torch.cat([s.view(-1) for s in scores])
    (store,) = stores(model)
    expected = torch.topk(flat, store.values.numel()).indices
    assert set(store.indices.tolist()) == set(expected.tolist())
    assert all(p.grad is None for p in model.parameters())  # calibration leaves nothing for the first step


def test_most_changed_keeps_what_moved_most_and_resets(tiny_bert):
    model, cfg = _sparse(tiny_bert, selection="most_changed", density=0.01, full_steps=3, full_lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    method_of(cfg).hooks.calibrate(model, cfg, _batches(), _loss)
    reference, head = _plain(tiny_bert)  # by hand: AdamW over body and head, the same steps and dropout draws
    start = [p.detach().clone() for p in _body_params(reference)]
    optimizer = torch.optim.AdamW(list(dict.fromkeys(_body_params(reference) + head)), lr=1e-2, weight_decay=0.0)
    reference.train()
    torch.manual_seed(1)
    for batch in (_batches() * 2)[:3]:
        total, count = _loss(reference, batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = torch.cat([(p.detach() - p0).abs().view(-1) for p, p0 in zip(_body_params(reference), start)])
    (store,) = stores(model)
    k = store.values.numel()
    expected = set(torch.topk(moved, k).indices.tolist())
    assert len(expected & set(store.indices.tolist())) >= 0.98 * k  # W+δ and W-in-place round differently
    for n, p in model.named_parameters():  # reset: every weight, the head too, where it started
        assert torch.equal(p, before[n]), n


def test_random_density_is_exact_and_counts_are_the_masks(tiny_bert):
    model, cfg = _sparse(tiny_bert, selection="random", density=0.03)
    method_of(cfg).hooks.calibrate(model, cfg, _batches(), _loss)
    (store,) = stores(model)
    size = sum(p.numel() for p in _body_params(_plain(tiny_bert)[0]))
    k = round(0.03 * size)
    assert store.values.numel() == store.indices.numel() == k
    assert store.indices.unique().numel() == k and 0 <= store.indices.min() and store.indices.max() < size
    head = sum(p.numel() for p in _plain(tiny_bert)[1])
    assert count_parameters(model)[0] == k + head


def test_merge_is_exact_and_unmerge_restores_bit_for_bit(tiny_bert):
    model, cfg = _sparse(tiny_bert, selection="random", density=0.05)
    method_of(cfg).hooks.calibrate(model, cfg, _batches(), _loss)
    with torch.no_grad():
        stores(model)[0].values.normal_()
    model.eval()
    batch = _batches(1)[0]
    reference = model(**batch).logits
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = method_of(cfg)
    method.merging.merge(model)
    assert torch.equal(model(**batch).logits, reference)
    method.merging.unmerge(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    with method.disabled(model):
        plain, _ = _plain(tiny_bert)
        torch.testing.assert_close(model(**batch).logits, plain.eval()(**batch).logits, rtol=0, atol=0)


def test_optimizer_state_is_k_entries(tiny_bert):
    model, _ = _sparse(tiny_bert, selection="random", density=0.02)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    _loss(model, _batches(1)[0])[0].backward()
    optimizer.step()
    (store,) = stores(model)
    state = optimizer.state[store.values]
    assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == store.values.numel()
    held = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim())
    head = sum(p.numel() for p in _plain(tiny_bert)[1])
    assert held == 2 * (store.values.numel() + head)  # against 2 x (N + head) for full fine-tuning


@pytest.fixture(scope="module")
def fisher_run(tiny_bert, cls_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse-run")
    doc = recipe_doc(
        "cls", tiny_bert, cls_data, root / "run", {"name": "sparse", "density": 0.02, "samples": 16}, max_steps=4
    )
    result = CliRunner().invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_run_stores_indices_and_values_and_eval_reloads_it(fisher_run):
    saved = load_file(fisher_run / "method.safetensors")
    _, model, _ = assemble.load_run(fisher_run)
    (store,) = stores(model)
    k = store.values.numel()
    assert saved["bert.sparse_delta.values"].shape == saved["bert.sparse_delta.indices"].shape == (k,)
    dense = {n for n in saved if not n.startswith("bert.sparse_delta.")}
    head = {n for n, p in model.named_parameters() if p.requires_grad and p is not store.values}
    assert dense == head  # nothing dense of the body but the weights the checkpoint lacked (the head)
    assert torch.equal(store.indices, saved["bert.sparse_delta.indices"])
    record = json.loads((fisher_run / "run.json").read_text())
    assert record["trainable_params"] == k + sum(saved[n].numel() for n in dense)
    result = CliRunner().invoke(app, ["eval", str(fisher_run)])
    assert result.exit_code == 0, result.output
    scored, final = json.loads(result.stdout), json.loads((fisher_run / "metrics.json").read_text())["validation"]
    assert scored.keys() - {"source"} == final.keys()
    for key, value in final.items():
        assert scored[key] == pytest.approx(value, abs=1e-6), key


def test_merged_export_equals_the_run(fisher_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _, model, _ = assemble.load_run(fisher_run)
    batch = {k: v for k, v in _batches(1)[0].items() if k != "labels"}
    expected = model(**batch).logits
    result = CliRunner().invoke(app, ["merge", str(fisher_run), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("sparse" in n or "parametrizations" in n for n in merged.state_dict())
    torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("selection", ["fisher", "most_changed"])
def test_resume_equals_uninterrupted(selection, tmp_path, tiny_bert, cls_data):
    method = {"name": "sparse", "selection": selection, "density": 0.02, "samples": 8, "full_steps": 2}
    doc = recipe_doc(
        "cls",
        tiny_bert,
        cls_data,
        tmp_path / "run",
        method,
        max_steps=6,
        save_every=2,
        keep_checkpoints=3,
        grad_accum=2,
        eval_every=2,
    )
    recipe, run = validate_recipe(doc), tmp_path / "run"
    train(recipe)
    expected = load_file(run / "method.safetensors")
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    assert latest_checkpoint(run).name == "step-00000004"
    train(recipe, resume=True)
    resumed = load_file(run / "method.safetensors")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[n], t) for n, t in expected.items())


def test_deepcopy_keeps_one_difference(tiny_bert):
    model, _ = _sparse(tiny_bert, selection="random", density=0.05)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        stores(twin)[0].values.fill_(1.0)
    assert stores(model)[0].values.abs().sum() == 0
    batch = _batches(1)[0]
    assert not torch.equal(twin.eval()(**batch).logits, model.eval()(**batch).logits)
