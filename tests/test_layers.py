"""The layers only look down (pyproject.toml's [tool.importlinter] contract, also run by `lint-imports` in .ci/run):
every import in ftune/, at the top of a module or inside a function, goes to the importing module's own layer or one
below it. And the training loop and the memory estimate take their steps through the same functions (ftune/step).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in config if c["type"] == "layers"]
    return [[name.strip() for name in layer.split("|")] for layer in contract["layers"]]


def _place(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(layer index, 0 = top; the sibling holding `module`); None for the package root (ftune/__init__.py)."""
    for index, layer in enumerate(layers):
        for name in layer:
            if module == name or module.startswith(name + "."):
                return index, name
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every ftune import in the file, wherever it stands (function bodies included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ftune"):
            # `from ftune import rundir` imports the module ftune.rundir
            found += [
                (node.lineno, f"{node.module}.{a.name}" if node.module == "ftune" else node.module) for a in node.names
            ]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ftune")]
    return found


def upward_in(path: Path, module: str, layers: list[list[str]]) -> list[str]:
    """The imports in `path` (the module `module`) that go to a layer above its own, or to a sibling of its layer."""
    own = _place(module, layers)
    assert own is not None or module == "ftune", f"{module} is in no layer of pyproject.toml's contract"
    upward = []
    for line, target in _imports(path):
        theirs = _place(target, layers)
        if own is None or theirs is None:
            continue
        where = f"{path.name}:{line} imports {target}"
        if theirs[0] < own[0]:
            upward.append(f"{where}, a layer above {own[1]}")
        elif theirs[0] == own[0] and theirs[1] != own[1]:
            upward.append(f"{where}, a sibling of {own[1]} in its layer (siblings never import each other)")
    return upward


def upward_imports() -> list[str]:
    layers = _layers()
    return [
        f"{path.relative_to(ROOT)}: {line}"
        for path in sorted((ROOT / "ftune").rglob("*.py"))
        for line in upward_in(path, _module_name(path), layers)
    ]


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_function_local_imports(tmp_path):
    """A negative control: an import of ftune.cli inside a function of a bottom-layer module is caught, and so is
    an import of a sibling in the same layer."""
    probe = tmp_path / "errors.py"
    probe.write_text("def f():\n    from ftune.cli import app\n    return app\n")
    assert upward_in(probe, "ftune.errors", _layers()) == ["errors.py:2 imports ftune.cli, a layer above ftune.errors"]
    probe.write_text("import ftune.errors\nfrom ftune import rundir\n")
    assert upward_in(probe, "ftune.launch", _layers()) == [
        "errors.py:2 imports ftune.rundir, a sibling of ftune.launch in its layer (siblings never import each other)"
    ]


def test_the_loop_and_the_estimate_share_the_step(tiny_bert, cls_data, tmp_path, monkeypatch):
    """The estimate's step (ftune/estimate/step.py: train_step) and the loop (ftune/run/train.py) both go through
    ftune.step's micro_step, gradient_norm and update: patched, each counts the calls of both."""
    from conftest import recipe_doc
    from ftune import assemble, step
    from ftune.estimate import step as estimate_step
    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    calls: dict[str, int] = {}

    def counted(name):
        real = getattr(step, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        return wrapper

    for name in ("micro_step", "gradient_norm", "update"):
        monkeypatch.setattr(step, name, counted(name))
    recipe = validate_recipe(
        recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", {"name": "lora"}, max_steps=2, grad_accum=2)
    )
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    rows = assemble.read_split(recipe, "train")
    names = assemble.label_names(recipe, rows)
    model = assemble.build_model(recipe, source, tokenizer, names)
    setup, batch = estimate_step.prepare_step(recipe, model, tokenizer, names, rows, torch.device("cpu"))
    estimate_step.train_step(model, [batch, batch], setup, setup.optimizer(model))
    assert calls == {"micro_step": 2, "gradient_norm": 1, "update": 1}
    calls.clear()
    import io

    from rich.console import Console

    train(recipe, console=Console(file=io.StringIO()))
    assert calls == {"micro_step": 4, "gradient_norm": 2, "update": 2}
