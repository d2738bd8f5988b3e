"""Distillation's teacher (ftune/objectives/teacher.py): the per-row logits cache (filled once, reused without building
the teacher, invalidated when the teacher or the data change), a classification teacher with its own tokenizer, and
the bad inputs (one line, nothing written)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_distill import _student, _train, runner, teacher_run

from conftest import WORDS, recipe_doc, write_recipe
from ftune import assemble
from ftune.cli import app
from ftune.data.loader import collate
from ftune.objectives import distill
from ftune.objectives import teacher as teachers
from ftune.recipe import validate_recipe
from ftune.tasks import TASKS


@pytest.fixture(scope="module")
def cls_teacher(tiny_bert, cls_data, tmp_path_factory) -> Path:
    return teacher_run("cls", tiny_bert, cls_data, tmp_path_factory.mktemp("teacher-cls"))


@pytest.fixture(scope="module")
def sft_teacher(tiny_llama, sft_data, tmp_path_factory) -> Path:
    return teacher_run("sft", tiny_llama, sft_data, tmp_path_factory.mktemp("teacher-sft"))


# --- the per-row cache ---------------------------------------------------------------------------------------------


def _count_teacher_rows(monkeypatch) -> dict:
    """Wrap the builder: every teacher it builds counts the rows it reads."""
    seen = {"built": 0, "rows": 0}
    build = assemble.build_extra_models

    def counting(recipe, needs, names=None):
        models = build(recipe, needs, names)
        for model in models.values():
            seen["built"] += 1
            model.register_forward_hook(
                lambda m, args, kwargs, out: seen.__setitem__("rows", seen["rows"] + len(kwargs["input_ids"])),
                with_kwargs=True,
            )
        return models

    monkeypatch.setattr(assemble, "build_extra_models", counting)
    return seen


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "method.safetensors"))


def test_teacher_cache_is_filled_once_and_reused(tiny_bert, cls_data, cls_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    objective = {"teacher": str(cls_teacher), "cache": True}
    steps = {"max_steps": 12}  # two epochs of the 48 rows at batch 8

    seen = _count_teacher_rows(monkeypatch)
    first = _train(_student("cls", tiny_bert, cls_data, tmp_path / "first", objective, **steps), tmp_path / "r1.yaml")
    assert first.exit_code == 0, first.output
    files = list((tmp_path / "cache" / "teacher_logits").glob("*.safetensors"))
    assert len(files) == 1 and load_file(str(files[0]))["logits"].shape == (48, 2)
    assert seen == {"built": 1, "rows": 48}  # each row once, though training read 96

    # the second run must not build (nor run) the teacher: building it now fails the run
    build = assemble.build_extra_models

    def no_teacher(recipe, needs, names=None):
        assert not needs, "the teacher was built"
        return build(recipe, needs, names)

    def no_run(*args, **kwargs):
        raise AssertionError("a run directory was loaded")

    monkeypatch.setattr(assemble, "build_extra_models", no_teacher)
    monkeypatch.setattr(assemble, "load_run", no_run)
    reads = []
    read = teachers.read_cache
    monkeypatch.setattr(teachers, "read_cache", lambda key, rows: reads.append(read(key, rows)) or reads[-1])
    stamp = files[0].stat().st_mtime_ns
    second = _train(_student("cls", tiny_bert, cls_data, tmp_path / "second", objective, **steps), tmp_path / "r2.yaml")
    assert second.exit_code == 0, second.output
    assert len(reads) == 1 and torch.equal(reads[0], load_file(str(files[0]))["logits"])
    assert files[0].stat().st_mtime_ns == stamp
    first_w, second_w = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    assert all(torch.equal(first_w[k], second_w[k]) for k in first_w)

    # without the cache the teacher runs on every batch (96 rows) and the student ends where it did
    monkeypatch.undo()
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    seen = _count_teacher_rows(monkeypatch)
    online = _train(
        _student("cls", tiny_bert, cls_data, tmp_path / "online", {"teacher": str(cls_teacher)}, **steps),
        tmp_path / "r3.yaml",
    )
    assert online.exit_code == 0, online.output
    assert seen == {"built": 1, "rows": 96}
    online_w = _weights(tmp_path / "online")
    assert all(torch.allclose(first_w[k], online_w[k], atol=1e-5) for k in first_w)


def test_teacher_cache_is_invalidated_by_other_data_or_another_teacher(
    tiny_bert, cls_data, cls_teacher, tmp_path, monkeypatch
):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "teacher"
    shutil.copytree(cls_teacher, teacher)
    objective = {"teacher": str(teacher), "cache": True}
    seen = _count_teacher_rows(monkeypatch)
    for i, (change, builds) in enumerate([(None, 1), (None, 1), ("data", 2), ("teacher", 3)]):
        if change == "teacher":  # the same run dir, its weights changed in place
            tensors = _weights(teacher)
            name = next(iter(tensors))
            tensors[name] = tensors[name] + 0.01
            save_file(tensors, str(teacher / "method.safetensors"), metadata={"format": "pt", "method": "full"})
        doc = _student("cls", tiny_bert, cls_data, tmp_path / f"run{i}", objective, max_steps=1)
        if change in ("data", "teacher"):
            doc["data"]["max_train_rows"] = 40
        result = _train(doc, tmp_path / f"r{i}.yaml")
        assert result.exit_code == 0, result.output
        assert seen["built"] == builds, (i, change)
    assert len(list((tmp_path / "cache" / "teacher_logits").glob("*.safetensors"))) == 3


# --- a classification teacher with its own tokenizer ---------------------------------------------------------------


def _bert_with_other_vocabulary(folder: Path) -> Path:
    """A tiny BERT whose word ids are in another order than conftest's: the same text, other token ids."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    folder.mkdir(parents=True)
    words = list(WORDS)
    random.Random(7).shuffle(words)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def test_a_teacher_with_its_own_tokenizer(tiny_bert, cls_data, tmp_path):
    other = _bert_with_other_vocabulary(tmp_path / "other-bert")
    teacher_doc = recipe_doc("cls", other, cls_data, tmp_path / "teacher", method={"name": "full"}, max_steps=3)
    assert _train(teacher_doc, tmp_path / "t.yaml").exit_code == 0
    doc = _student("cls", tiny_bert, cls_data, tmp_path / "student", {"teacher": str(tmp_path / "teacher")})
    recipe = validate_recipe(doc)
    _, tokenizer = assemble.source_and_tokenizer(recipe)
    rows = assemble.read_split(recipe, "train")
    names = assemble.label_names(recipe, rows)
    examples = assemble.encode_rows(recipe, rows, tokenizer, names).examples
    extra = assemble.build_extra_models(recipe, distill.extra_models(recipe.objective), names)
    data = assemble.training_data(recipe, rows, examples, tokenizer, names, torch.device("cpu"))
    fields = distill.prepare(recipe.objective, TASKS[recipe.task], data, extra)

    # the fields are the teacher's logits on its own token ids for the same rows
    _, teacher_model, teacher_tokenizer = assemble.load_run(tmp_path / "teacher")
    own = assemble.encode_rows(recipe, rows, teacher_tokenizer, names).examples
    assert own[0]["input_ids"] != examples[0]["input_ids"]
    with torch.no_grad():
        direct = teacher_model(input_ids=torch.tensor([own[3]["input_ids"]])).logits[0]
    assert len(fields) == len(examples) and torch.allclose(fields[3][distill.TEACHER_LOGITS], direct, atol=1e-5)
    batch = collate(tokenizer.pad_token_id)([e | f for e, f in zip(examples[:4], fields[:4])])
    assert batch[distill.TEACHER_LOGITS].shape == (4, 2)

    result = _train(doc, tmp_path / "s.yaml")
    assert result.exit_code == 0, result.output


