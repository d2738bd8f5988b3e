"""Padding-free packing (data.packing): one row per micro-batch, attention kept inside each sequence through position
ids, and exactly the unpacked batch's loss and gradients; a model that cannot keep sequences apart is refused."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from conftest import WORDS, recipe_doc, write_recipe
from ftune import assemble
from ftune.cli import app
from ftune.data.loader import collate
from ftune.data.packing import check_examples, collate_packed, require_isolation
from ftune.errors import RecipeError
from ftune.kernels.linear_ce import output_layer
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.rundir import latest_checkpoint
from ftune.tasks import IGNORE_INDEX, TASKS


@pytest.fixture()
def uneven_sft(tmp_path) -> Path:
    """SFT rows whose inputs and responses vary in length (1 to 8 words): batches carry padding when unpacked."""
    folder = tmp_path / "uneven"
    folder.mkdir()
    rng = random.Random(7)
    for split, n in (("train", 24), ("validation", 4)):
        rows = [
            {
                "instruction": "say words",
                "input": " ".join(rng.choices(WORDS, k=rng.randint(0, 6))),
                "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
            }
            for _ in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _model_and_examples(tiny_llama: Path, data: Path, tmp_path: Path):
    recipe = validate_recipe(recipe_doc("sft", tiny_llama, data, tmp_path / "unused", {"name": "full"}))
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    examples = assemble.encode_rows(recipe, assemble.read_split(recipe, "train"), tokenizer, None).examples
    return assemble.build_model(recipe, source, tokenizer, None), examples, tokenizer


def test_a_packed_row_is_the_sequences_end_to_end():
    batch = collate_packed(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the first label of each sequence goes: the previous sequence's last token must not learn to predict it
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert "attention_mask" not in batch  # transformers reads the boundaries from the position ids only without one


@pytest.mark.parametrize("route", ["logits", "hidden"])
def test_packed_loss_and_gradients_equal_the_unpacked_batch(route, tiny_llama, uneven_sft, tmp_path):
    model, examples, tokenizer = _model_and_examples(tiny_llama, uneven_sft, tmp_path)
    require_isolation(model, examples)
    model.train()  # no dropout in the tiny Llama: train mode computes the same function twice
    task, chosen = TASKS["causal_lm"], examples[:6]
    assert len({len(e["input_ids"]) for e in chosen}) > 1  # the unpacked batch really is padded

    def loss_and_grads(batch):
        model.zero_grad()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if route == "hidden":
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
            total, count = task.hidden_loss(out.hidden_states[-1], output_layer(model), batch["labels"])
        else:
            total, count = task.loss(model(**inputs).logits, batch["labels"])
        total.backward()
        return float(total.detach()), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = loss_and_grads(collate(tokenizer.pad_token_id)(chosen))
    packed = loss_and_grads(collate_packed(chosen))
    assert packed[1] == padded[1] == task.count(collate(0)(chosen)["labels"])
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    worst = max((packed[2][n] - padded[2][n]).abs().max().item() for n in padded[2])
    assert worst <= 1e-5


class _IgnoresPositions(nn.Module):
    """A causal LM whose forward drops position ids: packed sequences would attend to each other."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids)


def test_a_model_that_ignores_position_ids_is_refused(tiny_llama, uneven_sft, tmp_path):
    model, examples, _ = _model_and_examples(tiny_llama, uneven_sft, tmp_path)
    with pytest.raises(RecipeError, match="data.packing: .* does not keep packed sequences apart"):
        require_isolation(_IgnoresPositions(model), examples)
    require_isolation(model, examples)  # the model itself does


def test_examples_with_more_than_tokens_are_refused():
    with pytest.raises(RecipeError, match="data.packing: the training examples carry teacher_logits"):
        check_examples([{"input_ids": [1, 2], "labels": [1, 2], "teacher_logits": torch.zeros(2, 3)}])


def test_packing_resumes_exactly_and_trains_the_unpacked_loss(tiny_llama, uneven_sft, tmp_path):
    run = tmp_path / "packed"
    doc = recipe_doc(
        "sft",
        tiny_llama,
        uneven_sft,
        run,
        {"name": "full"},
        max_steps=6,
        save_every=2,
        keep_checkpoints=3,
        grad_accum=2,
        batch_size=4,
        eval_every=2,
    )
    doc["data"]["packing"] = True
    quiet = Console(file=io.StringIO())
    train(validate_recipe(doc), console=quiet)
    expected = load_file(run / "method.safetensors")
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    assert latest_checkpoint(run).name == "step-00000004"
    train(validate_recipe(doc), resume=True, console=quiet)
    resumed = load_file(run / "method.safetensors")
    assert all((resumed[k] == v).all() for k, v in expected.items())
    strip = lambda entries: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in entries]
    assert strip(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()) == strip(log)

    # the same batches unpacked (grouping off: packing keeps the sampler's plain order) log the same losses
    plain = recipe_doc(
        "sft",
        tiny_llama,
        uneven_sft,
        tmp_path / "plain",
        {"name": "full"},
        max_steps=6,
        grad_accum=2,
        batch_size=4,
        group_by_length=False,
    )
    train(validate_recipe(plain), console=quiet)
    plain_log = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    losses = lambda entries: [e["loss"] for e in entries if "loss" in e]
    assert losses(log) == pytest.approx(losses(plain_log), rel=1e-4)
    tokens = json.loads((run / "metrics.json").read_text())["train_tokens"]
    assert tokens == json.loads((tmp_path / "plain" / "metrics.json").read_text())["train_tokens"] > 0


def test_packing_a_task_that_cannot_pack_is_one_line_and_writes_nothing(tiny_bert, cls_data, tmp_path):
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "out")
    doc["data"]["packing"] = True
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.packing: task sequence_classification cannot" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
