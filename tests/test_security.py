"""What ftune must never do with files it did not write itself, whatever a recipe or a run dir holds.

(a) no unpickling: weights are safetensors; a `torch.load` is always `weights_only=True`; no `pickle`; YAML only
    through `safe_load` / `safe_dump`. Checked on the source (its syntax tree, so comments do not count).
(b) `trust_remote_code` is off unless the recipe turns it on, and reaches transformers from the recipe only.
(c) a run writes only under its output_dir; merge and export write only into a new or empty folder; an output_dir
    that is empty, the filesystem root or the current directory is refused (a later --overwrite would delete it).
(d) a run dir whose method.safetensors is really a pickle is refused without unpickling it.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import ftune
from conftest import recipe_doc, write_recipe
from ftune.cli import app
from ftune.errors import RecipeError
from ftune.recipe import ModelSpec, validate_recipe

runner = CliRunner()
PACKAGE = Path(ftune.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))

PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_YAML = {
    "safe_load",
    "safe_load_all",
    "safe_dump",
    "safe_dump_all",
    "YAMLError",
    "MarkedYAMLError",
    # what ftune/recipe_yaml.py builds its bounded reader from: the safe loaders (never Loader, FullLoader or
    # UnsafeLoader, which construct Python objects), the parser's events and nodes
    "SafeLoader",
    "CSafeLoader",
    "__with_libyaml__",
    "cyaml",
    "reader",
    "nodes",
    "Event",
    "AliasEvent",
    "MappingNode",
    "Node",
    "org",
}


def _dotted(node: ast.AST) -> str:
    """`torch.load` for an Attribute chain on a Name, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def unsafe_loading(source: str, where: str = "<source>") -> list[str]:
    """Every place in `source` that could unpickle or construct arbitrary objects, as 'where:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLERS:
                found.append(f"{line}: from {node.module} import ...")
            if module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{line}: from torch import load (use torch.load(..., weights_only=True))")
            if module == "yaml" and any(a.name not in SAFE_YAML for a in node.names):
                found.append(f"{line}: from yaml import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Name) and node.id in PICKLERS:
            found.append(f"{line}: uses {node.id}")
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name.startswith("yaml.") and name.split(".")[1] not in SAFE_YAML:
                found.append(f"{line}: {name} (only yaml.safe_load / yaml.safe_dump)")
        elif isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords}
            if _dotted(node.func) == "torch.load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{line}: torch.load without weights_only=True")
            for key in ("allow_pickle", "trust_remote_code"):
                value = keywords.get(key)
                if isinstance(value, ast.Constant) and value.value is True:
                    found.append(f"{line}: {key}=True hard-coded")
    return found


# (a) ------------------------------------------------------------------------------------------------------------


def test_the_package_never_unpickles():
    assert SOURCES, PACKAGE
    found = [hit for path in SOURCES for hit in unsafe_loading(path.read_text(), str(path.relative_to(PACKAGE)))]
    assert not found, "\n".join(found)


def test_the_package_loads_torch_files_weights_only():
    """Where ftune calls torch.load at all (resumable optimizer state), it is weights_only=True."""
    calls = [path for path in SOURCES if "torch.load(" in path.read_text()]
    for path in calls:
        assert not unsafe_loading(path.read_text()), path


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.loads(b'')",
        "from pickle import loads",
        "import joblib",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "from torch import load",
        "import yaml\nyaml.load('a: 1', Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load('a: 1')",
        "import yaml\nyaml.full_load('a: 1')",
        "import yaml\nyaml.dump({})",
        "from yaml import load",
        "import numpy\nnumpy.load('x.npy', allow_pickle=True)",
        "f(x, trust_remote_code=True)",
    ],
)
def test_the_scan_sees_unsafe_loading(snippet):
    """The scan above is not vacuous: each of these is reported."""
    assert unsafe_loading(snippet)


def test_the_scan_passes_safe_loading():
    safe = (
        "import torch, yaml\nfrom safetensors.torch import load_file\n"
        "torch.load('x.pt', weights_only=True)\nyaml.safe_load('a: 1')\nyaml.safe_dump({})\n"
        "# a comment saying pickle is fine\nf(trust_remote_code=spec.trust_remote_code)\n"
    )
    assert unsafe_loading(safe) == []


# (b) ------------------------------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_by_default():
    assert ModelSpec(name="x").trust_remote_code is False
    assert ModelSpec.model_fields["trust_remote_code"].default is False


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Record every from_pretrained of the Auto classes ftune uses (and still load for real)."""
    calls = []
    for auto in ("AutoTokenizer", "AutoModelForSequenceClassification", "AutoModelForCausalLM"):
        cls = getattr(transformers, auto)
        original = cls.from_pretrained

        def recording(*args, _auto=auto, _original=original, **kwargs):
            calls.append((_auto, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    return calls


@pytest.mark.parametrize("trust", [None, False, True])
def test_trust_remote_code_comes_from_the_recipe(trust, from_pretrained_calls, tiny_bert, cls_data, tmp_path):
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "out")
    if trust is not None:
        doc["model"]["trust_remote_code"] = trust
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    assert {auto for auto, _ in from_pretrained_calls} == {"AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(kwargs.get("trust_remote_code") is bool(trust) for _, kwargs in from_pretrained_calls), (
        from_pretrained_calls
    )


def test_eval_of_a_run_trusts_no_remote_code(from_pretrained_calls, lora_run):
    result = runner.invoke(app, ["eval", str(lora_run)])
    assert result.exit_code == 0, result.output
    assert from_pretrained_calls
    assert not any(kwargs.get("trust_remote_code") for _, kwargs in from_pretrained_calls), from_pretrained_calls


# (c) ------------------------------------------------------------------------------------------------------------


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture(scope="module")
def lora_run(tiny_bert, cls_data, tmp_path_factory) -> Path:
    """A finished LoRA run, trained from an empty working directory: nothing may appear outside its output_dir."""
    root = tmp_path_factory.mktemp("security")
    work, out = root / "work", root / "parent" / "run"
    work.mkdir()
    recipe = write_recipe(root / "recipe.yaml", recipe_doc("cls", tiny_bert, cls_data, out, save_every=2))
    before = _tree(root)
    cwd = Path.cwd()
    os.chdir(work)
    try:
        result = runner.invoke(app, ["train", str(recipe)])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    new = _tree(root) - before
    assert new and all(p == out or out in p.parents for p in new - {out.parent}), sorted(new)
    assert not any(work.iterdir())
    return out


def test_a_run_writes_only_under_its_output_dir(lora_run):
    assert (lora_run / "tokenizer").is_dir() and any((lora_run / "tokenizer").iterdir())
    assert (lora_run / "checkpoints").is_dir() and any((lora_run / "checkpoints").iterdir())
    for path in lora_run.rglob("*"):
        assert not path.is_symlink(), path
        assert path.resolve().is_relative_to(lora_run.resolve()), path


def test_a_relative_output_dir_is_under_the_working_directory(tiny_bert, cls_data, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    doc = recipe_doc("cls", tiny_bert, cls_data, Path("runs/a"), max_steps=1)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    assert [p.name for p in work.iterdir()] == ["runs"] and [p.name for p in (work / "runs").iterdir()] == ["a"]
    assert (work / "runs" / "a" / "method.safetensors").is_file()


@pytest.mark.parametrize("command", [["merge"], ["export", "--format", "hf"], ["export", "--format", "peft"]])
def test_merge_and_export_refuse_a_non_empty_out(command, lora_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine\n")
    name, *options = command
    result = runner.invoke(app, [name, str(lora_run), str(out), *options])
    assert result.exit_code == 1, result.output
    assert "not empty" in result.stderr and "Traceback" not in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "mine\n"


@pytest.mark.parametrize("command", [["merge"], ["export", "--format", "peft"]])
def test_merge_and_export_never_write_into_the_run(command, lora_run):
    before = {p: p.read_bytes() for p in lora_run.rglob("*") if p.is_file()}
    name, *options = command
    result = runner.invoke(app, [name, str(lora_run), str(lora_run), *options])
    assert result.exit_code == 1, result.output
    assert {p: p.read_bytes() for p in lora_run.rglob("*") if p.is_file()} == before


def test_merge_and_export_write_into_a_new_folder(lora_run, tmp_path):
    result = runner.invoke(app, ["export", str(lora_run), str(tmp_path / "new" / "peft"), "--format", "peft"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "new" / "peft").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["new"]


@pytest.mark.parametrize("output_dir", ["", "  ", "/", "/tmp/..", ".", "./", "sub/..", "{cwd}"])
def test_a_dangerous_output_dir_is_refused(output_dir, tiny_bert, cls_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path) | {"output_dir": output_dir.format(cwd=tmp_path)}
    with pytest.raises(RecipeError, match=r"^recipe: output_dir: ") as error:
        validate_recipe(doc)
    assert "\n" not in str(error.value)


def test_the_cwd_is_refused_from_the_command_line_too(tiny_bert, cls_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run"))
    result = runner.invoke(app, ["train", str(recipe), "--set", f"output_dir={tmp_path}", "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "output_dir" in result.stderr and "current directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "recipe.yaml"]


def test_a_stored_recipe_may_name_the_current_directory(lora_run, monkeypatch):
    """`cd run && ftune eval .`: the run's own recipe names the folder it sits in, and that is fine to read."""
    monkeypatch.chdir(lora_run)
    result = runner.invoke(app, ["eval", "."])
    assert result.exit_code == 0, result.output


# (d) ------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this makes a folder: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_weights_are_refused_not_unpickled(lora_run, tmp_path):
    copy = shutil.copytree(lora_run, tmp_path / "run")
    marker = tmp_path / "unpickled"
    torch.save({"weights": torch.zeros(2), "payload": _Payload(marker)}, copy / "method.safetensors")
    for command in (
        ["eval", str(copy)],
        ["merge", str(copy), str(tmp_path / "merged")],
        ["export", str(copy), str(tmp_path / "peft")],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "method.safetensors" in lines[0] and "not a safetensors file" in lines[0], (
            result.stderr
        )
        assert not marker.exists(), "the pickle was loaded"
    assert not (tmp_path / "merged").exists() and not (tmp_path / "peft").exists()


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The check above is not vacuous: an ordinary torch.load (weights_only=False) does run the payload."""
    marker = tmp_path / "unpickled"
    torch.save({"payload": _Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.is_dir()
