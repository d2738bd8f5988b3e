"""Knowledge distillation (ftune/objectives/distill.py): every loss against a computation written out by hand in plain
Python, the T² factor, masking, chunking, a teacher that is the student, `ftune train` end to end (classification and
causal LM, and a shrunk student). The teacher cache, a teacher with its own tokenizer and the bad inputs are in
tests/test_distill_teacher.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import recipe_doc, write_recipe
from ftune import assemble
from ftune.cli import app
from ftune.data.loader import collate
from ftune.objectives import distill
from ftune.recipe import validate_recipe
from ftune.tasks import IGNORE_INDEX, TASKS

runner = CliRunner()
UNPAIRED = [name for name, task in TASKS.items() if not task.paired]  # preference pairs are refused (check)


# --- the losses, by hand -----------------------------------------------------------------------------------------


def _softmax(xs: list[float], t: float = 1.0) -> list[float]:
    top = max(xs)
    e = [math.exp((x - top) / t) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _by_hand(
    s: list[float], t: list[float], y: int, temperature: float, alpha: float, divergence: str, beta: float = 0.5
) -> float:
    """α·T²·D + (1 − α)·CE of one position, from the definitions."""
    ps, pt = _softmax(s, temperature), _softmax(t, temperature)
    if divergence == "forward_kl":
        d = _kl(pt, ps)
    elif divergence == "reverse_kl":
        d = _kl(ps, pt)
    else:
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        d = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    return alpha * temperature**2 * d + (1 - alpha) * -math.log(_softmax(s)[y])


class Fixed(torch.nn.Module):
    """A 'model' whose logits are given: the loss sees exactly these numbers."""

    def __init__(self, logits: torch.Tensor, trains: bool = True) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone(), requires_grad=trains)

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits)


STUDENT = [[1.0, 2.0, 0.5], [0.1, -1.0, 0.3], [3.0, -2.0, 0.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.0, 0.5, -0.5], [-1.0, 1.5, 0.2]]
ROW_LABELS = [1, 0, 2]


def _cfg(**kw) -> distill.Config:
    return distill.Config(name="distill", teacher="unused", **kw)


def _row_loss(
    cfg: distill.Config, student=STUDENT, teacher=TEACHER, labels=ROW_LABELS
) -> tuple[torch.Tensor, torch.Tensor]:
    task = TASKS["sequence_classification"]
    bound = distill.bind(cfg, task, {"teacher": Fixed(torch.tensor(teacher), trains=False)})
    batch = {"input_ids": torch.zeros(len(labels), 2, dtype=torch.long), "labels": torch.tensor(labels)}
    return bound.loss(Fixed(torch.tensor(student)), batch)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize(("temperature", "alpha"), [(2.0, 0.5), (1.0, 1.0), (3.5, 0.2), (0.7, 0.0)])
def test_classification_loss_by_hand(divergence, temperature, alpha):
    extra = {"beta": 0.3} if divergence == "jsd" else {}
    total, count = _row_loss(_cfg(temperature=temperature, alpha=alpha, divergence=divergence, **extra))
    expected = sum(
        _by_hand(s, t, y, temperature, alpha, divergence, 0.3) for s, t, y in zip(STUDENT, TEACHER, ROW_LABELS)
    )
    assert count == 3
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_distilbert_defaults_and_kl_as_torch_writes_it():
    """T = 2, α = 0.5 by default; the term is DistilBERT's KLDiv(log_softmax(s/T), softmax(t/T))·T² per row."""
    cfg = _cfg()
    assert (cfg.temperature, cfg.alpha, cfg.divergence) == (2.0, 0.5, "forward_kl")
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(ROW_LABELS)
    kd = torch.nn.functional.kl_div((s / 2).log_softmax(-1), (t / 2).softmax(-1), reduction="sum") * 4
    ce = torch.nn.functional.cross_entropy(s, y, reduction="sum")
    assert _row_loss(cfg)[0].item() == pytest.approx((0.5 * kd + 0.5 * ce).item(), rel=1e-6)


def test_the_t_squared_factor():
    """With α = 1 the loss is T² times the KL of the softened distributions: ×4 at T = 2, ×16 at T = 4."""
    for temperature in (1.0, 2.0, 4.0):
        kl = sum(_kl(_softmax(t, temperature), _softmax(s, temperature)) for s, t in zip(STUDENT, TEACHER))
        total = _row_loss(_cfg(temperature=temperature, alpha=1.0))[0].item()
        assert total == pytest.approx(temperature**2 * kl, rel=1e-5)
        assert total / kl == pytest.approx(temperature**2, rel=1e-5)


