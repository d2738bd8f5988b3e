"""The preflight through `ftune train` (ftune/run/preflight.py): lengths past the model's positions, a tokenizer past
the embedding, a step that cannot fit in memory, a disk that cannot hold a checkpoint, each refused in one line before
anything is written (the catalogue); and what it lets through: a rotary model past its context and unused ids past the
embedding with a warning, lengths at the limit, and a simulated check that leaves training as it was.

The checks unit by unit: tests/test_preflight.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import WORDS, recipe_doc, s2s_recipe_doc, write_recipe
from ftune.cli import app
from ftune.run import preflight
from preflight_helpers import LORA, _meminfo, _no_space
from refusals import check_refusal

runner = CliRunner()


def build_gpt2(folder: Path) -> Path:
    """A tiny GPT-2 (learned positions `wpe`, n_positions 64) with a word-level tokenizer over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", *WORDS, ":", "#", "\n", ",", ".", "-"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


def _short_embedding(model: Path, folder: Path, rows_less: int) -> Path:
    """A copy of the tiny BERT whose input embedding has `rows_less` rows fewer than its tokenizer has ids."""
    from transformers import BertConfig, BertForMaskedLM

    shutil.copytree(model, folder)
    config = BertConfig.from_pretrained(folder)
    config.vocab_size -= rows_less
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def _added_tokens(model: Path, folder: Path, pad: bool = False) -> Path:
    """A copy of the tiny Llama whose tokenizer gained two tokens the model has no rows for (`pad`: the second is
    its padding token)."""
    from transformers import AutoTokenizer

    shutil.copytree(model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<extra-1>", "<extra-2>"])
    if pad:
        tokenizer.pad_token = "<extra-2>"
    tokenizer.save_pretrained(folder)
    return folder


# --- the catalogue: (recipe doc from the fixtures and the case's folder, monkeypatching), exit code, needles --------


def _cls(f, method=None, **data):
    doc = recipe_doc("cls", f["bert"], f["cls"], f["tmp"] / "out", method)
    doc["data"] |= data
    return doc


def _sft(f, model):
    return recipe_doc("sft", model, f["sft"], f["tmp"] / "out")


def _gpt2(f, length):
    return _cls(f, {"name": "full"}, max_length=length) | {"model": {"name": str(f["gpt2"])}}


def _s2s(f, method=None, **data):
    doc = s2s_recipe_doc(f["bart"], f["s2s"], f["tmp"] / "out", method)
    doc["data"] |= data
    return doc


def _low_memory(f, mp, method):
    mp.setattr(preflight, "MEMINFO", _meminfo(f["tmp"], 256))  # 256 KiB: below any step's estimate
    return _cls(f, method)


def _read_only_dir(f, mp):
    """os.access says the folder is not writable, as a read-only mount would (root ignores a chmod)."""
    folder, real = f["tmp"] / "read-only", os.access
    folder.mkdir()
    mp.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode, **kw))
    return _cls(f) | {"output_dir": str(folder / "run")}


