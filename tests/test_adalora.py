"""AdaLoRA: peft equivalence (forward, regulariser, and rank allocation in lockstep), ranks really reallocated by the
real loop, the orthogonality term falling, exact resume of ranks and importance, and one-line config errors."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune.assemble import load_run
from ftune.cli import app
from ftune.errors import MethodError, RecipeError
from ftune.layers import svd as svd_lora
from ftune.layers.svd import svd_layers
from ftune.methods import METHODS, adalora
from ftune.methods.base import Resume, set_trainable
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.rundir import METHOD_STATE, latest_checkpoint
from ftune.serve import export

peft = pytest.importorskip("peft")


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 25, (3, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _twins(base: torch.nn.Module, cfg: adalora.Config, total_step: int):
    """ftune's AdaLoRA and peft's AdaLoraModel on copies of `base`, holding the same P, Λ, Q (Λ random, not 0)."""
    ours = adalora.apply(copy.deepcopy(base), cfg)
    peft_cfg = peft.AdaLoraConfig(
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        lora_alpha=cfg.alpha,
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        deltaT=cfg.deltaT,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        total_step=total_step,
        target_modules=list(svd_layers(ours)),
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg).base_model  # AdaLoraModel: adds the regulariser
    torch.manual_seed(1)
    with torch.no_grad():
        for name, layer in svd_layers(ours).items():
            layer.lora_E.normal_(std=0.5)
            target = theirs.model.get_submodule(name)
            for part in svd_lora.PARTS:
                getattr(target, part)["default"].copy_(getattr(layer, part))
    return ours, theirs


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_forward_and_regulariser_equal_peft(arch, tiny_bert, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if arch == "bert":
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ours, theirs = _twins(base, adalora.Config(init_r=6, target_r=3, alpha=12), total_step=10)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert (ours(**_inputs()).logits - theirs(**_inputs()).logits).abs().max() <= 1e-5
    if arch == "llama":  # no dropout: the training loss, regulariser included, is comparable
        ours.train(), theirs.train()
        batch = _inputs() | {"labels": _inputs()["input_ids"]}
        out = ours(**batch)
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        task = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        assert torch.allclose(out.loss, task, atol=1e-6)  # the model's own loss is the task's: no hook adds to it
        term = METHODS["adalora"].hooks.loss_term(ours)  # what the loop adds (grad_accum 1)
        reg = svd_lora.orthogonality(list(svd_layers(ours).values()))
        assert reg > 0 and torch.allclose(term, 0.5 * reg, atol=1e-7)  # orth_reg_weight from the config
        assert (task + term - theirs(**batch).loss).abs() <= 1e-5  # peft adds the regulariser to outputs.loss


def test_rank_allocation_equals_peft_in_lockstep(tiny_llama):
    """Same weights, data and optimizer: after every step ftune's hook and peft's update_and_allocate prune the
    same triplets (the warm-up, the falling budget masked every deltaT steps, the final mask, the fixed phase)."""
    from transformers import AutoModelForCausalLM

    total = 12
    cfg = adalora.Config(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, beta1=0.8, beta2=0.9)
    ours, theirs = _twins(AutoModelForCausalLM.from_pretrained(tiny_llama), cfg, total_step=total)
    with torch.no_grad():
        for name, layer in svd_layers(ours).items():  # both start from Λ = 0, as in training
            layer.lora_E.zero_()
            theirs.model.get_submodule(name).lora_E["default"].zero_()
    set_trainable(ours, adalora.trainable(ours, cfg))  # peft trains its own factors only, too
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2) for m in (ours, theirs)]
    assert len({sum(p.numel() for p in opt.param_groups[0]["params"]) for opt in optimizers}) == 1
    ours.train(), theirs.train()
    kept = {}  # total rank after each step at which peft has a rank pattern
    for step in range(1, total + 1):
        batch = _inputs(step) | {"labels": _inputs(step)["input_ids"]}
        ours_loss = ours(**batch).loss + adalora.loss_term(ours)  # as the loop adds it; peft's loss includes it
        for loss, optimizer in zip((ours_loss, theirs(**batch).loss), optimizers):
            loss.backward()
            optimizer.step()
        adalora.on_step_end(ours, step, total)
        theirs.update_and_allocate(step)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            kept[step] = sum(int(m.rank_mask.sum()) for m in svd_layers(ours).values())
            for name, layer in svd_layers(ours).items():
                assert layer.rank_mask.tolist() == pattern[f"{name}.lora_E.default"], (step, name)
        for name, layer in svd_layers(ours).items():
            their_e = theirs.model.get_submodule(name).lora_E["default"]
            torch.testing.assert_close(layer.lora_E, their_e, rtol=0, atol=1e-6)
    assert min(kept) == 4  # the first multiple of deltaT after tinit
    budgets = list(kept.values())
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    ranks = [int(m.rank_mask.sum()) for m in svd_layers(ours).values()]
    assert sum(ranks) == cfg.target_r * len(ranks) and len(set(ranks)) > 1


# the real loop: 10 steps of the tiny BERT; budget falls over steps 2-7, final ranks fixed over steps 8-10
RUN = {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 3, "deltaT": 1, "alpha": 8}


def _train(tiny_bert, cls_data, out, method=None):
    doc = recipe_doc("cls", tiny_bert, cls_data, out, {**RUN, **(method or {})}, max_steps=10, lr=2e-2)
    metrics = train(validate_recipe(doc))
    return json.loads((out / "method_report.json").read_text()), metrics


def _with_hooks(**hooks):
    """AdaLoRA's record with some of its loop hooks replaced."""
    return dataclasses.replace(METHODS["adalora"], hooks=dataclasses.replace(METHODS["adalora"].hooks, **hooks))