def _token_case(seed: int = 0, length: int = 6, vocab: int = 7):
    """Fixed per-token logits (2, length, vocab) and SFT-like labels: prompt and padding carry IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, length, vocab, generator=g), torch.randn(2, length, vocab, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, 4, IGNORE_INDEX], [IGNORE_INDEX, 2, 5, 6, 0, 1]])
    return s, t, labels


def _token_loss(cfg, task_name: str, s, t, labels):
    bound = distill.bind(cfg, TASKS[task_name], {"teacher": Fixed(t, trains=False)})
    return bound.loss(Fixed(s), {"input_ids": torch.zeros_like(labels), "labels": labels})


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_causal_lm_loss_by_hand_masked_and_shifted(divergence):
    """Position i's distributions against the label at i + 1, only where that label is a response token."""
    s, t, labels = _token_case()
    cfg = _cfg(temperature=1.5, alpha=0.7, divergence=divergence)
    total, count = _token_loss(cfg, "causal_lm", s, t, labels)
    expected, n = 0.0, 0
    for b in range(2):
        for i in range(labels.shape[1] - 1):
            y = int(labels[b, i + 1])
            if y != IGNORE_INDEX:
                expected += _by_hand(s[b, i].tolist(), t[b, i].tolist(), y, 1.5, 0.7, divergence)
                n += 1
    assert int(count) == n == 8
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_token_positions_unshifted_for_other_token_tasks():
    s, t, labels = _token_case(1)
    total, count = _token_loss(_cfg(), "token_classification", s, t, labels)
    expected = sum(
        _by_hand(s[b, i].tolist(), t[b, i].tolist(), int(labels[b, i]), 2.0, 0.5, "forward_kl")
        for b in range(2)
        for i in range(labels.shape[1])
        if labels[b, i] != IGNORE_INDEX
    )
    assert int(count) == 8
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_masked_positions_do_not_count():
    """Changing the logits wherever the (shifted) label is IGNORE_INDEX changes neither the loss nor the count."""
    s, t, labels = _token_case(2)
    before = _token_loss(_cfg(), "causal_lm", s, t, labels)
    masked = torch.cat([labels[:, 1:] == IGNORE_INDEX, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    s2, t2 = s.clone(), t.clone()
    s2[masked], t2[masked] = 50.0, -30.0
    after = _token_loss(_cfg(), "causal_lm", s2, t2, labels)
    assert after[0].item() == before[0].item() and int(after[1]) == int(before[1])


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked(divergence):
    """Values and gradients, chunks of 1 and 3 positions against one chunk (within 1e-6)."""
    s, t, labels = _token_case(3, length=9, vocab=11)
    labels = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(4))
    labels[0, :3] = IGNORE_INDEX
    results = []
    for chunk in (1, 3, 10_000):
        student = Fixed(s)
        bound = distill.bind(
            _cfg(divergence=divergence, chunk_size=chunk), TASKS["causal_lm"], {"teacher": Fixed(t, trains=False)}
        )
        total, _ = bound.loss(student, {"input_ids": torch.zeros_like(labels), "labels": labels})
        total.backward()
        results.append((total.detach(), student.logits.grad.clone()))
    for total, grad in results[:2]:
        assert torch.allclose(total, results[-1][0], rtol=0, atol=1e-6 * max(1.0, results[-1][0].abs().item()))
        assert (grad - results[-1][1]).abs().max().item() <= 1e-6


def test_a_padded_teacher_vocabulary_is_cut_to_the_student_width():
    """Same tokenizer, a teacher output layer padded with extra rows (as model families pad V): they are ignored."""
    s, t, labels = _token_case(5)
    wide = torch.cat([t, torch.full((2, t.shape[1], 3), -4.0)], dim=-1)
    assert (
        _token_loss(_cfg(), "causal_lm", s, wide, labels)[0].item()
        == _token_loss(_cfg(), "causal_lm", s, t, labels)[0].item()
    )


# --- on tiny models: the hard term is the task's loss; the student as its own teacher ----------------------------


@pytest.fixture()
def task_batches(tiny_bert, tiny_llama, tiny_t5, cls_data, sft_data, conll_data, s2s_data, tmp_path):
    from conftest import s2s_recipe_doc, token_recipe_doc

    docs = {
        "sequence_classification": recipe_doc("cls", tiny_bert, cls_data, tmp_path / "a"),
        "causal_lm": recipe_doc("sft", tiny_llama, sft_data, tmp_path / "b"),
        "token_classification": token_recipe_doc(tiny_bert, conll_data, tmp_path / "c"),
        "seq2seq": s2s_recipe_doc(tiny_t5, s2s_data, tmp_path / "d"),
    }
    built = {}
    for name, doc in docs.items():
        recipe = validate_recipe(doc | {"method": {"name": "full"}})
        source, tokenizer = assemble.source_and_tokenizer(recipe)
        rows = assemble.read_split(recipe, "train")
        names = assemble.label_names(recipe, rows)
        examples = assemble.encode_rows(recipe, rows, tokenizer, names).examples
        model = assemble.build_model(recipe, source, tokenizer, names).eval()
        built[name] = (model, collate(tokenizer.pad_token_id)(examples[:6]))
    return built


@pytest.mark.parametrize("name", UNPAIRED)
def test_alpha_zero_is_the_task_loss(name, task_batches):
    """The cross-entropy computed chunk by chunk beside the divergence equals the task's own loss, for every task."""
    model, batch = task_batches[name]
    task = TASKS[name]
    total, count = distill.bind(_cfg(alpha=0.0, chunk_size=5), task, {"teacher": model}).loss(model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected, expected_count = task.loss(model(**inputs).logits, batch["labels"])
    assert int(count) == int(expected_count)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", UNPAIRED)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_the_student_as_its_own_teacher_gives_zero(name, divergence, task_batches):
    model, batch = task_batches[name]
    total, count = distill.bind(_cfg(alpha=1.0, divergence=divergence), TASKS[name], {"teacher": model}).loss(
        model, batch
    )
    assert int(count) > 0
    assert abs(total.item()) <= 1e-6 * int(count)


# --- ftune train end to end ----------------------------------------------------------------------------------------


def _train(doc: dict, path: Path):
    return runner.invoke(app, ["train", str(write_recipe(path, doc))])


def teacher_run(kind: str, model: Path, data: Path, root: Path) -> Path:
    """A finished tiny teacher run: full fine-tuning (classification) or LoRA (SFT)."""
    method = {"name": "full"} if kind == "cls" else None
    doc = recipe_doc(kind, model, data, root / "run", method=method, max_steps=6 if kind == "cls" else 3, lr=3e-3)
    result = _train(doc, root / "recipe.yaml")
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def cls_teacher(tiny_bert, cls_data, tmp_path_factory) -> Path:
    return teacher_run("cls", tiny_bert, cls_data, tmp_path_factory.mktemp("distill-cls-teacher"))


@pytest.fixture(scope="module")
def sft_teacher(tiny_llama, sft_data, tmp_path_factory) -> Path:
    return teacher_run("sft", tiny_llama, sft_data, tmp_path_factory.mktemp("distill-sft-teacher"))


def _student(kind: str, model: Path, data: Path, out: Path, objective: dict, **train) -> dict:
    return recipe_doc(kind, model, data, out, **train) | {"objective": {"name": "distill", **objective}}


def test_train_classification_with_a_teacher_run(tiny_bert, cls_data, cls_teacher, tmp_path):
    doc = _student("cls", tiny_bert, cls_data, tmp_path / "student", {"teacher": str(cls_teacher)})
    result = _train(doc, tmp_path / "recipe.yaml")
    assert result.exit_code == 0, result.output
    metrics = yaml.safe_load((tmp_path / "student" / "metrics.json").read_text())
    assert metrics["step"] == 4 and 0 <= metrics["validation"]["accuracy"] <= 1
    stored = yaml.safe_load((tmp_path / "student" / "recipe.yaml").read_text())
    assert stored["objective"]["name"] == "distill" and stored["objective"]["teacher"] == str(cls_teacher)


def test_train_a_shrunk_student(tiny_bert, cls_data, cls_teacher, tmp_path, monkeypatch):
    """The 2-block teacher distilled into its 1-block self (recipes/distill_shrink_sst2.yaml at tiny scale)."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    doc = _student("cls", tiny_bert, cls_data, tmp_path / "student", {"teacher": str(cls_teacher), "cache": True})
    doc["method"] = [{"name": "shrink", "drop": "top-k", "k": 1}, {"name": "full"}]
    result = _train(doc, tmp_path / "recipe.yaml")
    assert result.exit_code == 0, result.output
    _, student, _ = assemble.load_run(tmp_path / "student")
    assert len(student.bert.encoder.layer) == 1


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_train_causal_lm_with_a_teacher_run(tiny_llama, sft_data, sft_teacher, tmp_path, divergence):
    objective = {"teacher": str(sft_teacher), "temperature": 1.0, "divergence": divergence, "chunk_size": 16}
    result = _train(_student("sft", tiny_llama, sft_data, tmp_path / "student", objective), tmp_path / "recipe.yaml")
    assert result.exit_code == 0, result.output
    losses = [
        e["loss"]
        for e in map(yaml.safe_load, (tmp_path / "student" / "metrics.jsonl").read_text().splitlines())
        if "loss" in e
    ]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


def test_recipe_without_objective_is_the_task_loss(tiny_bert, cls_data, tmp_path):
    recipe = validate_recipe(recipe_doc("cls", tiny_bert, cls_data, tmp_path / "x"))
    assert recipe.objective.name == "task"
