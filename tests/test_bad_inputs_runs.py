"""Every bad use of a run directory ends in one line on stderr that names the file or folder (exit 1, or 2 for a
bad option): output_dir holding a run or a file, --resume without a run, a checkpoint or the same recipe, eval,
predict, merge and export of folders that are no run, of runs with missing, corrupt, pickled or foreign weights,
records and tokenizers, and into places that cannot take the result. Also: --overwrite lifts the refusal.

Each case ends in one line on stderr that names the field, file or row, its exit code (2: recipe or usage, 1:
runtime), no traceback, and nothing on disk overwritten (tests/refusals.py); tests/test_bad_inputs.py checks the size
of the whole catalogue. The case environment: tests/bad_input_helpers.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

import bad_input_helpers
from bad_input_helpers import Env, _garbage, _text, runner
from conftest import write_recipe
from ftune.cli import app

adapter_run = bad_input_helpers.adapter_run  # the fixture, where pytest finds it


def _copy_run(env: Env, *, keep_checkpoints: bool = True) -> Path:
    """A private copy of the shared run whose recipe.yaml points at the copy (so --resume accepts the recipe)."""
    copy = shutil.copytree(env.run, env.tmp / "copy")
    if not keep_checkpoints:
        shutil.rmtree(copy / "checkpoints")
    doc = yaml.safe_load((copy / "recipe.yaml").read_text()) | {"output_dir": str(copy)}
    write_recipe(copy / "recipe.yaml", doc)
    return copy


def _not_a_run(env: Env) -> list:
    (env.tmp / "out").mkdir()
    (env.tmp / "out" / "notes.txt").write_text("mine\n")
    return env.train()


def _resume_without_checkpoint(env: Env) -> list:
    return ["train", _copy_run(env, keep_checkpoints=False) / "recipe.yaml", "--resume"]


def _resume_other_recipe(env: Env) -> list:
    return ["train", _copy_run(env) / "recipe.yaml", "--resume", "--set", "train.lr=0.5"]


def _merge_into_non_empty(env: Env) -> list:
    (env.tmp / "merged").mkdir()
    (env.tmp / "merged" / "keep.txt").write_text("mine\n")
    return ["merge", env.run, env.tmp / "merged"]


def _plain_dir(env: Env) -> list:
    (env.tmp / "plain-dir").mkdir()
    (env.tmp / "plain-dir" / "recipe.yaml").write_text("not: a run\n")
    return ["eval", env.tmp / "plain-dir"]


def _run_copy(env: Env, source: Path, name: str = "copy") -> Path:
    return shutil.copytree(source, env.tmp / name)


def _truncated_weights(env: Env) -> list:
    copy = _run_copy(env, env.run)
    weights = copy / "method.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["eval", copy]


def _pickled_weights(env: Env) -> list:
    copy = _run_copy(env, env.run)
    torch.save({"classifier.weight": torch.zeros(2, 32)}, copy / "method.safetensors")
    return ["eval", copy]


def _other_methods_weights(env: Env, command: str) -> list:
    """An adapter run's recipe beside a full run's weights: the weights do not fit the model the recipe builds."""
    copy = _run_copy(env, env.run)
    shutil.copy(env.adapter / "recipe.yaml", copy / "recipe.yaml")
    return {
        "eval": ["eval", copy],
        "merge": ["merge", copy, env.tmp / "merged"],
        "export": ["export", copy, env.tmp / "exported", "--format", "hf"],
    }[command]


def _eval_without_validation(env: Env) -> list:
    copy = _run_copy(env, env.run)
    doc = yaml.safe_load((copy / "recipe.yaml").read_text())
    del doc["data"]["validation"]
    write_recipe(copy / "recipe.yaml", doc)
    return ["eval", copy]


def _run_without(env: Env, name: str) -> list:
    copy = _run_copy(env, env.run)
    path = copy / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return ["eval", copy]


def _corrupt_run_record(env: Env) -> list:
    copy = _run_copy(env, env.run)
    (copy / "run.json").write_text('{"seed": 0, ')
    return ["eval", copy]


# id: (arguments built from Env, exit code, substrings the one stderr line must hold)
CASES: dict[str, tuple[Callable[[Env], list], int, list[str]]] = {
    "output-dir-holds-a-run": (
        lambda e: e.train(e.doc() | {"output_dir": str(e.run)}),
        1,
        ["output_dir", "--overwrite"],
    ),
    "output-dir-not-a-run": (_not_a_run, 1, ["output_dir", "not an ftune run"]),
    "output-dir-is-a-file": (
        lambda e: e.train(None, "--set", f"output_dir={_text(e.tmp / 'taken', 'a file')}"),
        1,
        ["output_dir", "taken", "is a file"],
    ),
    "output-dir-under-a-file": (
        lambda e: e.train(e.doc() | {"output_dir": str(_text(e.tmp / "taken", "a file") / "run")}),
        1,
        ["output_dir", "is a file"],
    ),
    "predict-input-not-utf8": (
        lambda e: ["predict", e.run, "--input", _garbage(e, "rows.jsonl")],
        1,
        ["rows.jsonl", "not UTF-8"],
    ),
    "resume-without-run": (lambda e: e.train(None, "--resume"), 1, ["--resume", "no run"]),
    "resume-without-checkpoint": (_resume_without_checkpoint, 1, ["--resume", "no complete checkpoint"]),
    "resume-other-recipe": (_resume_other_recipe, 1, ["--resume", "recipe differs"]),
    "export-peft-of-full": (lambda e: ["export", e.run, e.tmp / "peft", "--format", "peft"], 1, ["peft", "full"]),
    "merge-into-non-empty": (_merge_into_non_empty, 1, ["merged", "not empty"]),
    "eval-not-a-run": (_plain_dir, 1, ["plain-dir", "not an ftune run"]),
    "eval-data-missing": (
        lambda e: ["eval", e.run, "--data", e.tmp / "absent.jsonl"],
        1,
        ["absent.jsonl", "--data"],
    ),
    # run dirs for eval, merge, export
    "eval-truncated-weights": (_truncated_weights, 1, ["method.safetensors", "cannot be read"]),
    "eval-pickled-weights": (_pickled_weights, 1, ["method.safetensors", "not a safetensors file"]),
    "eval-weights-of-another-method": (
        lambda e: _other_methods_weights(e, "eval"),
        1,
        ["method.safetensors", "does not fit"],
    ),
    "merge-weights-of-another-method": (
        lambda e: _other_methods_weights(e, "merge"),
        1,
        ["method.safetensors", "does not fit"],
    ),
    "export-weights-of-another-method": (
        lambda e: _other_methods_weights(e, "export"),
        1,
        ["method.safetensors", "does not fit"],
    ),
    "merge-adapter-run": (lambda e: ["merge", e.adapter, e.tmp / "merged"], 1, ["adapter", "cannot be folded"]),
    "export-peft-of-adapter": (
        lambda e: ["export", e.adapter, e.tmp / "peft", "--format", "peft"],
        1,
        ["peft", "adapter", "--format hf"],
    ),
    "export-into-a-run": (lambda e: ["export", e.run, e.adapter, "--format", "hf"], 1, ["not empty", "new directory"]),
    "eval-run-record-missing": (lambda e: _run_without(e, "run.json"), 1, ["run.json", "not an ftune run"]),
    "eval-run-record-corrupt": (_corrupt_run_record, 1, ["run.json", "cannot be read"]),
    "eval-tokenizer-missing": (lambda e: _run_without(e, "tokenizer"), 1, ["copy/tokenizer", "missing"]),
    "merge-into-a-file": (
        lambda e: ["merge", e.run, _text(e.tmp / "merged.txt", "mine\n")],
        1,
        ["merged.txt", "not a directory"],
    ),
    "export-under-a-file": (
        lambda e: ["export", e.run, _text(e.tmp / "file", "mine\n") / "out", "--format", "hf"],
        1,
        ["file/out", "cannot be created"],
    ),
    "eval-split-unknown": (
        lambda e: ["eval", e.run, "--split", "test"],
        2,
        ["--split test", "no test split", "--data"],
    ),
    "eval-split-without-validation": (
        _eval_without_validation,
        2,
        ["--split validation", "data.validation", "--data"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_bert, cls_data, full_run, adapter_run, tmp_path, monkeypatch):
    bad_input_helpers.refused(case, CASES[case], Env(tiny_bert, cls_data, full_run, adapter_run, tmp_path), monkeypatch)


def test_overwrite_replaces_a_run(full_run, adapter_run, tiny_bert, cls_data, tmp_path):
    """The refusal above is lifted by --overwrite: the old run is replaced by the new one."""
    env = Env(tiny_bert, cls_data, full_run, adapter_run, tmp_path)
    copy = _copy_run(env)
    (copy / "metrics.jsonl").write_text("")  # an old run's file, to see it replaced
    recipe = env.recipe(env.doc(max_steps=1) | {"output_dir": str(copy)})
    result = runner.invoke(app, ["train", str(recipe), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((copy / "recipe.yaml").read_text())["train"]["max_steps"] == 1
    assert (copy / "metrics.jsonl").read_text().strip()
    assert [p.name for p in (copy / "checkpoints").iterdir()] == ["step-00000001"]
