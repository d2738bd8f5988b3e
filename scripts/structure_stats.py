"""Structure numbers of a checkout: the longest functions in ftune/, lines over 110 and 120 columns in ftune/ and
tests/, and files over 400 lines (issue 23's before/after table).

    .venv/bin/python scripts/structure_stats.py [TREE]   (default: this checkout)

Compare trees formatted alike (`ruff format` at the project's settings), or the formatter's line breaks count.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def main(root: Path) -> None:
    lengths = []
    for path in (root / "ftune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.name}"))
    print("longest functions:", sorted(lengths, reverse=True)[:6])
    files = [p for folder in ("ftune", "tests") for p in (root / folder).rglob("*.py")]
    lines = {p: p.read_text().splitlines() for p in files}
    for limit in (110, 120):
        over = sum(len(line) > limit for text in lines.values() for line in text)
        in_ftune = sum(len(line) > limit for p, text in lines.items() if "tests" not in p.parts for line in text)
        print(f"lines over {limit}: {over} in ftune/ + tests/, {in_ftune} in ftune/")
    big = sorted(((len(text), str(p.relative_to(root))) for p, text in lines.items() if len(text) > 400), reverse=True)
    print("files over 400 lines:", big)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
