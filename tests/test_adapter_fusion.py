"""AdapterFusion on tiny in-process models (BERT, Llama; T5 and BART, fusing in both stacks), over stage-1 `adapter`
runs made once per session (conftest). tests/test_seq2seq.py runs the seq2seq battery over it too."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import recipe_doc, s2s_recipe_doc, write_recipe
from ftune import models
from ftune.assemble import load_run
from ftune.cli import app
from ftune.errors import MethodError
from ftune.layers.bottleneck import Bottleneck
from ftune.methods import METHODS, attach
from ftune.methods.adapter_fusion import Config, Fusion
from ftune.recipe import dump_recipe, validate_recipe
from ftune.run.train import train

TASK = "sequence_classification"


def _fused(folder, runs):
    torch.manual_seed(0)
    model, missing = models.load_model(TASK, str(folder), num_labels=2, pad_token_id=0)
    head = models.head_parameters(model, TASK, missing)
    return attach(model, Config(adapters=[str(r) for r in runs]), head), head


def _batch(seed: int = 0):
    ids = torch.randint(5, 25, (4, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def _quiet():
    return Console(file=io.StringIO())


def test_stage2_trains_only_fusion_and_head(tiny_bert, adapter_runs):
    model, head = _fused(tiny_bert, adapter_runs["bert"])
    fusions = [m for m in model.modules() if isinstance(m, Fusion)]
    assert len(fusions) == 2 and all(len(f.adapters) == 2 for f in fusions)  # 2 blocks x 2 stage-1 adapters
    expected = {id(p) for f in fusions for lin in (f.query, f.key, f.value) for p in lin.parameters()}
    expected |= {id(p) for p in head}
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    query_before = fusions[0].query.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        model(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for j, run in enumerate(adapter_runs["bert"]):
        stage1 = load_file(str(run / "method.safetensors"))
        for i, f in enumerate(fusions):
            for name, p in f.adapters[j].named_parameters():
                assert torch.equal(p, stage1[f"bert.encoder.layer.{i}.output.dense.adapter.{name}"]), name
    assert not torch.equal(fusions[0].query.weight, query_before)  # while the fusion did train


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_one_adapter_reproduces_its_stage1_model(arch, tiny_bert, tiny_llama, adapter_runs):
    run = adapter_runs[arch][1]
    _, stage1, _ = load_run(run)
    fused, _ = _fused(tiny_bert if arch == "bert" else tiny_llama, [run])
    head = {k: v for k, v in load_file(str(run / "method.safetensors")).items() if ".adapter." not in k}
    fused.load_state_dict(head, strict=False)  # the stage-1 head, so the logits must match too
    fused.eval()
    batch = _batch()
    with torch.no_grad():
        want, got = stage1(**batch, output_hidden_states=True), fused(**batch, output_hidden_states=True)
    base = models.load_model(TASK, str(tiny_bert if arch == "bert" else tiny_llama), num_labels=2, pad_token_id=0)[0]
    with torch.no_grad():
        plain = base.eval()(**batch, output_hidden_states=True).hidden_states[-1]
    assert (want.hidden_states[-1] - plain).abs().max() > 1e-4  # the stage-1 adapter does change the output
    assert (got.hidden_states[-1] - want.hidden_states[-1]).abs().max() <= 1e-5
    assert (got.logits - want.logits).abs().max() <= 1e-5


def test_full_run_writes_a_report_and_rebuilds(tiny_bert, cls_data, adapter_runs, tmp_path):
    runs = [str(r) for r in adapter_runs["bert"]]
    doc = recipe_doc(
        "cls",
        tiny_bert,
        cls_data,
        tmp_path / "fusion",
        {"name": "adapter_fusion", "adapters": runs},
        eval_every=2,
        lr=5e-3,
    )
    metrics = train(validate_recipe(doc), console=_quiet())
    report = json.loads((tmp_path / "fusion" / "method_report.json").read_text())
    assert report == metrics["method_report"]
    assert report["adapters"] == runs
    assert len(report["layers"]) == 2  # one row per block of the tiny BERT
    for row in report["layers"]:
        assert len(row) == 2 and math.isclose(sum(row), 1.0, abs_tol=1e-5)
    # the sums restart at each evaluation: only the final one (16 rows, padding excluded) is counted
    _, rebuilt, tokenizer = load_run(tmp_path / "fusion")
    rows = (cls_data / "validation.tsv").read_text().splitlines()[1:]
    assert report["tokens"] == sum(len(tokenizer(r.split("\t")[0])["input_ids"]) for r in rows)
    assert len([m for m in rebuilt.modules() if isinstance(m, Fusion)]) == 2  # re-read from the stage-1 runs


def _two_fusions(weight: float) -> torch.nn.Module:
    """Two fusion layers of width 6 over two adapters each, as `loss_term` finds them in a model."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *(
            Fusion(
                torch.nn.Linear(6, 6),
                [Bottleneck(6, 3, "relu", 0.0, 1.0, False) for _ in range(2)],
                6,
                1.0,
                ["a", "b"],
                weight,
            )
            for _ in range(2)
        )
    )


