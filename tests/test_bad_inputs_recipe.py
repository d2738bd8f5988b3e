"""Every bad recipe ends in one line on stderr that names the field (exit 2): unknown keys (per section, and by
--set), wrong types, values out of range, conflicting options and methods, malformed recipe files (YAML that does not
parse, a list, an empty or binary file) and output_dir values that name no place to train into.

Each case ends in one line on stderr that names the field, file or row, its exit code (2: recipe or usage, 1:
runtime), no traceback, and nothing on disk overwritten (tests/refusals.py); tests/test_bad_inputs.py checks the size
of the whole catalogue. The case environment: tests/bad_input_helpers.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import bad_input_helpers
from bad_input_helpers import Env, _garbage, _text, _tsv

adapter_run = bad_input_helpers.adapter_run  # the fixture, where pytest finds it


def _with(env: Env, section: str, value) -> list:
    """Train a recipe whose `section` is replaced outright (not merged into the default)."""
    return env.train(env.doc() | {section: value})


def _without_validation(env: Env, **train) -> list:
    doc = env.doc(**train)
    del doc["data"]["validation"]
    return env.train(doc)


# id: (arguments built from Env, exit code, substrings the one stderr line must hold)
CASES: dict[str, tuple[Callable[[Env], list], int, list[str]]] = {
    "unknown-key": (lambda e: e.train(train={"lrr": 0.1}), 2, ["train.lrr", "unknown key", "'lr'"]),
    "unknown-key-by-set": (
        lambda e: e.train(None, "--set", "data.max_lenght=8"),
        2,
        ["data.max_lenght", "'max_length'"],
    ),
    "wrong-type": (lambda e: e.train(train={"batch_size": "abc"}), 2, ["train.batch_size", "'abc'"]),
    "unknown-method": (lambda e: e.train(method={"name": "lorra"}), 2, ["method.name", "'lorra'", "'lora'"]),
    "negative-lr": (lambda e: e.train(train={"lr": -1e-3}), 2, ["train.lr", "-0.001"]),
    "lora-r-zero": (lambda e: e.train(method={"r": 0}), 2, ["method.r"]),
    "methods-in-conflict": (
        lambda e: _with(e, "method", [{"name": "lora"}, {"name": "adalora"}]),
        2,
        ["method:", "lora and adalora", "linear layers", "keep one"],
    ),
    "method-list-bad-part": (
        lambda e: _with(e, "method", [{"name": "lora", "r": 0}, {"name": "bitfit"}]),
        2,
        ["method[0].r", "greater than 0"],
    ),
    "mam-adapter-placement": (
        lambda e: _with(e, "method", {"name": "mam_adapter", "adapter": {"placement": "houlsby"}}),
        2,
        ["method.adapter", "parallel"],
    ),
    "sparse-density-zero": (
        lambda e: _with(e, "method", {"name": "sparse", "density": 0}),
        2,
        ["method.density", "greater than 0"],
    ),
    "sparse-density-above-one": (
        lambda e: _with(e, "method", {"name": "sparse", "density": 1.5}),
        2,
        ["method.density", "less than or equal to 1"],
    ),
    "l2sp-alone": (lambda e: _with(e, "method", {"name": "l2sp"}), 2, ["method", "l2sp trains nothing itself"]),
    "l2sp-with-lora": (
        lambda e: _with(e, "method", [{"name": "lora"}, {"name": "l2sp"}]),
        2,
        ["method", "lora trains new weights"],
    ),
    "batch-size-zero": (lambda e: e.train(train={"batch_size": 0}), 2, ["train.batch_size"]),
    "malformed-yaml": (
        lambda e: ["train", _tsv(e.tmp / "broken.yaml", ["model:", "  name: [unclosed", "task: causal_lm"])],
        2,
        ["broken.yaml", "line", "YAML"],
    ),
    "recipe-missing": (lambda e: ["train", e.tmp / "nope.yaml"], 2, ["nope.yaml", "no such recipe"]),
    "set-without-equals": (lambda e: e.train(None, "--set", "train.lr"), 2, ["--set", "train.lr", "key=value"]),
    "set-into-a-value": (lambda e: e.train(None, "--set", "train.lr.x=1"), 2, ["train.lr.x", "'lr'"]),
    # malformed recipe files
    "yaml-tab-indentation": (
        lambda e: ["train", _text(e.tmp / "tabs.yaml", "model:\n\tname: x\ntask: causal_lm\n")],
        2,
        ["tabs.yaml", "line 2", "not valid YAML"],
    ),
    "yaml-unclosed-bracket": (
        lambda e: ["train", _text(e.tmp / "open.yaml", "task: causal_lm\nmethod: {name: lora, r: [4\n")],
        2,
        ["open.yaml", "not valid YAML"],
    ),
    "yaml-bad-tagged-scalar": (
        lambda e: ["train", _text(e.tmp / "tag.yaml", "train: {lr: !!float fast}\n")],
        2,
        ["tag.yaml", "not valid YAML"],
    ),
    "yaml-list-not-mapping": (
        lambda e: ["train", _text(e.tmp / "list.yaml", "- model\n- task\n")],
        2,
        ["list.yaml", "mapping", "not a list"],
    ),
    "recipe-empty": (lambda e: ["train", _text(e.tmp / "empty.yaml", "")], 2, ["empty.yaml", "is empty", "mapping"]),
    "recipe-binary": (lambda e: ["train", _garbage(e, "binary.yaml")], 2, ["binary.yaml", "not a text file"]),
    # unknown keys, per section
    "unknown-key-model": (lambda e: e.train(model={"nmae": "x"}), 2, ["model.nmae", "unknown key", "'name'"]),
    "unknown-key-data": (lambda e: e.train(data={"text_colum": "x"}), 2, ["data.text_colum", "'text_column'"]),
    "unknown-key-method": (lambda e: e.train(method={"rank": 4}), 2, ["method.rank", "unknown key", "'r'"]),
    "unknown-key-hub-source": (
        lambda e: e.train(data={"train": {"hub": "glue", "split": "train", "confg": "sst2"}}),
        2,
        ["data.train.confg", "'config'"],
    ),
    "unknown-top-level-key": (lambda e: e.train(e.doc() | {"Model": {}}), 2, ["Model", "unknown key", "'model'"]),
    "unknown-task": (
        lambda e: e.train(task="summarization"),
        2,
        ["task", "'summarization'", "'token_classification'"],
    ),
    "method-name-missing": (lambda e: _with(e, "method", {"r": 4}), 2, ["method.name", "missing", "lora"]),
    "set-unknown-section": (lambda e: e.train(None, "--set", "trian.lr=0.1"), 2, ["trian", "unknown key", "'train'"]),
    "set-bad-yaml-value": (lambda e: e.train(None, "--set", "train.lr=[1"), 2, ["--set train.lr", "not valid YAML"]),
    # wrong types, per section
    "wrong-type-model": (
        lambda e: e.train(model={"trust_remote_code": "maybe"}),
        2,
        ["model.trust_remote_code", "'maybe'"],
    ),
    "wrong-type-data": (lambda e: e.train(data={"max_length": "long"}), 2, ["data.max_length", "'long'"]),
    "wrong-type-data-labels": (lambda e: e.train(data={"labels": "neg,pos"}), 2, ["data.labels", "list", "'neg,pos'"]),
    "wrong-type-method": (lambda e: e.train(method={"r": "four"}), 2, ["method.r", "integer", "'four'"]),
    "wrong-type-section": (lambda e: _with(e, "train", "fast"), 2, ["train", "dictionary", "'fast'"]),
    "hub-source-without-split": (
        lambda e: e.train(data={"train": {"hub": "nyu-mll/glue"}}),
        2,
        ["data.train.split", "required"],
    ),
    # out of range
    "grad-accum-zero": (lambda e: e.train(train={"grad_accum": 0}), 2, ["train.grad_accum", "greater than 0"]),
    "warmup-ratio-above-one": (lambda e: e.train(train={"warmup_ratio": 1.5}), 2, ["train.warmup_ratio", "1.5"]),
    "max-length-zero": (lambda e: e.train(data={"max_length": 0}), 2, ["data.max_length", "greater than 0"]),
    "lora-dropout-one": (lambda e: e.train(method={"dropout": 1.0}), 2, ["method.dropout", "less than 1"]),
    # conflicting options
    "best-metric-without-validation": (
        lambda e: _without_validation(e, best_metric="accuracy"),
        2,
        ["train.best_metric", "data.validation"],
    ),
    "layers-selects-nothing": (
        lambda e: _with(e, "method", {"name": "layers", "top_k": 0}),
        2,
        ["method", "top_k", "module_types"],
    ),
    "fp16-on-cpu": (lambda e: e.train(train={"precision": "fp16"}), 2, ["train.precision", "fp16", "CUDA"]),
    "output-dir-empty": (lambda e: e.train(e.doc() | {"output_dir": ""}), 2, ["output_dir", "empty"]),
    "output-dir-root": (lambda e: e.train(e.doc() | {"output_dir": "/"}), 2, ["output_dir", "root"]),
    "output-dir-cwd": (lambda e: e.train(e.doc() | {"output_dir": "."}), 2, ["output_dir", "current directory"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_bert, cls_data, full_run, adapter_run, tmp_path, monkeypatch):
    bad_input_helpers.refused(case, CASES[case], Env(tiny_bert, cls_data, full_run, adapter_run, tmp_path), monkeypatch)
