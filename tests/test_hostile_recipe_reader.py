"""The recipe reader itself on hostile input (issue 22), ftune/recipe_yaml.py: alias chains, merge keys, duplicate
keys, deep nesting, huge values and files are each refused in one line naming the file and line, whether PyYAML uses
libyaml or not; `--set` values go through the same reader; wrong types are explained in a short line. And the cost:
every hostile recipe is refused by `ftune validate` in little time and memory, measured in a process of its own.

The same inputs through the CLI, with its checks: tests/test_hostile_recipe.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import recipe_doc, write_recipe
from ftune import recipe_yaml
from ftune.errors import RecipeError
from ftune.recipe import load_recipe, validate_recipe
from ftune.recipe_errors import shown
from hostile_recipe_helpers import _deep_block, _flow_mapping, _laughs, _laughs_flow, _laughs_mappings
from refusals import snapshot as _snapshot

# --- the reader itself ----------------------------------------------------------------------------------------------

# text: (needles of the one-line message)
REFUSED = {
    "laughs": (_laughs(), ["line 5", "more than 20,000 values"]),
    "laughs-mappings": (_laughs_mappings(), ["more than 20,000 values"]),
    "laughs-wide": (_laughs(levels=3, width=200), ["line 2", "more than 20,000 values"]),
    "alias-in-own-anchor": ("&a [*a]\n", ["line 1", "alias *a", "inside its own anchor"]),
    "alias-in-own-mapping": ("model: &m {name: *m}\n", ["alias *m", "inside its own anchor"]),
    "alias-undefined": ("train: {lr: *nope}\n", ["line 1", "undefined alias"]),
    "merge-key": ("base: &b {lr: 1}\ntrain:\n  <<: *b\n  seed: 2\n", ["line 3", "merge keys (<<)"]),
    "merge-list": ("a: &a {x: 1}\nb: &b {y: 1}\nc: {<<: [*a, *b]}\n", ["line 3", "merge keys"]),
    "duplicate-section": (
        "train: {lr: 1}\nmodel: {name: m}\ntrain: {seed: 2}\n",
        ["line 3", "duplicate key 'train'", "first at line 1"],
    ),
    "duplicate-nested": ("train:\n  lr: 1\n  seed: 0\n  lr: 2\n", ["line 4", "duplicate key 'lr'", "first at line 2"]),
    "duplicate-flow": ("method: {name: lora, r: 4, r: 8}\n", ["line 1", "duplicate key 'r'"]),
    "duplicate-in-list": (
        "data:\n  train:\n    - {hub: x, split: a}\n    - hub: y\n      split: b\n      hub: z\n",
        ["line 6", "duplicate key 'hub'", "first at line 4"],
    ),
    "duplicate-equal-values": ("1: a\ntrue: b\n", ["line 2", "duplicate key True", "first at line 1"]),
    "duplicate-quoted": ("lr: 1\n'lr': 2\n", ["line 2", "duplicate key 'lr'"]),
    "deep-flow": ("train: {lr: " + "[" * 5000 + "]" * 5000 + "}\n", ["line 1"]),
    "deep-flow-100": ("x: " + "[" * 100 + "]" * 100 + "\n", ["line 1", "deeper than 64 levels"]),
    "deep-block": (_deep_block(100), ["deeper than 64 levels"]),
    "deep-through-aliases": (
        "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n",
        ["line 2", "deeper than 64 levels"],
    ),
    "huge-flow-mapping": ("train: " + _flow_mapping(60_000) + "\n", ["line 1", "more than 20,000 values"]),
    "nul-character": ("train:\n  lr: 1\x00\n", ["line 2", "not valid YAML"]),
    "python-tag": ("x: !!python/object/apply:os.system [echo]\n", ["line 1", "not valid YAML"]),
}


@pytest.mark.parametrize("libyaml", [True, False], ids=["libyaml", "pure-python"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_the_reader_refuses(case, libyaml, monkeypatch):
    text, needles = REFUSED[case]
    if not libyaml:
        monkeypatch.setattr(yaml, "__with_libyaml__", False)
    with pytest.raises(RecipeError) as refused:
        recipe_yaml.parse(text, "r.yaml")
    message = str(refused.value)
    assert message.startswith("r.yaml") and "\n" not in message and len(message) < 300, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_aliases_within_the_bounds_are_read():
    doc = recipe_yaml.parse("v: &v [a.tsv, {hub: h, split: s}]\ndata: {train: *v, validation: *v}\n", "r.yaml")
    assert doc["data"]["train"] == doc["data"]["validation"] == ["a.tsv", {"hub": "h", "split": "s"}]
    assert recipe_yaml.parse(_laughs(levels=4, width=9), "r.yaml")["a3"][0][0][0][0] == "lol"  # 9**4 = 6,561 values
    assert recipe_yaml.parse("'<<': 1\n", "r.yaml") == {"<<": 1}  # a quoted << is an ordinary key


def test_the_size_limit(tmp_path):
    path = tmp_path / "recipe.yaml"
    body = "train: {lr: 0.1}\n"
    path.write_text(body + "#" * (recipe_yaml.MAX_BYTES - len(body) - 1) + "\n")
    assert recipe_yaml.parse(recipe_yaml.read_text(path), str(path)) == {"train": {"lr": 0.1}}  # at the limit
    path.write_text(body + "#" * recipe_yaml.MAX_BYTES + "\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml: larger than 1 MiB"):
        recipe_yaml.read_text(path)


def test_set_values_go_through_the_reader(tmp_path):
    path = write_recipe(
        tmp_path / "r.yaml",
        {
            "model": {"name": "m"},
            "task": "sequence_classification",
            "data": {"train": "t.tsv"},
            "method": {"name": "lora"},
            "output_dir": str(tmp_path / "out"),
        },
    )
    for value, needle in [
        (_laughs_flow(), "more than 20,000 values"),
        ("{name: lora, name: full}", "duplicate key"),
        ("&a [*a]", "inside its own anchor"),
        ("[" * 200 + "]" * 200, "deeper than 64"),
        ("{<<: {r: 4}}", "merge keys"),
    ]:
        with pytest.raises(RecipeError) as refused:
            load_recipe(path, [f"method={value}"])
        message = str(refused.value)
        assert message.startswith("--set method (value ") and needle in message and len(message) < 300, message


def test_wrong_types_are_explained_in_short(tmp_path):
    base = {
        "model": {"name": "m"},
        "task": "sequence_classification",
        "data": {"train": "t.tsv"},
        "method": {"name": "lora"},
        "output_dir": "runs/x",
    }
    nested: list = []
    deepest = nested
    for _ in range(5000):  # deeper than Python's recursion: only the shown part is walked
        deepest.append([])
        deepest = deepest[0]
    for section, value, needle in [
        ("train", {"lr": list(range(10_000))}, "[0, 1, 2, 3, 4, 5, ...]"),
        ("train", {"lr": "x" * 500_000}, "train.lr"),
        ("train", {"lr": nested}, "[[[[...]]]]"),
        ("train", {"k" * 500_000: 1}, "unknown key"),
        ("method", {"name": "y" * 500_000}, "unknown method"),
        ("method", {"name": list(range(10_000))}, "unknown method '[0, 1, 2"),
        ("output_dir", "/" + "../" * 200_000, "longer than any usable path"),
    ]:
        with pytest.raises(RecipeError) as refused:
            validate_recipe(base | {section: value})
        assert needle in str(refused.value) and len(str(refused.value)) < 300, str(refused.value)[:500]
    assert shown(b"\x00" * 10**6).endswith("...") and len(shown({i: [i] * 10**4 for i in range(10**4)})) <= 80


# --- time and memory, measured in a process of its own --------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import contextlib, io, json, resource, sys, time, tracemalloc
    from ftune.cli import app

    def validate(path):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:  # without standalone_mode, click returns the code of a typer.Exit
                return app(["validate", path], standalone_mode=False) or 0, stderr.getvalue()
            except SystemExit as e:
                return e.code, stderr.getvalue()

    validate("absent.yaml")  # the modules the command imports: neither timed nor counted
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    before, results = rss(), []
    for path in sys.argv[1:]:
        start = time.perf_counter()
        code, stderr = validate(path)
        seconds = time.perf_counter() - start
        tracemalloc.start()  # a second time, traced: the peak of Python's allocations
        validate(path)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        results.append({"path": path, "seconds": seconds, "peak_mib": peak, "code": code, "stderr": stderr})
    print(json.dumps({"grown_mib": rss() - before, "results": results}))
""")


