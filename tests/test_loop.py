"""The loop's arithmetic: accumulation weighs every token (or row) alike, evaluation during training equals `ftune
eval` of the finished run (mixed precision included), and the sampler shards an epoch over processes exactly."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from conftest import WORDS, recipe_doc, token_recipe_doc
from ftune import assemble
from ftune.cli import app
from ftune.data.loader import EpochBatches, example_length
from ftune.recipe import validate_recipe
from ftune.run.train import train
from ftune.step import optim


def _no_dropout(monkeypatch) -> None:
    """Models built from now on have every dropout at 0: micro-batches and one large batch then compute the same
    function (dropout masks drawn per micro-batch differ from one drawn for the whole batch)."""
    real = assemble.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    monkeypatch.setattr(assemble, "build_model", build)


def _first_step_gradients(monkeypatch, doc: dict, tmp_path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """The gradients the first optimizer step applies, by parameter name, and the step's logged loss."""
    seen: dict[str, torch.Tensor] = {}
    real = optim.make_optimizer

    def recording(name, params, *args, **kwargs):
        params = list(params)
        optimizer = real(name, params, *args, **kwargs)

        def record(optimizer, args, kwargs):
            if not seen:
                seen.update({str(i): p.grad.detach().clone() for i, p in enumerate(params)})

        optimizer.register_step_pre_hook(record)
        return optimizer

    monkeypatch.setattr(optim, "make_optimizer", recording)
    train(validate_recipe(doc), console=Console(file=io.StringIO()))
    log = [json.loads(line) for line in (Path(doc["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return seen, next(e["loss"] for e in log if "loss" in e)


def _uneven_sft(folder: Path) -> Path:
    """SFT rows whose responses have 1 to 8 words: micro-batches then carry different numbers of loss tokens."""
    folder.mkdir()
    rng = random.Random(5)
    for split, n in (("train", 16), ("validation", 4)):
        rows = [
            {"instruction": "say words", "input": "", "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))}
            for _ in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("kind", ["sft", "ner"])
def test_accumulation_equals_one_large_batch(kind, monkeypatch, tmp_path, tiny_llama, tiny_bert, conll_data):
    """grad_accum 4 × batch 2 gives the gradient and loss of batch 8: each micro-batch's loss sum is divided by the
    token count of the whole step, not averaged per micro-batch (which would weigh a short row's tokens more)."""
    _no_dropout(monkeypatch)
    sft_data = _uneven_sft(tmp_path / "data") if kind == "sft" else None

    def doc(out: str, **train):
        method = {"name": "full"}
        if kind == "sft":
            return recipe_doc("sft", tiny_llama, sft_data, tmp_path / out, method, max_steps=1, **train)
        return token_recipe_doc(tiny_bert, conll_data, tmp_path / out, method, max_steps=1, **train)

    big, big_loss = _first_step_gradients(monkeypatch, doc("big", batch_size=8), tmp_path)
    small, small_loss = _first_step_gradients(monkeypatch, doc("small", batch_size=2, grad_accum=4), tmp_path)
    assert big.keys() == small.keys()
    assert max((big[k] - small[k]).abs().max().item() for k in big) <= 1e-6
    assert small_loss == pytest.approx(big_loss, abs=1e-6)

    # and the micro-batches really do carry different numbers of tokens (else a mean of means would pass too)
    recipe = validate_recipe(doc("probe", batch_size=2, grad_accum=4))
    _, tokenizer = assemble.source_and_tokenizer(recipe)
    rows = assemble.read_split(recipe, "train")
    encoded = assemble.encode_rows(recipe, rows, tokenizer, assemble.label_names(recipe, rows))
    lengths = [example_length(e) for e in encoded.examples]  # the run groups by length (train.group_by_length)
    order = EpochBatches(len(encoded.examples), 2, seed=0, lengths=lengths, step_batches=4).order(0)[:8]
    counts = [sum(y != -100 for i in order[m : m + 2] for y in encoded.examples[i]["labels"]) for m in range(0, 8, 2)]
    assert len(set(counts)) > 1, counts


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_during_training_equals_ftune_eval(precision, tmp_path, tiny_bert, cls_data):
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", max_steps=2, precision=precision)
    train(validate_recipe(doc), console=Console(file=io.StringIO()))
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["accuracy"] == final["accuracy"]
    assert scored["loss"] == pytest.approx(final["loss"], abs=1e-6)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["precision"] == precision


@pytest.mark.parametrize(("size", "batch", "world"), [(37, 4, 2), (40, 4, 2), (23, 3, 3), (9, 8, 2), (10, 5, 1)])
def test_the_processes_read_disjoint_rows_covering_the_epoch(size, batch, world):
    """The processes' rows in an epoch are disjoint and, together, what one process with batch × world reads."""
    shards = [list(EpochBatches(size, batch, seed=3, rank=r, world=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every process takes the same number of micro-batches
    one = list(EpochBatches(size, batch * world, seed=3))
    for step, together in enumerate(one):
        parts = [s[step] for s in shards] if step < len(shards[0]) else []
        if len(together) >= world:
            assert sorted(i for p in parts for i in p) == sorted(together)
            assert [i for p in parts for i in p] == together  # contiguous parts, in rank order
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))
    assert len(seen) >= size - (world - 1)  # only a last global batch smaller than the process count is left out


def test_the_sampler_resumes_mid_epoch():
    whole = list(EpochBatches(50, 4, seed=1, rank=1, world=2))
    later = EpochBatches(50, 4, seed=1, rank=1, world=2)
    later.set_position(0, 3)
    assert list(later) == whole[3:] and len(later) == len(whole) - 3


def test_the_record_names_ftunes_own_revision(tmp_path, tiny_bert, cls_data, monkeypatch):
    """run.json's git_sha is the revision of ftune's code, wherever the command runs from (not the cwd's repo)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not head:
        pytest.skip("ftune's code is not a git checkout here")
    monkeypatch.chdir(tmp_path)  # not inside any repository
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", max_steps=1)
    train(validate_recipe(doc), console=Console(file=io.StringIO()))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["git_sha"] == head
    assert (record["world_size"], record["batch_per_device"], record["global_batch"]) == (1, 8, 8)
