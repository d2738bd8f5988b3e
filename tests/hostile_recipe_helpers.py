"""The hostile YAML texts the recipe-reader tests share (tests/test_hostile_recipe*.py): alias chains (billion
laughs, in block, flow and mapping form), deep block nesting and wide flow mappings."""

from __future__ import annotations


def _laughs(levels: int = 9, width: int = 9) -> str:
    """Billion laughs as block YAML: `a0: &a0 [x, ...]`, each next level `width` aliases of the one before."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _laughs_flow(levels: int = 9, width: int = 9) -> str:
    """The same chain as one flow value (for --set): a list whose items each hold the level before."""
    items = [f"&a0 [{', '.join(['lol'] * width)}]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def _laughs_mappings(levels: int = 9, width: int = 9) -> str:
    lines = [f"m0: &m0 {{{', '.join(f'k{j}: lol' for j in range(width))}}}"]
    lines += [f"m{i}: &m{i} {{{', '.join(f'k{j}: *m{i - 1}' for j in range(width))}}}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _deep_block(levels: int) -> str:
    return "".join("  " * i + "a:\n" for i in range(levels)) + "  " * levels + "1\n"


def _flow_mapping(entries: int) -> str:
    return "{" + ", ".join(f"k{i}: {i}" for i in range(entries)) + "}"