def test_value_identity_term_is_zero_at_identity_and_the_papers_sum_elsewhere():
    """λ Σ_layers ‖I − V‖²_F (Pfeiffer et al. 2021): 0 at the start (V = I), the sum by hand after a change to V."""
    term = METHODS["adapter_fusion"].hooks.loss_term
    model = _two_fusions(0.03)
    assert float(term(model)) == 0.0
    with torch.no_grad():
        for f in model:
            f.value.weight.add_(torch.randn(6, 6) * 0.1)
    by_hand = sum(0.03 * float(((torch.eye(6) - f.value.weight) ** 2).sum()) for f in model)
    assert float(term(model)) == pytest.approx(by_hand, rel=1e-6) and by_hand > 0
    assert float(term(_two_fusions(0.0))) == 0.0


def test_value_identity_term_pulls_v_towards_the_identity():
    model = _two_fusions(0.01)
    with torch.no_grad():
        for f in model:
            f.value.weight.add_(torch.randn(6, 6) * 0.1)
    distance = [float((torch.eye(6) - f.value.weight).norm()) for f in model]
    METHODS["adapter_fusion"].hooks.loss_term(model).backward()
    with torch.no_grad():
        for f, before in zip(model, distance):
            assert f.query.weight.grad is None and f.key.weight.grad is None  # it acts on V only
            torch.testing.assert_close(f.value.weight.grad, 2 * 0.01 * (f.value.weight - torch.eye(6)))
            assert float((torch.eye(6) - (f.value.weight - 1.0 * f.value.weight.grad)).norm()) < before


def test_value_identity_weight_comes_from_the_config(tiny_bert, adapter_runs):
    torch.manual_seed(0)
    model, missing = models.load_model(TASK, str(tiny_bert), num_labels=2, pad_token_id=0)
    cfg = Config(adapters=[str(r) for r in adapter_runs["bert"]], value_identity_weight=0.5)
    model = attach(model, cfg, models.head_parameters(model, TASK, missing))
    fusions = [m for m in model.modules() if isinstance(m, Fusion)]
    with torch.no_grad():
        fusions[1].value.weight[0, 0] += 2.0
    assert float(METHODS["adapter_fusion"].hooks.loss_term(model)) == pytest.approx(0.5 * 4.0)
    assert Config(adapters=["x"]).value_identity_weight == 0.01  # the reference code's λ