POSITIONS = ["data.max_length", "64 positions", "learned position embeddings"]
CASES = {
    "positions-bert-65": (lambda f, mp: _cls(f, max_length=65), 2, [*POSITIONS, "65 tokens", "at most 64"]),
    "positions-bert-1000": (lambda f, mp: _cls(f, max_length=1000), 2, [*POSITIONS, "1000 tokens", "embeddings)"]),
    "positions-prompt-tuning": (
        lambda f, mp: _cls(f, {"name": "prompt_tuning", "n_tokens": 40}),
        2,
        [*POSITIONS, "32 tokens + 40 virtual tokens of method prompt_tuning", "at most 24"],
    ),
    "positions-prefix-tuning": (
        lambda f, mp: _cls(f, {"name": "prefix_tuning", "n_tokens": 33}),
        2,
        [*POSITIONS, "32 tokens + 33 virtual tokens of method prefix_tuning", "at most 31"],
    ),
    "positions-gpt2-wpe": (lambda f, mp: _gpt2(f, 100), 2, [*POSITIONS, "100 tokens", "(transformer.wpe)"]),
    "positions-bart-encoder": (lambda f, mp: _s2s(f, max_length=80), 2, [*POSITIONS, "(encoder.embed_positions)"]),
    "positions-bart-decoder": (
        lambda f, mp: _s2s(f, max_target_length=70),
        2,
        ["data.max_target_length", "70 tokens", "64 positions", "decoder.embed_positions"],
    ),
    "positions-bart-decoder-prefix": (
        lambda f, mp: _s2s(f, {"name": "prefix_tuning", "n_tokens": 8}, max_target_length=60),
        2,
        ["data.max_target_length", "60 tokens + 8 virtual tokens", "(decoder.embed_positions)", "at most 56"],
    ),
    "vocabulary-short-embedding": (  # the classification data's words have ids up to 26
        lambda f, mp: _cls(f) | {"model": {"name": str(_short_embedding(f["bert"], f["tmp"] / "m", 12))}},
        1,
        [
            "model.name",
            f"tokenizer has {len(WORDS) + 5} ids",
            f"has {len(WORDS) - 7} rows",
            "ids up to 26",
            "use the tokenizer saved with this model",
        ],
    ),
    "vocabulary-one-id-past": (
        lambda f, mp: _cls(f) | {"model": {"name": str(_short_embedding(f["bert"], f["tmp"] / "m", 8))}},
        1,
        ["model.name", f"has {len(WORDS) - 3} rows", "ids up to 26"],
    ),
    "vocabulary-pad-id": (
        lambda f, mp: _sft(f, _added_tokens(f["llama"], f["tmp"] / "m", pad=True)),
        1,
        ["model.name", "the tokenizer's pad id", "past the model's input embedding", "rows; the tokenizer has"],
    ),
    "memory-lora": (
        lambda f, mp: _low_memory(f, mp, LORA),
        2,
        [
            "train.batch_size",
            "one training step needs",
            "only 256.0 KiB of RAM is available",
            "data.max_length",
            "or set train.gradient_checkpointing: true",
        ],
    ),
    "memory-full": (
        lambda f, mp: _low_memory(f, mp, {"name": "full"}),
        2,
        ["train.batch_size", "at 8 rows × 32 tokens", "10% to spare", "RAM is available", "train.grad_accum"],
    ),
    "memory-prefix-tuning": (
        lambda f, mp: _low_memory(f, mp, {"name": "prefix_tuning", "n_tokens": 4}),
        2,
        ["train.batch_size", "RAM is available", "or data.max_length"],
    ),
    "disk-lora": (
        lambda f, mp: (_no_space(mp), _cls(f))[1],
        1,
        ["output_dir", "1000 B free", "needs about", "MiB", "choose another output_dir"],
    ),
    "disk-full": (
        lambda f, mp: (_no_space(mp, 2**20), _cls(f, {"name": "full"}))[1],
        1,
        ["output_dir", "1.0 MiB free", "optimizer state"],
    ),
    "disk-read-only": (_read_only_dir, 1, ["output_dir", "read-only", "is not writable", "run cannot be made"]),
}
CPU_ONLY = {"memory-lora", "memory-full", "memory-prefix-tuning"}  # on CUDA a step that does not fit is a warning


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_anything_is_written(
    case, tiny_bert, tiny_llama, tiny_gpt2, tiny_bart, cls_data, sft_data, s2s_data, tmp_path, monkeypatch
):
    if case in CPU_ONLY and torch.cuda.is_available():
        pytest.skip("refused only on CPU")
    monkeypatch.chdir(tmp_path)
    build, code, needles = CASES[case]
    fixtures = {
        "bert": tiny_bert,
        "llama": tiny_llama,
        "gpt2": tiny_gpt2,
        "bart": tiny_bart,
        "cls": cls_data,
        "sft": sft_data,
        "s2s": s2s_data,
        "tmp": tmp_path,
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", build(fixtures, monkeypatch))
    check_refusal(["train", recipe], code, needles, tmp_path, tiny_bert, tiny_llama, cls_data)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a chmod")
def test_read_only_folder_by_chmod(tiny_bert, cls_data, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        doc = recipe_doc("cls", tiny_bert, cls_data, folder / "run")
        result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
        assert result.exit_code == 1, result.output
        assert f"output_dir: {folder} is not writable" in result.stderr
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_rotary_model_past_its_context_is_a_warning(tiny_llama, sft_data, tmp_path):
    """Llama computes any position (rotary): past max_position_embeddings (256) training goes on, with one warning."""
    doc = recipe_doc("sft", tiny_llama, sft_data, tmp_path / "out", max_steps=1)
    doc["data"]["max_length"] = 300
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    assert "warning: data.max_length: 300 tokens run past the 256 positions the model was trained at" in " ".join(
        result.stderr.split()
    )


def test_lengths_at_the_limit_train(tiny_bert, cls_data, tmp_path):
    """max_length + virtual tokens exactly the 64 positions is allowed."""
    doc = recipe_doc(
        "cls", tiny_bert, cls_data, tmp_path / "out", {"name": "prompt_tuning", "n_tokens": 32}, max_steps=1
    )
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr


def test_a_simulated_check_leaves_training_as_it_was(tiny_bert, cls_data, tmp_path, monkeypatch):
    """Where the bound does not fit but the step does, the simulation runs (on a fake copy, the random stream
    forked) and the run trains exactly as without it."""
    from safetensors.torch import load_file

    simulated = []
    real = preflight.simulated_peak
    monkeypatch.setattr(preflight, "simulated_peak", lambda *a: simulated.append(real(*a)) or simulated[-1])
    weights = {}
    for name, kib in (("plain", None), ("simulated", 4 * 1024)):  # 4 MiB: above the step, below the bound
        if kib:
            monkeypatch.setattr(preflight, "MEMINFO", _meminfo(tmp_path, kib))
        doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / name, max_steps=2)
        result = runner.invoke(app, ["train", str(write_recipe(tmp_path / f"{name}.yaml", doc))])
        assert result.exit_code == 0, result.output
        weights[name] = load_file(tmp_path / name / "method.safetensors")
    assert len(simulated) == 1 and simulated[0] < 4 * 2**20
    assert all(torch.equal(weights["plain"][k], weights["simulated"][k]) for k in weights["plain"])


def test_unused_ids_past_the_embedding_are_a_warning(tiny_llama, sft_data, tmp_path):
    """Extra tokenizer ids the data never uses (Gemma 3's image token) do not stop training: one warning line."""
    model = _added_tokens(tiny_llama, tmp_path / "m")
    doc = recipe_doc("sft", model, sft_data, tmp_path / "out", max_steps=1)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    assert "rows; the training data uses none past them (<extra-1>, <extra-2>)" in " ".join(result.stderr.split())
