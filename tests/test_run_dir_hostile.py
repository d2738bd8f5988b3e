"""Run directories under attack (issue 22), class hostile: a run someone else handed over is read as data only, by
eval, predict, merge, export, plot and train --resume/--overwrite. No code from it runs (remote code, a tokenizer's
own code, pickles: a payload would write MARKER), nothing outside it is read or written (symbolic links), no size it
claims is believed (safetensors headers, run.json), and none of its files can hang a reader (a FIFO, /dev/zero).
HOSTILE lists each tamper with the commands that read what it tampers with; every pair is a case. Also: code in a run
never runs even with --trust-remote-code, and the payloads are not vacuous (they do run where trusted or unpickled).

Each catalogue case ends in one stderr line holding the named needles, its exit code, no traceback, and every file
involved byte-identical afterwards (tests/run_dir_helpers.py, tests/refusals.py); tests/test_run_dir_safety.py holds
the overview and the least number of cases per class.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

import run_dir_helpers
from conftest import write_recipe
from refusals import invoke
from run_dir_helpers import (
    MARKER,
    Case,
    Env,
    _command,
    _copy,
    _file_link,
    _link,
    _outside,
    _record,
    _special,
)

env, finished_run = run_dir_helpers.env, run_dir_helpers.finished_run  # the fixtures, where pytest finds them


def _recipe_of(run: Path, **model) -> Path:
    doc = yaml.safe_load((run / "recipe.yaml").read_text())
    doc["model"] |= model
    write_recipe(run / "recipe.yaml", doc)
    return run


def _evil_model(env: Env, folder: Path) -> Path:
    """The tiny BERT with an `auto_map` naming code in its folder; importing that code writes MARKER."""
    shutil.copytree(env.bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"open({str(env.tmp / MARKER)!r}, 'w').write('remote code ran')\n"
        "from transformers import BertConfig as EvilConfig\n"
        "from transformers import BertForSequenceClassification as EvilModel\n"
    )
    return folder


def _evil_tokenizer(env: Env, run: Path) -> Path:
    """The run's tokenizer/ names a tokenizer class in code it ships beside it; importing that writes MARKER."""
    folder = run / "tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config |= {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil_tok.py").write_text(
        f"open({str(env.tmp / MARKER)!r}, 'w').write('run code ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    return run


class _Payload:
    """Unpickling this makes a folder MARKER: proof that a file was unpickled as objects."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _remote_code(env: Env, *, inside: bool = False) -> Path:
    """A run whose recipe says model.trust_remote_code: true, its base a folder with code (outside it, or inside)."""
    copy = _copy(env)
    model = _evil_model(env, copy / "model" if inside else env.tmp / "evil-model")
    _recipe_of(copy, name=str(model), trust_remote_code=True)
    return _record(copy, model_source=str(model))


def _record_model_inside(env: Env, via_link: bool = False) -> Path:
    """A plain run whose record says its base model was a folder inside the run (directly, or by a link to it)."""
    copy = _copy(env)
    shutil.copytree(env.bert, copy / "model")
    where = copy / "model"
    if via_link:
        where = env.tmp / "model-link"
        where.symlink_to(copy / "model")
    return _record(copy, model_source=str(where))


def _weights_link(env: Env) -> Path:
    copy = _copy(env)
    _link(copy / "method.safetensors", _outside(env, copy / "method.safetensors"))
    return copy


def _tokenizer_file_link(env: Env) -> Path:
    copy = _copy(env)
    _link(copy / "tokenizer" / "tokenizer.json", _outside(env, copy / "tokenizer" / "tokenizer.json"))
    return copy


def _tokenizer_folder_link(env: Env) -> Path:
    copy = _copy(env)
    _link(copy / "tokenizer", _outside(env, copy / "tokenizer"))
    return copy


def _header(env: Env, claimed: int, size: int | None = None, where: str = "method.safetensors") -> Path:
    """method.safetensors (or `where`) whose first 8 bytes claim a `claimed`-byte header; `size`: a sparse file of
    that size, so the claim fits the file."""
    copy = _copy(env)
    path = copy / where
    raw = path.read_bytes()
    with open(path, "wb") as f:
        f.write(claimed.to_bytes(8, "little") + raw[8:])
        if size:
            f.truncate(size)
    return copy


def _record_text(env: Env, text: str) -> Path:
    copy = _copy(env)
    (copy / "run.json").write_text(text)
    return copy


def _pickled_optimizer(env: Env) -> Path:
    copy = _copy(env)
    torch.save(
        {"optimizer": {}, "scheduler": {}, "rng": [], "payload": _Payload(env.tmp / MARKER)},
        copy / "checkpoints" / "step-00000002" / "optimizer.pt",
    )
    return copy


def _checkpoint_tamper(env: Env, make: Callable[[Env, Path], object]) -> Path:
    copy = _copy(env)
    make(env, copy / "checkpoints" / "step-00000002")
    return copy


STEP = "checkpoints/step-00000002"


# hostile runs, each tamper under the commands that read what it tampers with
RUN_READERS = ("eval", "predict", "merge", "export")
HOSTILE: dict[str, tuple[Callable[[Env], Path], tuple[str, ...], list[str]]] = {
    # remote code: a run never enables it; with the flag, never code inside the run
    "remote-code": (_remote_code, RUN_READERS, ["trust_remote_code: true", "--trust-remote-code"]),
    "remote-code-model-inside-run": (lambda e: _remote_code(e, inside=True), ("eval",), ["--trust-remote-code"]),
    "tokenizer-code-in-run": (
        lambda e: _evil_tokenizer(e, _copy(e)),
        ("eval", "predict"),
        ["tokenizer", "custom code"],
    ),
    "record-model-inside-run": (_record_model_inside, RUN_READERS, ["copy/model", "lies inside the run directory"]),
    "record-model-linked-into-run": (
        lambda e: _record_model_inside(e, via_link=True),
        ("eval", "merge"),
        ["model-link", "lies inside the run directory"],
    ),
    # links out of the run
    "weights-link-out": (_weights_link, RUN_READERS, ["method.safetensors", "links out of the run directory"]),
    "tokenizer-file-link-out": (_tokenizer_file_link, RUN_READERS, ["tokenizer.json", "links out"]),
    "tokenizer-folder-link-out": (_tokenizer_folder_link, ("eval", "merge"), ["copy/tokenizer", "links out"]),
    "recipe-link-out": (lambda e: _file_link(e, "recipe.yaml"), ("eval", "export"), ["recipe.yaml", "links out"]),
    "record-link-out": (
        lambda e: _file_link(e, "run.json"),
        ("eval", "plot", "overwrite", "resume"),
        ["run.json", "links out"],
    ),
    "log-link-out": (lambda e: _file_link(e, "metrics.jsonl"), ("plot",), ["metrics.jsonl", "links out"]),
    # safetensors headers that claim more than is believed
    "weights-header-2^40": (lambda e: _header(e, 2**40), RUN_READERS, ["method.safetensors", "header claims"]),
    "weights-header-50mb": (
        lambda e: _header(e, 50 << 20, size=60 << 20),
        ("eval", "merge"),
        ["method.safetensors", "header claims 52,428,800 bytes"],
    ),
    "weights-header-past-end": (lambda e: _header(e, 1 << 20), ("eval",), ["method.safetensors", "header claims"]),
    # run.json: huge, deep, not ftune's
    "record-huge": (
        lambda e: _record_text(e, " " * (17 << 20) + "{}"),
        ("eval", "plot", "overwrite"),
        ["run.json", "more than the 16,777,216"],
    ),
    "record-deep": (
        lambda e: _record_text(e, "[" * 100_000 + "]" * 100_000),
        ("eval", "plot", "overwrite"),
        ["run.json", "cannot be read", "RecursionError"],
    ),
    "record-foreign": (
        lambda e: _record_text(e, json.dumps({"versions": {"other": "1"}, "seed": 0})),
        ("eval", "plot", "overwrite", "resume"),
        ["run.json", "not an ftune run record"],
    ),
    "record-a-list": (
        lambda e: _record_text(e, "[1, 2]"),
        ("eval", "overwrite"),
        ["run.json", "not an ftune run record"],
    ),
    # files that would hang or flood a reader
    "record-fifo": (
        lambda e: _special(e, "run.json", "fifo"),
        ("plot", "overwrite", "resume"),
        ["run.json", "a named pipe"],
    ),
    "record-dev-zero": (lambda e: _special(e, "run.json", "zero"), ("plot", "overwrite"), ["run.json", "/dev/zero"]),
    "log-fifo": (lambda e: _special(e, "metrics.jsonl", "fifo"), ("plot",), ["metrics.jsonl", "a named pipe"]),
    "log-dev-zero": (lambda e: _special(e, "metrics.jsonl", "zero"), ("plot",), ["metrics.jsonl", "/dev/zero"]),
    "log-sparse-300mb": (
        lambda e: _special(e, "metrics.jsonl", "sparse"),
        ("plot",),
        ["metrics.jsonl", "more than the 268,435,456"],
    ),
    "tokenizer-fifo": (
        lambda e: _special(e, "tokenizer/tokenizer.json", "fifo"),
        ("eval", "predict"),
        ["tokenizer.json", "a named pipe"],
    ),
    "weights-fifo": (
        lambda e: _special(e, "method.safetensors", "fifo"),
        ("eval",),
        ["method.safetensors", "not a finished ftune run"],
    ),
    # --resume from a tampered checkpoint: refused before anything is written, nothing unpickled
    "checkpoint-pickle": (_pickled_optimizer, ("resume",), ["optimizer.pt", "weights_only", "never unpickled"]),
    "checkpoint-optimizer-dev-zero": (
        lambda e: _checkpoint_tamper(e, lambda e, c: _link(c / "optimizer.pt", "/dev/zero")),
        ("resume",),
        ["optimizer.pt", "symbolic link", "/dev/zero"],
    ),
    "checkpoint-garbage-optimizer": (
        lambda e: _checkpoint_tamper(e, lambda e, c: (c / "optimizer.pt").write_bytes(os.urandom(4096))),
        ("resume",),
        ["optimizer.pt", "not optimizer state ftune wrote"],
    ),
    "checkpoint-link-out": (
        lambda e: _checkpoint_tamper(e, lambda e, c: _link(c, _outside(e, c))),
        ("resume",),
        ["step-00000002", "symbolic link", "outside"],
    ),
    "checkpoints-folder-link-out": (
        lambda e: _file_link(e, "checkpoints"),
        ("resume",),
        ["copy/checkpoints is a symbolic link"],
    ),
    "checkpoint-state-garbage": (
        lambda e: _checkpoint_tamper(e, lambda e, c: (c / "state.json").write_text("{")),
        ("resume",),
        ["state.json", "cannot be read"],
    ),
    "checkpoint-weights-header-2^40": (
        lambda e: _header(e, 2**40, where=f"{STEP}/method.safetensors"),
        ("resume",),
        ["step-00000002/method.safetensors", "header claims"],
    ),
    "checkpoint-weights-link-out": (
        lambda e: _checkpoint_tamper(
            e, lambda e, c: _link(c / "method.safetensors", _outside(e, c / "method.safetensors"))
        ),
        ("resume",),
        ["method.safetensors", "symbolic link"],
    ),
    "resume-log-fifo": (
        lambda e: _special(e, "metrics.jsonl", "fifo"),
        ("resume",),
        ["--resume", "metrics.jsonl", "not a regular file"],
    ),
    "resume-log-link-out": (
        lambda e: _file_link(e, "metrics.jsonl"),
        ("resume",),
        ["--resume", "metrics.jsonl", "symbolic link"],
    ),
}
CASES: dict[str, Case] = {}
for _name, (_tamper, _commands, _needles) in HOSTILE.items():
    for _command_name in _commands:
        CASES[f"{_name}-{_command_name}"] = (
            "hostile",
            lambda e, t=_tamper, c=_command_name: _command(e, t(e), c),
            1,
            _needles,
        )
CASES["remote-code-model-inside-run-trusted"] = (
    "hostile",
    lambda e: [*_command(e, _remote_code(e, inside=True), "eval"), "--trust-remote-code"],
    1,
    ["copy/model", "lies inside the run directory"],
)
CASES["remote-code-model-inside-run-trusted-merge"] = (
    "hostile",
    lambda e: [*_command(e, _remote_code(e, inside=True), "merge"), "--trust-remote-code"],
    1,
    ["copy/model", "lies inside the run directory"],
)


@pytest.mark.parametrize("case", list(CASES))
def test_run_dir_refusal(case, env, monkeypatch):
    run_dir_helpers.refused(CASES[case], env, monkeypatch)


def test_remote_code_in_the_run_never_runs_even_with_the_flag(env):
    """--trust-remote-code consents to the base model's code, never to code shipped inside a run: a run trained
    with trust_remote_code whose tokenizer/ names code of its own loads its tokenizer from the base model instead."""
    copy = _evil_tokenizer(env, _recipe_of(_copy(env), trust_remote_code=True))
    result = invoke(["eval", copy, "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert not (env.tmp / MARKER).exists(), "code from the run's tokenizer/ ran"
    assert json.loads(result.stdout)["examples"] == 16


def test_the_payloads_would_run(env):
    """The catalogue's markers are not vacuous: transformers runs the planted code when told to trust it, and an
    ordinary torch.load unpickles the planted object. (A subprocess: its module cache is its own.)"""
    model = _evil_model(env, env.tmp / "evil-model")
    tokenizer = _evil_tokenizer(env, _copy(env, "tokenizer-copy")) / "tokenizer"
    check = (
        "import sys, os\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert os.path.exists(sys.argv[3]); os.remove(sys.argv[3])\n"
        "AutoTokenizer.from_pretrained(sys.argv[2], trust_remote_code=True)\n"
        "assert os.path.exists(sys.argv[3])\n"
    )
    environ = os.environ | {"HF_HOME": str(env.tmp / "hf"), "HF_MODULES_CACHE": str(env.tmp / "hf" / "modules")}
    done = subprocess.run(
        [sys.executable, "-c", check, str(model), str(tokenizer), str(env.tmp / MARKER)],
        check=False,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (env.tmp / MARKER).unlink()

    copy = _pickled_optimizer(env)
    torch.load(copy / STEP / "optimizer.pt", weights_only=False)
    assert (env.tmp / MARKER).is_dir()