@pytest.fixture(scope="module")
def hooked_run(tiny_bert, cls_data, tmp_path_factory):
    """One run through ftune's train() with a spy after the real hook: its calls and R(P, Q) after each step."""
    calls, orthogonality, real = [], [], METHODS["adalora"].hooks.on_step_end

    def hook(model, step, total_steps):
        real(model, step, total_steps)
        calls.append((step, total_steps))
        with torch.no_grad():
            orthogonality.append(float(svd_lora.orthogonality(list(svd_layers(model).values()))))

    out = tmp_path_factory.mktemp("adalora") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(METHODS, "adalora", _with_hooks(on_step_end=hook))
        report, metrics = _train(tiny_bert, cls_data, out)
    return {"dir": out, "report": report, "metrics": metrics, "calls": calls, "orthogonality": orthogonality}


def test_loop_calls_the_hook_and_ranks_are_reallocated(hooked_run):
    report = hooked_run["report"]
    assert hooked_run["calls"] == [(step, 10) for step in range(1, 11)]
    assert report == hooked_run["metrics"]["method_report"]
    ranks = report["ranks"]
    assert len(ranks) == 2 * 6 + 1  # tiny BERT: 6 linears per block, 2 blocks, the pooler
    assert report["budget"] == sum(ranks.values()) == report["target_budget"] == 2 * len(ranks)
    assert report["initial_budget"] == 4 * len(ranks)
    assert len(set(ranks.values())) > 1, "every matrix kept the same rank: nothing was reallocated"
    # the saved weights carry the ranks: exactly the kept singular values are nonzero
    weights = load_file(hooked_run["dir"] / "method.safetensors")
    assert {name: int((weights[f"{name}.lora_E"] != 0).sum()) for name in ranks} == ranks


def test_without_the_hook_ranks_stay_at_init_r(tiny_bert, cls_data, tmp_path, monkeypatch):
    """What users of a loop that forgets the hook get: plain LoRA in SVD form. The report shows it."""
    monkeypatch.setitem(METHODS, "adalora", _with_hooks(on_step_end=None))
    report, _ = _train(tiny_bert, cls_data, tmp_path / "run")
    assert set(report["ranks"].values()) == {4}
    assert report["budget"] == report["initial_budget"] != report["target_budget"]


