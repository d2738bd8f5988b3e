"""Every module of the package imports on its own, in a fresh interpreter (no import cycle hides behind the order
in which other modules happen to load it), and `ftune --help` needs no heavy library."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "ftune"
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
)


def test_the_package_has_modules():
    assert "ftune.cli" in MODULES and "ftune.methods.lora" in MODULES


def _import_alone(module: str) -> str | None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], check=False, capture_output=True, text=True, timeout=300
    )
    return None if result.returncode == 0 else f"{module}: {(result.stderr.strip().splitlines() or ['?'])[-1]}"


def test_every_module_imports_alone():
    with ThreadPoolExecutor(4) as pool:  # each in its own interpreter; a few at a time
        failures = [f for f in pool.map(_import_alone, MODULES) if f]
    assert not failures, failures


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from typer.testing import CliRunner; from ftune.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate', 'peft', 'matplotlib', 'onnx', "
        "'onnxruntime', 'tensorboard') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
