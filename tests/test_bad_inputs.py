"""Every bad input ends in one line on stderr that names the field, file or row, a clean exit code (2: recipe or
usage, 1: runtime), no traceback, and nothing on disk overwritten."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import recipe_doc, write_recipe
from refusals import check_refusal
from typer.testing import CliRunner

from ftune.cli import app

runner = CliRunner()


@dataclass
class Env:
    """What a case builds its bad input from; `tmp` is the case's own folder."""

    bert: Path
    cls: Path
    run: Path  # a finished `full` run (tiny BERT), shared: cases must never change it
    adapter: Path  # a finished `adapter` run (tiny BERT), shared as well
    tmp: Path

    def doc(self, **train) -> dict:
        return recipe_doc("cls", self.bert, self.cls, self.tmp / "out", **train)

    def recipe(self, doc: dict | None = None, **section_updates: dict) -> Path:
        doc = doc or self.doc()
        for section, values in section_updates.items():
            doc[section] = doc[section] | values if isinstance(doc[section], dict) else values
        return write_recipe(self.tmp / "recipe.yaml", doc)

    def train(self, doc: dict | None = None, *extra: str, **section_updates: dict) -> list:
        return ["train", self.recipe(doc, **section_updates), *extra]


@pytest.fixture(scope="module")
def adapter_run(tiny_bert, cls_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs-adapter-run")
    method = {"name": "adapter", "bottleneck": 4}
    doc = recipe_doc("cls", tiny_bert, cls_data, root / "run", method=method, max_steps=1)
    result = runner.invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return root / "run"


def _copy_run(env: Env, *, keep_checkpoints: bool = True) -> Path:
    """A private copy of the shared run whose recipe.yaml points at the copy (so --resume accepts the recipe)."""
    copy = shutil.copytree(env.run, env.tmp / "copy")
    if not keep_checkpoints:
        shutil.rmtree(copy / "checkpoints")
    doc = yaml.safe_load((copy / "recipe.yaml").read_text()) | {"output_dir": str(copy)}
    write_recipe(copy / "recipe.yaml", doc)
    return copy


def _tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def _bad_label(env: Env) -> list:
    rows = (env.cls / "validation.tsv").read_text().splitlines()
    rows[3] = rows[3].rsplit("\t", 1)[0] + "\t7"  # third data row (line 1 is the header)
    bad = _tsv(env.tmp / "validation.tsv", rows)
    return env.train(data={"validation": str(bad)})


def _weightless_model(env: Env) -> list:
    folder = env.tmp / "no-weights"
    folder.mkdir()
    shutil.copy(env.bert / "config.json", folder / "config.json")
    return env.train(model={"name": str(folder)})


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


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _with(env: Env, section: str, value) -> list:
    """Train a recipe whose `section` is replaced outright (not merged into the default)."""
    return env.train(env.doc() | {section: value})


def _without_validation(env: Env, **train) -> list:
    doc = env.doc(**train)
    del doc["data"]["validation"]
    return env.train(doc)


def _cls_rows(env: Env, split: str = "train") -> list[str]:
    return (env.cls / f"{split}.tsv").read_text().splitlines()


def _empty_label_cell(env: Env) -> list:
    rows = _cls_rows(env)
    rows[2] = rows[2].rsplit("\t", 1)[0] + "\t"  # second data row: the label cell is empty
    return env.train(data={"train": str(_tsv(env.tmp / "train.tsv", rows))})


def _validation_without_text_column(env: Env) -> list:
    rows = _cls_rows(env, "validation")
    rows[0] = "text\tlabel"
    return env.train(data={"validation": str(_tsv(env.tmp / "validation.tsv", rows))})


def _garbage(env: Env, name: str, size: int = 512) -> str:
    path = env.tmp / name
    path.write_bytes(bytes(range(256)) * (size // 256))
    return str(path)


def _model_with_corrupt_config(env: Env) -> list:
    folder = shutil.copytree(env.bert, env.tmp / "corrupt-config")
    (folder / "config.json").write_text('{"model_type": "bert", ')
    return env.train(model={"name": str(folder)})


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
    return {"eval": ["eval", copy], "merge": ["merge", copy, env.tmp / "merged"],
            "export": ["export", copy, env.tmp / "exported", "--format", "hf"]}[command]


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


def _token_train(env: Env, name: str, text: str) -> list:
    """A token_classification recipe training on a file `name` holding `text` (no validation)."""
    doc = env.doc()
    doc["task"], doc["data"] = "token_classification", {"train": str(_text(env.tmp / name, text)), "max_length": 32}
    return env.train(doc)


def _s2s_train(env: Env, rows: list[dict], model: Path | None = None) -> list:
    """A seq2seq recipe (document -> summary) on a tiny T5 built into the case's folder, training on `rows`."""
    from conftest import build_t5, s2s_recipe_doc

    data = env.tmp / "s2s"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return env.train(s2s_recipe_doc(model or build_t5(env.tmp / "t5"), data, env.tmp / "out"))


def _prefix_without_cache(env: Env) -> list:
    """Prefix tuning on a tiny DistilBERT (BERT's vocabulary), whose forward takes no attention cache."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    folder = env.tmp / "distilbert"
    torch.manual_seed(0)
    vocab = (env.bert / "vocab.txt").read_text().split()
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=1, n_heads=4, hidden_dim=64)
                          ).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (env.bert / name).is_file():
            shutil.copy(env.bert / name, folder / name)
    doc = env.doc() | {"model": {"name": str(folder)}, "method": {"name": "prefix_tuning", "n_tokens": 4}}
    return env.train(doc)


CPU_ONLY = {"fp16-on-cpu"}  # cases that are bad inputs only on a machine without CUDA


# id: (arguments built from Env, exit code, substrings the one stderr line must hold)
CASES: dict[str, tuple[Callable[[Env], list], int, list[str]]] = {
    "unknown-key": (lambda e: e.train(train={"lrr": 0.1}), 2, ["train.lrr", "unknown key", "'lr'"]),
    "unknown-key-by-set": (lambda e: e.train(None, "--set", "data.max_lenght=8"), 2, ["data.max_lenght", "'max_length'"]),
    "wrong-type": (lambda e: e.train(train={"batch_size": "abc"}), 2, ["train.batch_size", "'abc'"]),
    "unknown-method": (lambda e: e.train(method={"name": "lorra"}), 2, ["method.name", "'lorra'", "'lora'"]),
    "negative-lr": (lambda e: e.train(train={"lr": -1e-3}), 2, ["train.lr", "-0.001"]),
    "lora-r-zero": (lambda e: e.train(method={"r": 0}), 2, ["method.r"]),
    "methods-in-conflict": (lambda e: _with(e, "method", [{"name": "lora"}, {"name": "adalora"}]), 2,
                            ["method:", "lora and adalora", "linear layers", "keep one"]),
    "method-list-bad-part": (lambda e: _with(e, "method", [{"name": "lora", "r": 0}, {"name": "bitfit"}]), 2,
                             ["method[0].r", "greater than 0"]),
    "mam-adapter-placement": (lambda e: _with(e, "method", {"name": "mam_adapter", "adapter": {"placement": "houlsby"}}),
                              2, ["method.adapter", "parallel"]),
    "sparse-density-zero": (lambda e: _with(e, "method", {"name": "sparse", "density": 0}), 2,
                            ["method.density", "greater than 0"]),
    "sparse-density-above-one": (lambda e: _with(e, "method", {"name": "sparse", "density": 1.5}), 2,
                                 ["method.density", "less than or equal to 1"]),
    "l2sp-alone": (lambda e: _with(e, "method", {"name": "l2sp"}), 2, ["method", "l2sp trains nothing itself"]),
    "l2sp-with-lora": (lambda e: _with(e, "method", [{"name": "lora"}, {"name": "l2sp"}]), 2,
                       ["method", "lora trains new weights"]),
    "batch-size-zero": (lambda e: e.train(train={"batch_size": 0}), 2, ["train.batch_size"]),
    "malformed-yaml": (
        lambda e: ["train", _tsv(e.tmp / "broken.yaml", ["model:", "  name: [unclosed", "task: causal_lm"])],
        2, ["broken.yaml", "line", "YAML"],
    ),
    "recipe-missing": (lambda e: ["train", e.tmp / "nope.yaml"], 2, ["nope.yaml", "no such recipe"]),
    "set-without-equals": (lambda e: e.train(None, "--set", "train.lr"), 2, ["--set", "train.lr", "key=value"]),
    "set-into-a-value": (lambda e: e.train(None, "--set", "train.lr.x=1"), 2, ["train.lr.x", "'lr'"]),
    "model-path-missing": (lambda e: e.train(model={"name": "/no/such/model"}), 1, ["model.name", "/no/such/model"]),
    "model-without-weights": (_weightless_model, 1, ["model.name", "no-weights"]),
    "data-file-missing": (
        lambda e: e.train(data={"train": str(e.tmp / "absent.tsv")}), 1, ["data.train", "absent.tsv"],
    ),
    "label-column-missing": (
        lambda e: e.train(data={"label_column": "labelz"}), 1, ["train.tsv", "'labelz'", "data.label_column"],
    ),
    "label-outside-classes": (_bad_label, 1, ["validation.tsv row 3", "7"]),
    "empty-dataset": (
        lambda e: e.train(data={"train": str(_tsv(e.tmp / "train.tsv", ["sentence\tlabel"]))}),
        1, ["train.tsv", "no rows"],
    ),
    "empty-jsonl": (
        lambda e: e.train(data={"train": str(_tsv(e.tmp / "train.jsonl", [""]))}), 1, ["train.jsonl", "no rows"],
    ),
    "malformed-jsonl": (
        lambda e: e.train(data={"train": str(_tsv(e.tmp / "train.jsonl", ['{"sentence": ']))}),
        1, ["train.jsonl", "cannot be read", "JSON parse error"],
    ),
    "output-dir-holds-a-run": (lambda e: e.train(e.doc() | {"output_dir": str(e.run)}), 1, ["output_dir", "--overwrite"]),
    "output-dir-not-a-run": (_not_a_run, 1, ["output_dir", "not an ftune run"]),
    "output-dir-is-a-file": (
        lambda e: e.train(None, "--set", f"output_dir={_text(e.tmp / 'taken', 'a file')}"), 1,
        ["output_dir", "taken", "is a file"],
    ),
    "output-dir-under-a-file": (
        lambda e: e.train(e.doc() | {"output_dir": str(_text(e.tmp / "taken", "a file") / "run")}), 1,
        ["output_dir", "is a file"],
    ),
    "predict-input-not-utf8": (
        lambda e: ["predict", e.run, "--input", _garbage(e, "rows.jsonl")], 1, ["rows.jsonl", "not UTF-8"],
    ),
    "resume-without-run": (lambda e: e.train(None, "--resume"), 1, ["--resume", "no run"]),
    "resume-without-checkpoint": (_resume_without_checkpoint, 1, ["--resume", "no complete checkpoint"]),
    "resume-other-recipe": (_resume_other_recipe, 1, ["--resume", "recipe differs"]),
    "export-peft-of-full": (lambda e: ["export", e.run, e.tmp / "peft", "--format", "peft"], 1, ["peft", "full"]),
    "merge-into-non-empty": (_merge_into_non_empty, 1, ["merged", "not empty"]),
    "eval-not-a-run": (_plain_dir, 1, ["plain-dir", "not an ftune run"]),
    "eval-data-missing": (
        lambda e: ["eval", e.run, "--data", e.tmp / "absent.jsonl"], 1, ["absent.jsonl", "--data"],
    ),
    # malformed recipe files
    "yaml-tab-indentation": (
        lambda e: ["train", _text(e.tmp / "tabs.yaml", "model:\n\tname: x\ntask: causal_lm\n")],
        2, ["tabs.yaml", "line 2", "not valid YAML"],
    ),
    "yaml-unclosed-bracket": (
        lambda e: ["train", _text(e.tmp / "open.yaml", "task: causal_lm\nmethod: {name: lora, r: [4\n")],
        2, ["open.yaml", "not valid YAML"],
    ),
    "yaml-bad-tagged-scalar": (
        lambda e: ["train", _text(e.tmp / "tag.yaml", "train: {lr: !!float fast}\n")], 2, ["tag.yaml", "not valid YAML"],
    ),
    "yaml-list-not-mapping": (
        lambda e: ["train", _text(e.tmp / "list.yaml", "- model\n- task\n")], 2, ["list.yaml", "mapping", "not a list"],
    ),
    "recipe-empty": (lambda e: ["train", _text(e.tmp / "empty.yaml", "")], 2, ["empty.yaml", "is empty", "mapping"]),
    "recipe-binary": (lambda e: ["train", _garbage(e, "binary.yaml")], 2, ["binary.yaml", "not a text file"]),
    # unknown keys, per section
    "unknown-key-model": (lambda e: e.train(model={"nmae": "x"}), 2, ["model.nmae", "unknown key", "'name'"]),
    "unknown-key-data": (lambda e: e.train(data={"text_colum": "x"}), 2, ["data.text_colum", "'text_column'"]),
    "unknown-key-method": (lambda e: e.train(method={"rank": 4}), 2, ["method.rank", "unknown key", "'r'"]),
    "unknown-key-hub-source": (
        lambda e: e.train(data={"train": {"hub": "glue", "split": "train", "confg": "sst2"}}),
        2, ["data.train.confg", "'config'"],
    ),
    "unknown-top-level-key": (lambda e: e.train(e.doc() | {"Model": {}}), 2, ["Model", "unknown key", "'model'"]),
    "unknown-task": (
        lambda e: e.train(task="summarization"), 2, ["task", "'summarization'", "'token_classification'"],
    ),
    "method-name-missing": (lambda e: _with(e, "method", {"r": 4}), 2, ["method.name", "missing", "lora"]),
    "set-unknown-section": (lambda e: e.train(None, "--set", "trian.lr=0.1"), 2, ["trian", "unknown key", "'train'"]),
    "set-bad-yaml-value": (lambda e: e.train(None, "--set", "train.lr=[1"), 2, ["--set train.lr", "not valid YAML"]),
    # wrong types, per section
    "wrong-type-model": (
        lambda e: e.train(model={"trust_remote_code": "maybe"}), 2, ["model.trust_remote_code", "'maybe'"],
    ),
    "wrong-type-data": (lambda e: e.train(data={"max_length": "long"}), 2, ["data.max_length", "'long'"]),
    "wrong-type-data-labels": (lambda e: e.train(data={"labels": "neg,pos"}), 2, ["data.labels", "list", "'neg,pos'"]),
    "wrong-type-method": (lambda e: e.train(method={"r": "four"}), 2, ["method.r", "integer", "'four'"]),
    "wrong-type-section": (lambda e: _with(e, "train", "fast"), 2, ["train", "dictionary", "'fast'"]),
    "hub-source-without-split": (
        lambda e: e.train(data={"train": {"hub": "nyu-mll/glue"}}), 2, ["data.train.split", "required"],
    ),
    # out of range
    "grad-accum-zero": (lambda e: e.train(train={"grad_accum": 0}), 2, ["train.grad_accum", "greater than 0"]),
    "warmup-ratio-above-one": (lambda e: e.train(train={"warmup_ratio": 1.5}), 2, ["train.warmup_ratio", "1.5"]),
    "max-length-zero": (lambda e: e.train(data={"max_length": 0}), 2, ["data.max_length", "greater than 0"]),
    "lora-dropout-one": (lambda e: e.train(method={"dropout": 1.0}), 2, ["method.dropout", "less than 1"]),
    # conflicting options
    "best-metric-without-validation": (
        lambda e: _without_validation(e, best_metric="accuracy"), 2, ["train.best_metric", "data.validation"],
    ),
    "layers-selects-nothing": (
        lambda e: _with(e, "method", {"name": "layers", "top_k": 0}), 2, ["method", "top_k", "module_types"],
    ),
    "fp16-on-cpu": (lambda e: e.train(train={"precision": "fp16"}), 2, ["train.precision", "fp16", "CUDA"]),
    "output-dir-empty": (lambda e: e.train(e.doc() | {"output_dir": ""}), 2, ["output_dir", "empty"]),
    "output-dir-root": (lambda e: e.train(e.doc() | {"output_dir": "/"}), 2, ["output_dir", "root"]),
    "output-dir-cwd": (lambda e: e.train(e.doc() | {"output_dir": "."}), 2, ["output_dir", "current directory"]),
    # data files
    "parquet-garbage": (
        lambda e: e.train(data={"train": _garbage(e, "train.parquet")}), 1, ["train.parquet", "cannot be read as parquet"],
    ),
    "csv-ragged-rows": (
        lambda e: e.train(data={"train": str(_text(e.tmp / "train.csv", "sentence,label\ngood film,1\nbad film,0,x\n"))}),
        1, ["train.csv", "cannot be read as csv", "line 3"],
    ),
    "csv-short-row": (
        lambda e: e.train(data={"train": str(_text(e.tmp / "train.csv", "sentence,label\ngood film,1\nbad film\n"))}),
        1, ["train.csv row 2", "'label'", "empty"],
    ),
    "unsupported-extension": (
        lambda e: e.train(data={"train": str(_text(e.tmp / "train.txt", "good film\t1\n"))}),
        1, ["train.txt", "unsupported file type", ".jsonl"],
    ),
    "label-cell-empty": (_empty_label_cell, 1, ["train.tsv row 2", "'label'", "empty"]),
    "label-outside-data-labels": (
        lambda e: e.train(data={"labels": ["neg"]}), 1, ["train.tsv row 2", "label 1", "data.labels"],
    ),
    "text-column-missing-in-validation": (
        _validation_without_text_column, 1, ["validation.tsv", "'sentence'", "data.text_column"],
    ),
    # models
    "model-corrupt-config": (_model_with_corrupt_config, 1, ["model.name", "corrupt-config", "config"]),
    "gguf-file-missing": (
        lambda e: e.train(model={"gguf_file": str(e.tmp / "absent.gguf")}), 1, ["model.gguf_file", "absent.gguf"],
    ),
    "gguf-path-missing": (
        lambda e: e.train(model={"name": str(e.tmp / "absent.gguf")}), 1, ["model.name", "absent.gguf"],
    ),
    # token classification
    "conll-line-without-tag": (
        lambda e: _token_train(e, "train.txt", "good NN B-PER\nfilm NN O\n\nbad\n"), 1,
        ["train.txt line 4", "one column"],
    ),
    "token-tags-length-mismatch": (
        lambda e: _token_train(e, "train.jsonl", '{"tokens": ["good"], "ner_tags": ["O"]}\n'
                                                 '{"tokens": ["good", "film"], "ner_tags": ["O"]}\n'),
        1, ["train.jsonl row 2", "2 tokens but 1 tags"],
    ),
    "token-integer-tags-without-labels": (
        lambda e: _token_train(e, "train.jsonl", '{"tokens": ["good"], "ner_tags": [1]}\n'), 1,
        ["train.jsonl row 1", "integer ids", "data.labels"],
    ),
    # seq2seq
    "seq2seq-without-target-column": (
        lambda e: _s2s_train(e, [{"document": "the movie was good"}]), 1,
        ["train.jsonl", "no column 'summary'", "data.target_column"],
    ),
    "seq2seq-on-an-encoder": (
        lambda e: _s2s_train(e, [{"document": "good", "summary": "good"}], e.bert), 1,
        ["model.name", "decoder_start_token_id", "not an encoder-decoder model"],
    ),
    "prefix-tuning-without-attention-cache": (
        _prefix_without_cache, 1, ["DistilBertForSequenceClassification", "takes no attention cache"],
    ),
    # run dirs for eval, merge, export
    "eval-truncated-weights": (_truncated_weights, 1, ["method.safetensors", "cannot be read"]),
    "eval-pickled-weights": (_pickled_weights, 1, ["method.safetensors", "not a safetensors file"]),
    "eval-weights-of-another-method": (
        lambda e: _other_methods_weights(e, "eval"), 1, ["method.safetensors", "does not fit"],
    ),
    "merge-weights-of-another-method": (
        lambda e: _other_methods_weights(e, "merge"), 1, ["method.safetensors", "does not fit"],
    ),
    "export-weights-of-another-method": (
        lambda e: _other_methods_weights(e, "export"), 1, ["method.safetensors", "does not fit"],
    ),
    "merge-adapter-run": (lambda e: ["merge", e.adapter, e.tmp / "merged"], 1, ["adapter", "cannot be folded"]),
    "export-peft-of-adapter": (
        lambda e: ["export", e.adapter, e.tmp / "peft", "--format", "peft"], 1, ["peft", "adapter", "--format hf"],
    ),
    "export-into-a-run": (lambda e: ["export", e.run, e.adapter, "--format", "hf"], 1, ["not empty", "new directory"]),
    "eval-run-record-missing": (lambda e: _run_without(e, "run.json"), 1, ["run.json", "not an ftune run"]),
    "eval-run-record-corrupt": (_corrupt_run_record, 1, ["run.json", "cannot be read"]),
    "eval-tokenizer-missing": (lambda e: _run_without(e, "tokenizer"), 1, ["copy/tokenizer", "missing"]),
    "merge-into-a-file": (
        lambda e: ["merge", e.run, _text(e.tmp / "merged.txt", "mine\n")], 1, ["merged.txt", "not a directory"],
    ),
    "export-under-a-file": (
        lambda e: ["export", e.run, _text(e.tmp / "file", "mine\n") / "out", "--format", "hf"],
        1, ["file/out", "cannot be created"],
    ),
    "eval-split-unknown": (lambda e: ["eval", e.run, "--split", "test"], 2, ["--split test", "no test split", "--data"]),
    "eval-split-without-validation": (
        _eval_without_validation, 2, ["--split validation", "data.validation", "--data"],
    ),
}




def test_the_catalogue_is_large():
    assert len(CASES) >= 45


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_bert, cls_data, full_run, adapter_run, tmp_path, monkeypatch):
    if case in CPU_ONLY and torch.cuda.is_available():
        pytest.skip("a bad input only without CUDA")
    monkeypatch.chdir(tmp_path)  # relative paths a case might write land in its own folder, under the snapshot
    build, code, needles = CASES[case]
    env = Env(tiny_bert, cls_data, full_run, adapter_run, tmp_path)
    check_refusal(build(env), code, needles, tmp_path, full_run, adapter_run, cls_data)


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


# Over-long rows are not an error: they are cut to data.max_length, and counted so the run record can say so.


def _cls_rows_of(texts: list[str], pairs: list[str] | None = None):
    from ftune.data.sources import Rows

    rows = [{"sentence": t, "label": i % 2} | ({"pair": pairs[i]} if pairs else {}) for i, t in enumerate(texts)]
    return Rows(rows, "rows.tsv")


def test_classification_counts_truncated_rows(tiny_bert):
    from transformers import AutoTokenizer

    from ftune.tasks.sequence_classification import encode_classification

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    # [CLS] + words + [SEP]: 5, exactly 8 (fits, not cut), 22 and 9 tokens (cut)
    texts = ["good film was", "good film was a plot and", " ".join(["good"] * 20), "good film was a plot and very"]
    examples, truncated = encode_classification(_cls_rows_of(texts), tokenizer, "sentence", None, "label", ["0", "1"], 8)
    assert [len(e["input_ids"]) for e in examples] == [5, 8, 8, 8]
    assert truncated == 2
    # sentence pairs: the pair's length counts as well
    examples, truncated = encode_classification(
        _cls_rows_of(["good", "good film"], ["bad", " ".join(["bad"] * 10)]), tokenizer, "sentence", "pair", "label",
        ["0", "1"], 8,
    )
    assert truncated == 1 and [len(e["input_ids"]) for e in examples] == [5, 8]


def test_sft_counts_truncated_and_dropped_rows(tiny_llama):
    from transformers import AutoTokenizer

    from ftune.data.sources import Rows
    from ftune.tasks import IGNORE_INDEX
    from ftune.tasks.causal_lm import encode_sft

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    row = {"instruction": "repeat the word", "input": "good", "output": "yes"}
    (probe,), _, _ = encode_sft(Rows([row], "x"), tokenizer, "instruction", "input", "output", "alpaca", 1000)
    prompt = probe["labels"].count(IGNORE_INDEX)
    rows = [row,  # response + EOS: exactly fills prompt + 2
            row | {"output": "yes yes yes"},  # cut, kept
            row | {"instruction": "repeat the word please say the answer"}]  # the prompt alone is too long: dropped
    examples, dropped, truncated = encode_sft(Rows(rows, "x"), tokenizer, "instruction", "input", "output", "alpaca",
                                              prompt + 2)
    assert (len(examples), dropped, truncated) == (2, 1, 1)
    assert all(len(e["input_ids"]) == prompt + 2 for e in examples)


def test_examples_carry_the_counts(tiny_bert, cls_data, tmp_path):
    from transformers import AutoTokenizer

    from ftune import assemble
    from ftune.recipe import validate_recipe

    long_rows = ["sentence\tlabel"] + [f"{' '.join(['good'] * (3 + 4 * i))}\t{i % 2}" for i in range(6)]
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "out")
    doc["data"] |= {"train": str(_tsv(tmp_path / "train.tsv", long_rows)), "max_length": 12}
    recipe = validate_recipe(doc)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    encoded = assemble.encode(recipe, assemble.read_split(recipe, "train"), tokenizer, ["0", "1"])
    # 2 + 3, 7, 11, 15, 19, 23 words: the last four exceed 12 tokens
    assert (encoded.truncated, encoded.dropped, len(encoded.examples)) == (4, 0, 6)


def test_eval_reports_truncated_rows(full_run, tmp_path):
    long_rows = ["sentence\tlabel"] + [f"{' '.join(['good'] * 40)}\t1", "good film\t0"]
    result = runner.invoke(app, ["eval", str(full_run), "--data", str(_tsv(tmp_path / "long.tsv", long_rows))])
    assert result.exit_code == 0, result.output
    assert "note: 1 of 2 rows were cut to data.max_length=32" in result.stderr
    assert '"examples": 2' in result.stdout