def test_orthogonality_falls_and_the_regulariser_is_why(hooked_run, tiny_bert, cls_data, tmp_path):
    orthogonality = hooked_run["orthogonality"]
    assert hooked_run["report"]["orthogonality"] == pytest.approx(orthogonality[-1])
    assert orthogonality[-1] < 0.8 * orthogonality[0]
    assert sum(b < a for a, b in itertools.pairwise(orthogonality)) >= 8
    without, _ = _train(tiny_bert, cls_data, tmp_path / "noreg", method={"orth_reg_weight": 0.0})
    assert orthogonality[-1] < without["orthogonality"] - 0.2


# (tinit, tfinal) with the resume at step 4 of 6: while the budget falls (importance decides step 5's final mask),
# and in the fixed phase (the saved rank mask is reapplied at steps 5 and 6)
@pytest.mark.parametrize("tinit,tfinal", [(1, 1), (1, 3)], ids=["falling-budget", "final-phase"])
def test_resume_restores_ranks_and_importance(tinit, tfinal, tiny_bert, cls_data, tmp_path, monkeypatch):
    method = {**RUN, "tinit": tinit, "tfinal": tfinal, "dropout": 0.1}
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
        lr=2e-2,
    )
    recipe, run = validate_recipe(doc), tmp_path / "run"

    def finish(resume: bool) -> tuple[dict, dict, dict]:
        train(recipe, resume=resume)
        state = load_file(latest_checkpoint(run) / METHOD_STATE)
        return load_file(run / "method.safetensors"), state, json.loads((run / "method_report.json").read_text())

    def crash_after_step_4():
        shutil.rmtree(run / "checkpoints" / "step-00000006")
        assert latest_checkpoint(run).name == "step-00000004"

    weights, state, report = finish(resume=False)
    assert any(not t.all() for k, t in state.items() if k.endswith("rank_mask"))
    assert any(t.abs().sum() > 0 for k, t in state.items() if k.endswith("_sensitivity"))
    crash_after_step_4()
    resumed = finish(resume=True)
    for expected, got in zip((weights, state), resumed[:2]):
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
    assert resumed[2] == report

    # the comparison can fail: a resume that drops the method state ends elsewhere
    crash_after_step_4()
    forgets = Resume(METHODS["adalora"].hooks.resume.save, lambda model, state: None)  # saves, never loads
    monkeypatch.setitem(METHODS, "adalora", _with_hooks(resume=forgets))
    forgetful = finish(resume=True)
    assert any(not torch.equal(forgetful[0][n], t) for n, t in weights.items())


def test_peft_export_loads_in_peft(hooked_run, tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = export.export_peft(hooked_run["dir"], tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    _, model, _ = load_run(hooked_run["dir"])
    with torch.no_grad():
        assert (loaded(**_inputs()).logits - model(**_inputs()).logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "override,message",
    [
        ({"target_r": 6}, "method: target_r (6) must be below init_r (4)"),
        ({"target_r": 4}, "method: target_r (4) must be below init_r (4)"),
        ({"beta1": 1.0}, "method.beta1: "),
        ({"deltaT": 0}, "method.deltaT: "),
        ({"orth_reg_weight": -0.1}, "method.orth_reg_weight: "),
        ({"tinit": -1}, "method.tinit: "),
        ({"r": 8}, "method.r: unknown key"),
    ],
)
def test_bad_config_is_one_line(override, message, tiny_bert, cls_data, tmp_path):
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", {**RUN, **override})
    with pytest.raises(RecipeError) as error:
        validate_recipe(doc)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("tinit,tfinal", [(6, 4), (10, 0), (0, 10)])
def test_schedule_longer_than_the_run_is_refused_before_anything_is_written(
    tinit, tfinal, tiny_bert, cls_data, tmp_path
):
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", {**RUN, "tinit": tinit, "tfinal": tfinal})
    with pytest.raises(
        MethodError, match=rf"tinit \+ method.tfinal \({tinit} \+ {tfinal}\) must be below the run's 4 "
    ):
        train(validate_recipe(doc))
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