@pytest.fixture(scope="module")
def lora_run(tiny_bert, cls_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "lora-run"
    train(validate_recipe(recipe_doc("cls", tiny_bert, cls_data, out, max_steps=1)), console=_quiet())
    return out


def _houlsby_run(tmp_path, tiny_bert, cls_data):
    out = tmp_path / "houlsby-run"
    out.mkdir()
    doc = recipe_doc("cls", tiny_bert, cls_data, out, {"name": "adapter", "placement": "houlsby"})
    (out / "recipe.yaml").write_text(dump_recipe(validate_recipe(doc)))
    (out / "run.json").write_text(json.dumps({"versions": {"ftune": "test"}}))
    for name in ("method.safetensors", "metrics.json"):
        (out / name).write_text("")
    return out


@pytest.mark.parametrize("case", ["missing", "unfinished", "lora", "houlsby", "other-model"])
def test_bad_stage1_runs_are_refused_in_one_line(case, tiny_bert, cls_data, adapter_runs, lora_run, tmp_path):
    good = adapter_runs["bert"][0]
    bad, words = {
        "missing": (tmp_path / "no-such-run", ["no such run directory"]),
        "unfinished": (tmp_path / "unfinished", ["not a finished ftune run"]),
        "lora": (lora_run, ["is a lora run", "pfeiffer"]),
        "houlsby": (_houlsby_run(tmp_path, tiny_bert, cls_data) if case == "houlsby" else None, ["placement houlsby"]),
        "other-model": (adapter_runs["llama"][0], ["was trained on", "one base model"]),
    }[case]
    if case == "unfinished":  # a run that has not reached its end: no metrics.json yet
        bad.mkdir()
        for name in ("run.json", "recipe.yaml", "method.safetensors"):
            (bad / name).write_bytes((good / name).read_bytes())
    with pytest.raises(MethodError) as error:
        _fused(tiny_bert, [good, bad])
    message = str(error.value)
    assert "\n" not in message and str(bad) in message
    assert all(w in message for w in words), message


# Encoder-decoder models: a fusion after every feed-forward block of both stacks, over stage-1 seq2seq adapter runs.


def _s2s_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 25, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(4, 25, (3, 5), generator=g)}


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_one_adapter_reproduces_its_stage1_seq2seq_model(arch, tiny_t5, tiny_bart, s2s_adapter_runs):
    run, folder = s2s_adapter_runs[arch][1], {"t5": tiny_t5, "bart": tiny_bart}[arch]
    assert all(".adapter." in k for k in load_file(str(run / "method.safetensors")))  # no head to carry over
    _, stage1, _ = load_run(run)
    torch.manual_seed(0)
    model, missing = models.load_model("seq2seq", str(folder))
    fused = attach(model, Config(adapters=[str(run)]), models.head_parameters(model, "seq2seq", missing)).eval()
    assert len([m for m in fused.modules() if isinstance(m, Fusion)]) == 4  # 2 encoder + 2 decoder blocks
    plain = models.load_model("seq2seq", str(folder))[0].eval()
    batch = _s2s_batch()
    with torch.no_grad():
        want, got, base = stage1(**batch), fused(**batch), plain(**batch)
    for out in ("encoder_last_hidden_state", "logits"):  # the stage-1 adapters change both stacks' outputs
        assert (getattr(want, out) - getattr(base, out)).abs().max() > 1e-4, out
        assert (getattr(got, out) - getattr(want, out)).abs().max() <= 1e-5, out


@pytest.fixture(scope="module", params=["t5", "bart"])
def s2s_fusion_run(request, tiny_t5, tiny_bart, s2s_data, s2s_adapter_runs, tmp_path_factory):
    """`ftune train` of AdapterFusion over the two stage-1 runs of the tiny T5 or BART."""
    root, arch = tmp_path_factory.mktemp(f"fusion-{request.param}"), request.param
    method = {"name": "adapter_fusion", "adapters": [str(r) for r in s2s_adapter_runs[arch]]}
    doc = s2s_recipe_doc({"t5": tiny_t5, "bart": tiny_bart}[arch], s2s_data, root / "run", method, lr=5e-3)
    result = CliRunner().invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_a_seq2seq_fusion_run_reports_and_reloads(s2s_fusion_run, tmp_path):
    metrics = json.loads((s2s_fusion_run / "metrics.json").read_text())
    report = json.loads((s2s_fusion_run / "method_report.json").read_text())
    assert report == metrics["method_report"] and report["tokens"] > 0
    assert len(report["layers"]) == 4  # encoder blocks, then decoder blocks
    for row in report["layers"]:
        assert len(row) == 2 and math.isclose(sum(row), 1.0, abs_tol=1e-5)
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(s2s_fusion_run)])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert {"loss", "rougeL"} <= metrics["validation"].keys()
    for key, value in metrics["validation"].items():
        assert scored[key] == pytest.approx(value, abs=1e-6), key
    result = runner.invoke(app, ["merge", str(s2s_fusion_run), str(tmp_path / "merged")])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "adapter_fusion" in result.stderr and not (tmp_path / "merged").exists()
