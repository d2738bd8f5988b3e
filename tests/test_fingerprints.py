"""Fingerprinted inputs (ftune/data/fingerprint.py): run.json records the content of the data files and the base model's
files; `--resume` refuses changed data in one line (or goes on with --allow-changed-data, recorded), `ftune eval`
warns in one line when the base weights changed, and the encoded-data cache misses on an edit that keeps the
file's size and modification time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_distributed import _ftune
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune import assemble
from ftune.cli import app
from ftune.data import fingerprint
from ftune.data.sources import read_rows
from ftune.recipe import DataSpec, HubSource, validate_recipe
from ftune.rundir import read_record
from refusals import check_refusal
from refusals import snapshot as _snapshot

runner = CliRunner()
TRAIN, VALIDATION = Path("data/train.tsv"), Path("data/validation.tsv")


# --- a started run, copied per test ------------------------------------------------------------------------------


def _recipe(root: Path, model: Path, data: Path) -> None:
    """root/recipe.yaml: a 2-step run in `root/run` that checkpoints every step, on a private copy of `data` in
    `root/data`, with relative paths (data.train the folder, data.validation the file), so a copy of `root` is the
    same run."""
    shutil.copytree(data, root / "data")
    doc = recipe_doc("cls", model, Path("data"), Path("run"), max_steps=2, save_every=1, keep_checkpoints=2)
    doc["data"] |= {"train": "data", "validation": str(VALIDATION)}
    write_recipe(root / "recipe.yaml", doc)


@pytest.fixture(scope="module")
def started(tiny_bert, cls_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("started")
    _recipe(root, tiny_bert, cls_data)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = runner.invoke(app, ["train", "recipe.yaml"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture()
def here(started, tmp_path, monkeypatch) -> Path:
    """A private copy of the started run and its data, as the working directory."""
    copy = shutil.copytree(started, tmp_path / "work")
    monkeypatch.chdir(copy)
    return copy


def _flip_labels(path: Path) -> None:
    header, *rows = path.read_text().splitlines()
    flipped = [f"{text}\t{1 - int(label)}" for text, label in (row.rsplit("\t", 1) for row in rows)]
    path.write_text("\n".join([header, *flipped]) + "\n")


def _add_rows(path: Path) -> None:
    with open(path, "a") as f:
        f.write("a new sentence that was not there\t1\n")


def _flip_keeping_mtime(path: Path) -> None:
    stat = path.stat()
    _flip_labels(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size


# --- catalogue: one line, the exit code, nothing on disk changed ------------------------------------------------


def _resume_after(*edits: tuple[Callable[[Path], None], Path]) -> Callable[[Path], list]:
    def build(root: Path) -> list:
        for edit, path in edits:
            edit(root / path)
        return ["train", "recipe.yaml", "--resume"]

    return build


def _new_run_allowing_changed_data(root: Path) -> list:
    shutil.rmtree(root / "run")
    return ["train", "recipe.yaml", "--allow-changed-data"]


CASES: dict[str, tuple[Callable[[Path], list], int, list[str]]] = {
    "resume-labels-flipped": (
        _resume_after((_flip_labels, TRAIN)),
        1,
        ["--resume", "data.train", "data/train.tsv", "same size", "other content", "--allow-changed-data", "new run"],
    ),
    "resume-rows-added": (
        _resume_after((_add_rows, TRAIN)),
        1,
        ["--resume", "data.train", "data/train.tsv", "bytes then", "now", "--allow-changed-data"],
    ),
    "resume-edit-keeping-size-and-mtime": (
        _resume_after((_flip_keeping_mtime, TRAIN)),
        1,
        ["data.train", "data/train.tsv", "other content", "--allow-changed-data"],
    ),
    "resume-validation-changed": (
        _resume_after((_add_rows, VALIDATION)),
        1,
        ["data.validation", "data/validation.tsv", "--allow-changed-data"],
    ),
    "resume-both-splits-changed": (
        _resume_after((_flip_labels, TRAIN), (_add_rows, VALIDATION)),
        1,
        ["data.train", "data.validation", "--allow-changed-data"],
    ),
    "allow-changed-data-without-resume": (
        _new_run_allowing_changed_data,
        2,
        ["--allow-changed-data", "only with --resume"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, here):
    build, code, needles = CASES[case]
    check_refusal(build(here), code, needles, here)


# --- what run.json records, and resuming ------------------------------------------------------------------------


def test_the_record_holds_the_fingerprints_of_data_and_model(here, tiny_bert):
    prints = read_record("run").fingerprints
    assert prints["data"] == {
        "train": {"path": str(TRAIN), **fingerprint.file_fingerprint(TRAIN)},
        "validation": {"path": str(VALIDATION), **fingerprint.file_fingerprint(VALIDATION)},
    }
    assert prints["data"]["train"]["sha256"] == hashlib.sha256(TRAIN.read_bytes()).hexdigest()
    assert set(prints["model"]) == {"config.json", "model.safetensors"}
    assert prints["model"] == fingerprint.model_fingerprints(tiny_bert)


def test_resume_on_unchanged_data_goes_on(here):
    shutil.rmtree(Path("run/checkpoints/step-00000002"))
    result = runner.invoke(app, ["train", "recipe.yaml", "--resume"])
    assert result.exit_code == 0, result.output
    assert "changed_data" not in read_record("run").resumes[-1]


def test_allow_changed_data_goes_on_and_is_recorded(here):
    shutil.rmtree(Path("run/checkpoints/step-00000002"))
    was = fingerprint.file_fingerprint(TRAIN)
    _flip_keeping_mtime(TRAIN)
    result = runner.invoke(app, ["train", "recipe.yaml", "--resume", "--allow-changed-data"])
    assert result.exit_code == 0, result.output
    record = read_record("run")
    assert (Path("run/checkpoints/step-00000002/state.json")).is_file()  # it trained on
    changed = record.resumes[-1]["changed_data"]
    assert changed == {
        "train": {
            "was": {"path": str(TRAIN), **was},
            "now": {"path": str(TRAIN), **fingerprint.file_fingerprint(TRAIN)},
        }
    }
    assert record.fingerprints["data"]["train"]["sha256"] == was["sha256"]  # how the run started stays as it was

    # the accepted data is what the next --resume expects; a further change is refused again
    assert runner.invoke(app, ["train", "recipe.yaml", "--resume"]).exit_code == 0
    _add_rows(TRAIN)
    again = runner.invoke(app, ["train", "recipe.yaml", "--resume"])
    assert again.exit_code == 1 and "data.train" in again.stderr and "bytes then" in again.stderr


def test_a_record_without_fingerprints_resumes_without_a_check(here):
    record = json.loads(Path("run/run.json").read_text())
    del record["fingerprints"]
    Path("run/run.json").write_text(json.dumps(record))
    _flip_labels(TRAIN)
    result = runner.invoke(app, ["train", "recipe.yaml", "--resume"])
    assert result.exit_code == 0, result.output


def test_nproc_passes_allow_changed_data_to_every_process(here, monkeypatch):
    seen = []

    class Launcher:
        def __init__(self, command, **kwargs):
            seen.append(command)
            self.stderr = []

        def wait(self):
            return 0

    monkeypatch.setattr("subprocess.Popen", Launcher)
    result = runner.invoke(app, ["train", "recipe.yaml", "--nproc", "2", "--resume", "--allow-changed-data"])
    assert result.exit_code == 0, result.output
    assert seen[0][-3:] == ["recipe.yaml", "--resume", "--allow-changed-data"]


def test_every_process_refuses_changed_data(here):
    _flip_labels(TRAIN)
    before = _snapshot(here)
    refused = _ftune("train", "recipe.yaml", "--nproc", 2, "--resume")  # in `here`: the working directory
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 1 and len(errors) == 2, refused.stderr  # each process, before any collective
    assert all("data.train" in e and "--allow-changed-data" in e for e in errors), refused.stderr
    assert "Traceback" not in refused.stderr
    assert _snapshot(here) == before


# --- the base model ---------------------------------------------------------------------------------------------


@pytest.fixture()
def own_base(tiny_bert, cls_data, tmp_path) -> tuple[Path, Path]:
    """(a private copy of the tiny BERT, a finished run trained on it)."""
    base = shutil.copytree(tiny_bert, tmp_path / "bert")
    doc = recipe_doc("cls", base, cls_data, tmp_path / "run", max_steps=1)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return base, tmp_path / "run"


def _change_one_weight(base: Path) -> None:
    weights = load_file(base / "model.safetensors")
    name = next(k for k in weights if k.endswith("attention.self.query.weight"))
    weights[name] = weights[name] + 0.5
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})


def _warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def test_eval_warns_when_the_base_weights_changed(own_base):
    base, run = own_base
    unchanged = runner.invoke(app, ["eval", str(run)])
    assert unchanged.exit_code == 0, unchanged.output
    assert not _warnings(unchanged)

    _change_one_weight(base)
    changed = runner.invoke(app, ["eval", str(run)])
    assert changed.exit_code == 0, changed.output
    (warning,) = _warnings(changed)
    assert str(run) in warning and str(base) in warning and "model.safetensors: same size, other content" in warning
    assert json.loads(changed.stdout)  # the scores still come


@pytest.mark.parametrize("command", ["predict", "merge", "export"])
def test_predict_merge_and_export_warn_too(command, own_base, tmp_path):
    base, run = own_base
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"sentence": "a good film"}\n')
    args = {
        "predict": ["predict", run, "--input", rows],
        "merge": ["merge", run, tmp_path / "merged"],
        "export": ["export", run, tmp_path / "exported", "--format", "hf"],
    }[command]
    _change_one_weight(base)
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    (warning,) = _warnings(result)
    assert str(run) in warning and "not the one it was trained on" in warning


def test_eval_of_several_runs_warns_for_each(own_base):
    base, run = own_base
    copy = shutil.copytree(run, run.with_name("copy"))
    _change_one_weight(base)
    result = runner.invoke(app, ["eval", str(run), str(copy)])
    assert result.exit_code == 0, result.output
    warnings = _warnings(result)
    assert len(warnings) == 2 and f"{run}:" in warnings[0] and f"{copy}:" in warnings[1], result.stderr


def test_a_run_recorded_before_fingerprints_loads_without_a_warning(own_base):
    base, run = own_base
    record = json.loads((run / "run.json").read_text())
    del record["fingerprints"]
    (run / "run.json").write_text(json.dumps(record))
    _change_one_weight(base)
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    assert not _warnings(result)


def test_a_model_digest_is_cached_until_the_file_changes(tiny_bert, tmp_path, monkeypatch):
    base, cache = shutil.copytree(tiny_bert, tmp_path / "bert"), tmp_path / "cache"
    first = fingerprint.model_fingerprints(base, cache, cached_from=0)
    assert len(list(cache.glob("*.json"))) == 2
    real = fingerprint.file_fingerprint
    monkeypatch.setattr(fingerprint, "file_fingerprint", lambda p: pytest.fail(f"{p} hashed again"))
    assert fingerprint.model_fingerprints(base, cache, cached_from=0) == first  # read from the cache
    monkeypatch.setattr(fingerprint, "file_fingerprint", real)

    stat = (base / "model.safetensors").stat()
    _change_one_weight(base)
    os.utime(base / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ctime moves all the same
    again = fingerprint.model_fingerprints(base, cache, cached_from=0)
    assert again["model.safetensors"] == real(base / "model.safetensors") != first["model.safetensors"]
    assert fingerprint.model_fingerprints(base) == again  # uncached: the same digests
    assert fingerprint.model_fingerprints(tmp_path / "no-such-folder") == {}


def test_model_changes_name_each_file():
    a, b = {"size": 4, "sha256": "aa"}, {"size": 4, "sha256": "bb"}
    assert fingerprint.model_changes({"m.bin": a}, {"m.bin": a}) == []
    assert fingerprint.model_changes({"m.bin": a}, {"m.bin": b}) == ["m.bin: same size, other content"]
    assert fingerprint.model_changes({"m.bin": a}, {"m.bin": {"size": 5, "sha256": "aa"}}) == [
        "m.bin: 4 bytes then, 5 now"
    ]
    assert fingerprint.model_changes({"m.bin": a}, {"x.bin": a}) == ["m.bin missing", "x.bin added"]
    assert fingerprint.model_changes({}, {"m.bin": a}) == fingerprint.model_changes({"m.bin": a}, {}) == []


# --- data fingerprints and the encoded-data cache ---------------------------------------------------------------


def test_a_file_is_hashed_in_chunks_by_content(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(fingerprint.CHUNK * 2 + 17))
    assert fingerprint.file_fingerprint(path) == {
        "size": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def test_a_hub_dataset_is_recorded_without_a_hash(cls_data, tmp_path):
    hub = HubSource(hub="nyu-mll/glue", config="sst2", split="train")
    data = DataSpec(train=[hub, str(cls_data)], validation=[str(tmp_path / "missing.tsv"), str(cls_data)])
    prints = fingerprint.data_fingerprints(data, reads_conll=False)
    assert prints["train"] == {"hub": "nyu-mll/glue", "config": "sst2", "split": "train"}
    assert prints["validation"]["path"] == str(cls_data / "validation.tsv")


def test_a_moved_file_with_the_same_bytes_is_no_change():
    was = {"path": "a/train.tsv", "size": 3, "sha256": "aa"}
    assert fingerprint.data_changes({"train": was}, {"train": was | {"path": "b/train.tsv"}}) == {}
    moved = fingerprint.data_changes({"train": was}, {"train": {"path": "b/train.tsv", "size": 4, "sha256": "bb"}})
    assert moved == {
        "train": "data.train: b/train.tsv changed since the run started (it started on a/train.tsv): "
        "3 bytes then, 4 now"
    }


def test_the_encoded_cache_misses_after_an_edit_keeping_size_and_mtime(tiny_bert, cls_data, tmp_path):
    data = shutil.copytree(cls_data, tmp_path / "data")
    recipe = validate_recipe(recipe_doc("cls", tiny_bert, data, tmp_path / "run"))
    _, tokenizer = assemble.source_and_tokenizer(recipe)
    assert "cached at" in assemble.encoded_splits(recipe, tokenizer)[1]
    assert "read from" in assemble.encoded_splits(recipe, tokenizer)[1]

    _flip_keeping_mtime(data / "train.tsv")
    assert "encoded and cached at" in assemble.encoded_splits(recipe, tokenizer)[1]  # a miss: not the stale entry


def test_an_edit_keeping_size_and_mtime_is_read_anew(cls_data, tmp_path):
    data = shutil.copytree(cls_data, tmp_path / "data")
    first = read_rows([str(data)], "train").rows
    _flip_keeping_mtime(data / "train.tsv")
    again = read_rows([str(data)], "train").rows
    assert [int(r["label"]) for r in again] == [1 - int(r["label"]) for r in first]
