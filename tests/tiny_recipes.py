"""Recipe documents for the tiny models and data (one per task family), and the finished runs trained from them once
per session, which tests read or copy but never change.

Session fixtures (re-exported by conftest): full_run, adapter_runs, s2s_adapter_runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


def recipe_doc(kind: str, model: Path, data: Path, out: Path, method: dict | None = None, **train) -> dict:
    """A complete tiny recipe: `kind` is "cls" (sequence classification) or "sft" (causal LM)."""
    ext = "tsv" if kind == "cls" else "jsonl"
    doc = {
        "model": {"name": str(model)},
        "task": "sequence_classification" if kind == "cls" else "causal_lm",
        "data": {
            "train": str(data / f"train.{ext}"),
            "validation": str(data / f"validation.{ext}"),
            "max_length": 32 if kind == "cls" else 128,
        },
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "seed": 0, **train},
        "output_dir": str(out),
    }
    if kind == "cls":
        doc["data"] |= {"text_column": "sentence", "label_column": "label"}
    return doc


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def s2s_recipe_doc(model: Path, data: Path, out: Path, method: dict | None = None, **train) -> dict:
    """A complete tiny seq2seq recipe reading `data`/{train,validation}.jsonl (document -> summary)."""
    return {
        "model": {"name": str(model)},
        "task": "seq2seq",
        "data": {
            "train": str(data / "train.jsonl"),
            "validation": str(data / "validation.jsonl"),
            "source_column": "document",
            "target_column": "summary",
            "max_length": 32,
            "max_target_length": 8,
        },
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "seed": 0, **train},
        "generation": {"max_new_tokens": 6},
        "output_dir": str(out),
    }


def token_recipe_doc(model: Path, data: Path, out: Path, method: dict | None = None, **train) -> dict:
    """A complete tiny token-classification recipe reading the folder `data` (train.txt, validation.txt)."""
    return {
        "model": {"name": str(model)},
        "task": "token_classification",
        "data": {"train": str(data), "validation": str(data), "max_length": 32},
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "seed": 0, **train},
        "output_dir": str(out),
    }


def pref_recipe_doc(
    model: Path, data: Path, out: Path, objective: dict | None = None, method: dict | None = None, **train
) -> dict:
    """A complete tiny preference recipe reading `data`/{train,validation}.jsonl (prompt, chosen, rejected)."""
    return {
        "model": {"name": str(model)},
        "task": "preference",
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"), "max_length": 64},
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "objective": objective or {"name": "dpo"},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, "seed": 0, **train},
        "output_dir": str(out),
    }


@pytest.fixture(scope="session")
def full_run(tiny_bert, cls_data, tmp_path_factory) -> Path:
    """A finished `full` run of the tiny BERT (2 steps, a checkpoint each), shared: tests read it or copy it, never
    change it (the bad-input catalogues snapshot it)."""
    from typer.testing import CliRunner

    from ftune.cli import app

    root = tmp_path_factory.mktemp("full-run")
    doc = recipe_doc("cls", tiny_bert, cls_data, root / "run", method={"name": "full"}, max_steps=2)
    result = CliRunner().invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="session")
def adapter_runs(tiny_bert, tiny_llama, cls_data, tmp_path_factory) -> dict[str, list[Path]]:
    """Two finished stage-1 `adapter` runs (placement pfeiffer) per tiny architecture, for AdapterFusion.

    Different seeds and learning rates, so the two adapters of an architecture differ.
    """
    import io

    from rich.console import Console

    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    root, runs = tmp_path_factory.mktemp("adapter-runs"), {}
    for arch, model in (("bert", tiny_bert), ("llama", tiny_llama)):
        runs[arch] = []
        for k, (seed, lr) in enumerate(((0, 1e-2), (1, 3e-2))):
            method = {"name": "adapter", "placement": "pfeiffer", "bottleneck": 8}
            doc = recipe_doc("cls", model, cls_data, root / f"{arch}-{k}", method, seed=seed, lr=lr)
            train(validate_recipe(doc), console=Console(file=io.StringIO()))
            runs[arch].append(root / f"{arch}-{k}")
    return runs


@pytest.fixture(scope="session")
def s2s_adapter_runs(tiny_t5, tiny_bart, s2s_data, tmp_path_factory) -> dict[str, list[Path]]:
    """As `adapter_runs`, for the tiny T5 and BART on the seq2seq data: two stage-1 runs each (adapters in both
    stacks), with different seeds and learning rates."""
    import io

    from rich.console import Console

    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    root, runs = tmp_path_factory.mktemp("s2s-adapter-runs"), {}
    for arch, model in (("t5", tiny_t5), ("bart", tiny_bart)):
        runs[arch] = []
        for k, (seed, lr) in enumerate(((0, 1e-2), (1, 3e-2))):
            method = {"name": "adapter", "placement": "pfeiffer", "bottleneck": 8}
            doc = s2s_recipe_doc(model, s2s_data, root / f"{arch}-{k}", method, seed=seed, lr=lr)
            train(validate_recipe(doc), console=Console(file=io.StringIO()))
            runs[arch].append(root / f"{arch}-{k}")
    return runs
