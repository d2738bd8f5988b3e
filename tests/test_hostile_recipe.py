"""The recipe reader on hostile input (issue 22): alias chains, duplicate keys, deep nesting, huge values and files
are each refused in one line naming the file and line (or explained in a short line), in little time and memory;
and `~` in a path is the home directory wherever a recipe or a command names one.

Catalogue cases (HOSTILE) run through the CLI with the checks of tests/test_bad_inputs.py: exit code, one stderr line
holding the needles, no traceback, nothing on disk changed. HOME is a folder of the test's own throughout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import recipe_doc, write_recipe
from ftune import recipe_yaml
from ftune.cli import app
from ftune.errors import RecipeError
from ftune.recipe import load_recipe, validate_recipe
from ftune.recipe_errors import shown
from refusals import runner
from refusals import snapshot as _snapshot


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


# --- the catalogue: through the CLI ---------------------------------------------------------------------------------


@dataclass
class Env:
    tmp: Path
    home: Path  # $HOME during the case
    valid: str  # a complete recipe (tiny BERT, classification data) as YAML text: it would train

    def recipe(self, text: str, name: str = "recipe.yaml") -> Path:
        (path := self.tmp / name).write_text(text)
        return path

    def train(self, text: str, *extra: str) -> list:
        return ["train", self.recipe(text), *extra]

    def needles(self, needles: list[str]) -> list[str]:
        """`needles` with {home} and the valid recipe's 1-based lines filled in: {train} (the section), {lr},
        {lr_next} (the line after it), {next} (the first line after the recipe)."""
        line = {
            k: next(i for i, s in enumerate(self.valid.splitlines(), 1) if s.startswith(start))
            for k, start in (("train", "train:"), ("lr", "  lr:"))
        }
        return [
            n.format(home=self.home, lr_next=line["lr"] + 1, next=len(self.valid.splitlines()) + 1, **line)
            for n in needles
        ]


def _set(env: Env, key: str, value: str) -> list:
    return ["validate", env.recipe(env.valid), "--set", f"{key}={value}"]


def _in_home(env: Env, name: str, text: str = "mine\n") -> Path:
    path = env.home / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _dir_in_home(env: Env, name: str) -> str:
    (env.home / name).mkdir(parents=True)
    _in_home(env, f"{name}/keep.txt")
    return f"~/{name}"


# id: (arguments built from Env, exit code, substrings the one stderr line must hold)
HOSTILE: dict[str, tuple[Callable[[Env], list], int, list[str]]] = {
    # aliases
    "alias-billion-laughs": (lambda e: e.train(e.valid + _laughs()), 2, ["recipe.yaml line", "more than 20,000"]),
    "alias-laughs-mappings": (lambda e: e.train(e.valid + _laughs_mappings()), 2, ["recipe.yaml", "20,000 values"]),
    "alias-laughs-by-set": (lambda e: _set(e, "train.lr", _laughs_flow()), 2, ["--set train.lr", "20,000 values"]),
    "alias-in-own-anchor": (lambda e: e.train(e.valid + "extra: &x {a: *x}\n"), 2, ["recipe.yaml line", "*x"]),
    "alias-merge-key": (
        lambda e: e.train(e.valid + "base: &b {seed: 1}\nmore:\n  <<: *b\n"),
        2,
        ["recipe.yaml line", "merge keys (<<)"],
    ),
    "alias-undefined": (
        lambda e: e.train(e.valid.replace("lr: 0.01", "lr: *rate")),
        2,
        ["recipe.yaml line", "undefined alias"],
    ),
    # duplicate keys
    "duplicate-train-section": (
        lambda e: e.train(e.valid + "train:\n  lr: 0.5\n"),
        2,
        ["line {next}:", "'train'", "first at line {train})"],
    ),
    "duplicate-lr": (
        lambda e: e.train(e.valid.replace("  lr: 0.01\n", "  lr: 0.01\n  lr: 0.5\n")),
        2,
        ["line {lr_next}:", "duplicate key 'lr'", "first at line {lr})"],
    ),
    "duplicate-model-name": (
        lambda e: e.train(e.valid.replace("model:\n", "model:\n  name: other\n")),
        2,
        ["recipe.yaml line", "duplicate key 'name'"],
    ),
    "duplicate-by-set": (lambda e: _set(e, "method", "{name: lora, r: 4, r: 8}"), 2, ["--set method", "'r'"]),
    # nesting
    "nesting-flow": (
        lambda e: e.train(e.valid.replace("lr: 0.01", "lr: " + "[" * 5000 + "]" * 5000)),
        2,
        ["recipe.yaml line {lr}:"],
    ),
    "nesting-block": (
        lambda e: e.train(e.valid + "x:\n" + textwrap.indent(_deep_block(80), "  ")),
        2,
        ["recipe.yaml line", "deeper than 64"],
    ),
    "nesting-through-aliases": (
        lambda e: e.train(e.valid + "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n"),
        2,
        ["recipe.yaml line", "deeper than 64"],
    ),
    "nesting-by-set": (lambda e: _set(e, "train.lr", "[" * 100 + "]" * 100), 2, ["--set train.lr", "deeper than 64"]),
    # size
    "size-over-the-limit": (
        lambda e: e.train(e.valid + "#" * (1 << 20) + "\n"),
        2,
        ["recipe.yaml", "larger than 1 MiB"],
    ),
    "size-huge-flow-mapping": (
        lambda e: e.train(e.valid + "extra: " + _flow_mapping(60_000) + "\n"),
        2,
        ["recipe.yaml line", "more than 20,000 values"],
    ),
    "size-10k-list-wrong-type": (
        lambda e: e.train(e.valid.replace("lr: 0.01", f"lr: {list(range(10_000))}")),
        2,
        ["train.lr", "[0, 1, 2, 3, 4, 5, ...]"],
    ),
    "size-long-string-wrong-type": (
        lambda e: e.train(e.valid.replace("lr: 0.01", "lr: " + "x" * 500_000)),
        2,
        ["train.lr", "xxx...xxx"],
    ),
    "size-long-output-dir": (lambda e: _set(e, "output_dir", "runs/" + "a/" * 5000), 2, ["output_dir", "10,005"]),
    # ~ paths
    "tilde-output-dir-is-home": (lambda e: _set(e, "output_dir", "'~'"), 2, ["output_dir", "your home directory"]),
    "tilde-output-dir-is-home-slash": (lambda e: _set(e, "output_dir", "~/."), 2, ["your home directory"]),
    "tilde-recipe-missing": (lambda e: ["train", "~/nope.yaml"], 2, ["{home}/nope.yaml", "no such recipe"]),
    "tilde-output-dir-not-a-run": (
        lambda e: e.train(e.valid.replace(str(e.tmp / "out"), _dir_in_home(e, "taken"))),
        1,
        ["output_dir", "{home}/taken", "not an ftune run"],
    ),
    "tilde-data-missing": (lambda e: e.train(e.valid.replace(f"{e.tmp}/cls", "~/absent")), 1, ["data.train", "absent"]),
    "tilde-eval-data-missing": (
        lambda e: ["eval", "~/run", "--data", "~/absent.jsonl"],
        1,
        ["--data", "{home}/absent.jsonl"],
    ),
    "tilde-predict-input-missing": (
        lambda e: ["predict", "~/run", "--input", "~/rows.jsonl"],
        1,
        ["--input", "{home}/rows.jsonl"],
    ),
    "tilde-merge-into-non-empty": (
        lambda e: ["merge", "~/run", _dir_in_home(e, "merged")],
        1,
        ["{home}/merged", "not empty"],
    ),
    "tilde-export-onto-a-file": (
        lambda e: ["export", "~/run", "~/" + _in_home(e, "out.txt").name],
        1,
        ["{home}/out.txt", "not a directory"],
    ),
}


def test_the_hostile_catalogue_is_large():
    assert len(HOSTILE) >= 25


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input(case, tiny_bert, cls_data, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # a path written relative (a folder named `~`) lands under the snapshot
    data = shutil.copytree(cls_data, tmp_path / "cls")
    valid = yaml.safe_dump(recipe_doc("cls", tiny_bert, data, tmp_path / "out"), sort_keys=False)
    build, code, needles = HOSTILE[case]
    env = Env(tmp_path, home, valid)
    args = [str(a) for a in build(env)]
    before = _snapshot(tmp_path, tiny_bert)

    result = runner.invoke(app, args)

    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert result.exit_code == code, result.output[:2000]
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[:2000]
    assert len(lines[0]) < 400, lines[0][:500]
    for needle in env.needles(needles):
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _snapshot(tmp_path, tiny_bert) == before  # nothing written, nothing overwritten


# --- `~` is the home directory --------------------------------------------------------------------------------------


def test_output_dir_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    doc = {
        "model": {"name": "m"},
        "task": "sequence_classification",
        "data": {"train": "t.tsv"},
        "method": {"name": "lora"},
    }
    assert validate_recipe(doc | {"output_dir": "~/runs/x"}).output_dir == str(tmp_path / "runs" / "x")
    assert validate_recipe(doc | {"output_dir": "runs//x/"}).output_dir == "runs//x/"  # otherwise as written
    with pytest.raises(RecipeError, match=r"^recipe: output_dir: is not a usable path \(RuntimeError\)$"):
        validate_recipe(doc | {"output_dir": "~no-such-user-here/x"})


def test_tilde_is_home_everywhere(tiny_bert, cls_data, tmp_path, monkeypatch):
    """`~/...` in a recipe (model, data, output_dir, a teacher) and in the commands' paths is $HOME/...: every file
    lands under HOME, none in a folder named `~`."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_bert, home / "models" / "bert")
    shutil.copytree(cls_data, home / "data")
    doc = recipe_doc("cls", Path("~/models/bert"), Path("~/data"), Path("~/runs/teacher"), max_steps=1)
    write_recipe(home / "teacher.yaml", doc)
    write_recipe(
        home / "student.yaml",
        doc | {"objective": {"name": "distill", "teacher": "~/runs/teacher"}, "output_dir": "~/runs/student"},
    )
    (home / "rows.jsonl").write_text('{"sentence": "a good movie"}\n')
    for args in (
        ["train", "~/teacher.yaml"],
        ["train", "~/student.yaml"],
        ["eval", "~/runs/teacher", "--data", "~/data/validation.tsv"],
        ["predict", "~/runs/teacher", "--input", "~/rows.jsonl", "--output", "~/predictions.jsonl"],
        ["merge", "~/runs/teacher", "~/merged"],
        ["export", "~/runs/teacher", "~/peft", "--format", "peft"],
        ["plot", "~/runs/teacher", "--out", "~/loss.png"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output[-3000:])
    for written in (
        "runs/teacher/recipe.yaml",
        "runs/student/recipe.yaml",
        "predictions.jsonl",
        "merged/config.json",
        "peft/adapter_config.json",
        "loss.png",
    ):
        assert (home / written).is_file(), written
    assert not [p for p in tmp_path.rglob("~*")], "a folder named ~"
    stored = yaml.safe_load((home / "runs" / "teacher" / "recipe.yaml").read_text())
    assert stored["output_dir"] == str(home / "runs" / "teacher")