def _hostile_files(folder: Path, valid: str) -> list[Path]:
    texts = {
        "laughs": valid + _laughs(),
        "laughs-mappings": valid + _laughs_mappings(),
        "deep-flow": valid.replace("lr: 0.01", "lr: " + "[" * 5000 + "]" * 5000),
        "deep-block": valid + "train2:\n" + textwrap.indent(_deep_block(500), "  "),
        "huge-flow-mapping": valid.replace("train:\n", "train: " + _flow_mapping(60_000) + "\nunused:\n"),
        "flow-mapping-in-bounds": valid.replace("train:\n", "train: " + _flow_mapping(9_000) + "\nunused:\n"),
        "duplicate-keys": valid + "".join(f"lr: {i}\n" for i in range(8_000)),
        "list-10k-wrong-type": valid.replace("lr: 0.01", "lr: [" + ", ".join(map(str, range(10_000))) + "]"),
        "string-900k-wrong-type": valid.replace("lr: 0.01", "lr: " + "x" * 900_000),
    }
    paths = []
    for name, text in texts.items():
        assert len(text.encode()) <= recipe_yaml.MAX_BYTES, name
        (path := folder / f"{name}.yaml").write_text(text)
        paths.append(path)
    return paths


def test_hostile_recipes_cost_little_time_and_memory(tiny_bert, cls_data, tmp_path):
    valid = yaml.safe_dump(recipe_doc("cls", tiny_bert, cls_data, tmp_path / "out"), sort_keys=False)
    paths = _hostile_files(tmp_path, valid)
    before = _snapshot(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for result in report["results"]:
        name, lines = Path(result["path"]).name, result["stderr"].strip().splitlines()
        assert result["code"] == 2 and len(lines) == 1 and "Traceback" not in result["stderr"], result
        assert name in lines[0] and len(lines[0]) < 400, lines[0][:500]
        assert result["seconds"] < 1.0 and result["peak_mib"] < 100, (name, result["seconds"], result["peak_mib"])
    assert report["grown_mib"] < 100, report["grown_mib"]  # the process's high-water mark, over every case
    assert _snapshot(tmp_path) == before