# --- bad inputs: one line, nothing written --------------------------------------------------------------------------


def _llama_with_other_vocabulary(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    vocab = {
        w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *reversed(WORDS), ":", "#", "\n", ",", ".", "-"])
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _files(root: Path) -> dict[str, int]:
    """Every path under `root` and its modification time; the encoded-data cache (data.cache) aside."""
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if not p.relative_to(root).as_posix().startswith("cache/encoded")
    }


BAD = {
    "temperature-zero": ("cls", {"temperature": 0}, 2, ["objective.temperature", "greater than 0"]),
    "temperature-negative": ("cls", {"temperature": -1.5}, 2, ["objective.temperature"]),
    "alpha-above-one": ("cls", {"alpha": 1.5}, 2, ["objective.alpha", "less than or equal to 1"]),
    "alpha-negative": ("cls", {"alpha": -0.1}, 2, ["objective.alpha", "greater than or equal to 0"]),
    "beta-without-jsd": ("cls", {"beta": 0.3}, 2, ["beta is read only by divergence: jsd"]),
    "unknown-key": ("cls", {"temprature": 2}, 2, ["objective.temprature", "temperature"]),
    "missing-path": ("cls", {"teacher": "./runs/no-such-teacher"}, 1, ["objective.teacher", "no such run directory"]),
    "junk-folder": ("cls", {"teacher": "JUNK"}, 1, ["objective.teacher", "neither a finished ftune run directory"]),
    "untrained-head": ("cls", {"teacher": "BERT"}, 1, ["objective.teacher", "no trained weights for", "classifier"]),
    "untrained-head-cached": (
        "cls",
        {"teacher": "BERT", "cache": True},
        1,
        ["objective.teacher", "no trained weights"],
    ),
    "other-task": ("cls", {"teacher": "SFT_TEACHER"}, 2, ["objective.teacher", "was trained for causal_lm"]),
    "other-vocabulary": ("sft", {"teacher": "OTHER_LLAMA"}, 2, ["objective.teacher", "another vocabulary"]),
    "cache-per-token": ("sft", {"teacher": "SFT_TEACHER", "cache": True}, 2, ["objective.cache", "per token"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, tiny_bert, tiny_llama, cls_data, sft_data, cls_teacher, sft_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    kind, objective, code, needles = BAD[case]
    (tmp_path / "JUNK").mkdir()
    (tmp_path / "JUNK" / "notes.txt").write_text("not a model\n")
    if "OTHER_LLAMA" in objective.values():
        _llama_with_other_vocabulary(tmp_path / "OTHER_LLAMA")
    places = {"BERT": tiny_bert, "SFT_TEACHER": sft_teacher, "CLS_TEACHER": cls_teacher}
    objective = {"teacher": str(cls_teacher if kind == "cls" else sft_teacher)} | {
        k: str(places.get(v, v)) if k == "teacher" else v for k, v in objective.items()
    }
    doc = _student(
        kind,
        tiny_bert if kind == "cls" else tiny_llama,
        cls_data if kind == "cls" else sft_data,
        tmp_path / "out",
        objective,
    )
    recipe = write_recipe(tmp_path / "recipe.yaml", doc)
    before = _files(tmp_path) | _files(cls_teacher) | _files(sft_teacher)

    result = runner.invoke(app, ["train", str(recipe)])

    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("data: ")]  # a progress note
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _files(tmp_path) | _files(cls_teacher) | _files(sft_teacher) == before


def test_same_tokenizer_is_known_without_encoding(tiny_bert, tiny_llama, tmp_path):
    from ftune import models

    ours, again = models.load_tokenizer(str(tiny_bert)), models.load_tokenizer(str(tiny_bert))
    ours(["good movie"], truncation=True, max_length=3)  # leaves call settings behind in the backend
    assert teachers.same_tokenizer(ours, again)
    other = models.load_tokenizer(str(_bert_with_other_vocabulary(tmp_path / "other")))
    assert not teachers.same_tokenizer(ours, other)
    assert not teachers.same_tokenizer(ours, models.load_tokenizer(str(tiny_llama)))
