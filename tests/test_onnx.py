"""export --format onnx: the merged model as ONNX, run with onnxruntime on inputs the export never saw (other batch
sizes and lengths, padding, text through the tokenizer written beside it), gives the trained run's PyTorch logits to
1e-4, for sequence classification, token classification and a causal LM; a method that cannot merge is refused in
one line, and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import recipe_doc, token_recipe_doc
from ftune import rundir
from ftune.assemble import load_run
from ftune.cli import app
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.serve import onnx_export

ort = pytest.importorskip("onnxruntime")
LORA = {"name": "lora", "r": 4, "alpha": 8}
TEXTS = ["the movie was good", "a really dull plot and very weak actors", "great"]


def _trained(doc):
    train(validate_recipe(doc))
    return doc["output_dir"]


def _onnx_and_torch(run, out):
    """(onnxruntime logits, the run's own PyTorch logits) on TEXTS encoded by the exported tokenizer and on random
    ids of a shape unlike the export's; the run is reloaded as trained (method unmerged)."""
    from transformers import AutoTokenizer

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids = torch.randint(0, len(tokenizer), (4, 21), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    batches = [(encoded["input_ids"], encoded["attention_mask"]), (ids, mask)]
    _, model, _ = load_run(run)
    pairs = []
    for input_ids, attention_mask in batches:
        got = session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]
        with torch.no_grad():
            pairs.append((torch.from_numpy(got), model(input_ids=input_ids, attention_mask=attention_mask).logits))
    return pairs


def _check_export(run, tmp_path, logits_axes):
    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["export", str(run), str(out), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    for got, expected in _onnx_and_torch(run, out):
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-4
    report = json.loads((out / onnx_export.REPORT).read_text())
    assert report["inputs"] == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert report["outputs"]["logits"][: len(logits_axes)] == logits_axes
    assert report["label_names"] == rundir.read_record(run).label_names
    assert report["check"]["max_abs_diff"] <= 1e-4 and report["check"]["tolerance"] == 1e-4
    return out, report


@pytest.fixture(scope="module")
def cls_run(tiny_bert, cls_data, tmp_path_factory):
    return _trained(recipe_doc("cls", tiny_bert, cls_data, tmp_path_factory.mktemp("onnx") / "run", LORA, max_steps=2))


def test_bert_sequence_classification_with_lora_merged(cls_run, tmp_path):
    _, report = _check_export(cls_run, tmp_path, ["batch"])
    assert report["outputs"]["logits"] == ["batch", 2] and report["label_names"] == ["0", "1"]


def test_bert_token_classification(tiny_bert, conll_data, tmp_path):
    run = _trained(token_recipe_doc(tiny_bert, conll_data, tmp_path / "run", {"name": "bitfit"}, max_steps=2))
    _, report = _check_export(run, tmp_path, ["batch", "sequence"])
    assert report["outputs"]["logits"] == ["batch", "sequence", len(report["label_names"])]


def test_llama_causal_lm_with_lora_merged(tiny_llama, sft_data, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _trained(recipe_doc("sft", tiny_llama, sft_data, tmp_path / "run", LORA, max_steps=2))
    out, report = _check_export(run, tmp_path, ["batch", "sequence"])
    assert report["label_names"] is None
    # the update is in the graph: its logits are not the untrained base model's
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    got, _ = _onnx_and_torch(run, out)[1]
    ids = torch.randint(0, base.config.vocab_size, (4, 21), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        assert (got - base(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3


def test_a_method_that_cannot_merge_is_refused_in_one_line(tiny_bert, cls_data, tmp_path):
    run = _trained(
        recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", {"name": "prompt_tuning", "n_tokens": 4}, max_steps=1)
    )
    out = tmp_path / "onnx"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["export", str(run), str(out), "--format", "onnx"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "prompt_tuning adds modules that cannot be folded into the base weights" in lines[0]
    assert "--format peft" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_graph_that_disagrees_is_not_kept(cls_run, tmp_path, monkeypatch):
    def empty_graph(exporter, module, path, vocabulary, external=False):
        path.write_bytes(b"")

    monkeypatch.setattr(onnx_export, "export_graph", empty_graph)
    monkeypatch.setattr(onnx_export, "max_difference", lambda path, module, vocabulary: 0.5)
    result = CliRunner().invoke(app, ["export", str(cls_run), str(tmp_path / "onnx"), "--format", "onnx"])
    assert result.exit_code == 1
    expected = (
        "error: export --format onnx: no exporter gives a graph that matches BertForSequenceClassification "
        "(dynamo: logits differ from PyTorch's by 0.5 > 0.0001; torchscript: logits differ from PyTorch's by "
        "0.5 > 0.0001); nothing written"
    )
    assert result.output.strip().splitlines() == [expected]
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_files_is_not_written_into(tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "any-run"), str(out), "--format", "onnx"])
    assert result.exit_code == 1 and "exists and is not empty; choose a new directory" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_the_check_sees_a_graph_that_is_not_the_model(tiny_bert, tmp_path):
    """The check is no formality: against a model whose classifier bias moved by 0.01, the same graph is 0.01 off."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    module = onnx_export.LogitsOnly(model).eval()
    vocabulary = model.get_input_embeddings().num_embeddings
    path = tmp_path / "model.onnx"
    onnx_export.export_graph("dynamo", module, path, vocabulary)
    assert onnx_export.max_difference(path, module, vocabulary) <= onnx_export.TOLERANCE
    with torch.no_grad():
        model.classifier.bias += 0.01
    assert onnx_export.max_difference(path, module, vocabulary) == pytest.approx(0.01, abs=1e-5)
