"""The check every bad-input catalogue shares: a command refused in one stderr line that names the field, file or
row, with a clean exit code, no traceback, and the disk under `roots` byte for byte as it was."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from ftune.cli import app

runner = CliRunner()


def snapshot(*roots: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for root in roots for p in Path(root).rglob("*") if p.is_file()}


def check_refusal(args: list, code: int, needles: list[str], *roots: Path) -> str:
    """Run `ftune ARGS` and assert the refusal; returns its one line."""
    before = snapshot(*roots)
    result = runner.invoke(app, [str(a) for a in args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert snapshot(*roots) == before  # nothing written, nothing overwritten
    return lines[0]
