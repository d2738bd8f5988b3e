"""Knowledge distillation (Hinton et al. 2015): the student learns the labels and a frozen teacher's distribution.

    loss = α·T²·D(teacher ‖ student, both at temperature T) + (1 − α)·CE(student, labels)

summed over rows (classification) or over the positions that carry the task's loss (SFT response tokens, tags,
target tokens) and returned with the task's count: the loop divides by the count of the whole step, which makes
DistilBERT's batch mean and torchtune's per-token mean. Defaults are DistilBERT's (Sanh et al. 2019): T = 2,
α = 0.5. The T² keeps the soft targets' gradients on the scale of the hard ones as T grows (Hinton et al. §2).
torchtune's LLM distillation uses T = 1 and kd_ratio (α) 0.5.

D, with s = softmax(student logits / T) and t = softmax(teacher logits / T) over the C classes or V tokens:
    forward_kl   KL(t ‖ s) = Σ t·(log t − log s)                   (default)
    reverse_kl   KL(s ‖ t) = Σ s·(log s − log t)
    jsd          β·KL(t ‖ m) + (1 − β)·KL(s ‖ m), m = β·t + (1 − β)·s: the generalised Jensen-Shannon divergence of
                 GKD (Agarwal et al. 2024; TRL's generalized_jsd_loss), β in (0, 1), default 0.5.
GKD's on-policy half (the student sampling its own responses) is not here: the data's responses are distilled.

Positions go `chunk_size` at a time, each chunk's fp32 log-probabilities recomputed in backward (activation
checkpointing), so a 150k-token vocabulary never holds every position's fp32 log-probs at once; the cross-entropy is
computed in the same pass (equal to the task's own loss: tests/test_distill.py checks it for every task).

The teacher (objective.teacher; ftune/objectives/teacher.py): a finished ftune run directory or a model fine-tuned
for the task, built once beside the student, in eval mode, without gradients.
- Tasks with an output per row (sequence classification): the teacher may have its own tokenizer; it then reads
  every training row once, before training, and its logits (rows, C) travel with the rows (`teacher_logits` in the
  batch). `cache: true` keeps them on disk by teacher and data, and later runs read them without loading the
  teacher. Same token ids and no cache: the teacher runs on each batch beside the student.
- Tasks with an output per token (causal LM, token classification, seq2seq): the teacher reads the student's
  batch, so both must share the vocabulary (checked before anything is written). Not cached: V floats per token.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ftune.errors import RecipeError
from ftune.objectives.base import Bound, Objective, ObjectiveConfig, TrainingData
from ftune.tasks import IGNORE_INDEX, Task

TEACHER_LOGITS = "teacher_logits"
"""The batch field of a teacher's logits per row (B, C), when they were computed before training."""


class Config(ObjectiveConfig):
    name: Literal["distill"] = "distill"
    teacher: str = Field(min_length=1)
    """A finished ftune run directory (e.g. runs/full_sst2: its base with its method), or a model folder / Hub id
    already fine-tuned for the task."""
    temperature: float = Field(2.0, gt=0)
    """T: both distributions are softmax(logits / T); the divergence is scaled by T²."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the divergence; 1 − alpha weighs the task's cross-entropy on the labels."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """forward_kl KL(teacher ‖ student), reverse_kl KL(student ‖ teacher), or GKD's generalised JSD(beta)."""
    beta: float = Field(0.5, gt=0, lt=1)
    """divergence: jsd only: the teacher's weight in the mixture m = beta·teacher + (1 − beta)·student."""
    chunk_size: int = Field(1024, gt=0)
    """Positions whose fp32 log-probabilities are computed at once (and recomputed in backward)."""
    cache: bool = False
    """Tasks with an output per row: keep the teacher's logits of every training row on disk
    ($FTUNE_CACHE/teacher_logits, keyed by teacher and data) and read them in later runs without loading it."""

    @model_validator(mode="after")
    def _beta_only_for_jsd(self) -> Config:
        # by value, not by whether it was written: a run's stored recipe writes every field, the default beta too
        if self.beta != Config.model_fields["beta"].default and self.divergence != "jsd":
            raise ValueError(
                f"beta is read only by divergence: jsd (the mixture weight), not {self.divergence}; "
                "drop it or set divergence: jsd"
            )
        return self


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p·(log p − log q) over the last axis, with 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(teacher, student)


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(student, teacher)


def jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log1p(-beta))  # log(β·t + (1 − β)·s)
    return beta * _kl(teacher, mixture) + (1 - beta) * _kl(student, mixture)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}
"""`(student log-probs, teacher log-probs, beta) -> divergence per position`: (N, C) fp32 in, (N,) out."""


def position_sums(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ divergence at temperature T, Σ cross-entropy at T = 1) over positions: logits (N, C) in any dtype,
    targets (N,) class or token ids; in fp32."""
    student, teacher = student.float(), teacher.float()
    t = cfg.temperature
    soft = DIVERGENCES[cfg.divergence](F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), cfg.beta)
    return soft.sum(), F.cross_entropy(student, targets, reduction="sum")


def chunked_sums(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """`position_sums`, `cfg.chunk_size` positions at a time; with gradients, each chunk's fp32 intermediates are
    recomputed in backward instead of kept."""
    from torch.utils.checkpoint import checkpoint

    soft = hard = torch.zeros((), device=student.device)
    sums = partial(position_sums, cfg=cfg)
    for first in range(0, len(student), cfg.chunk_size):
        part = (
            student[first : first + cfg.chunk_size],
            teacher[first : first + cfg.chunk_size],
            targets[first : first + cfg.chunk_size],
        )
        s, h = checkpoint(sums, *part, use_reentrant=False) if student.requires_grad else sums(*part)
        soft, hard = soft + s, hard + h
    return soft, hard


def positions(
    task: Task, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student (N, C), teacher (N, C), targets (N,)) at the positions that carry the task's loss.

    Per-row logits (B, C) with labels (B,): every row. Per-token logits (B, T, V) with labels (B, T): the positions
    whose label is not IGNORE_INDEX, the logits at i against the label at i + 1 for a next-token task. A teacher
    with a padded output layer (a larger V over the same tokenizer) is cut to the student's width.
    """
    if labels.dim() == 2:
        if task.next_token:
            student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
        keep = labels != IGNORE_INDEX
        width = min(student.shape[-1], teacher.shape[-1])
        student, teacher, labels = student[keep][:, :width], teacher[keep][:, :width], labels[keep]
    return student, teacher, labels


def bind(cfg: Config, task: Task, extra: dict[str, nn.Module], trained: Any = None) -> Bound:
    """The loss; `trained` (the student's record) is not read: the student is the model the loop passes."""
    teacher = extra.get("teacher")

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", TEACHER_LOGITS)}
        student = model(**inputs).logits
        if TEACHER_LOGITS in batch:
            taught = batch[TEACHER_LOGITS]
        else:
            with torch.no_grad():
                taught = teacher(**inputs).logits
        soft, hard = chunked_sums(*positions(task, student, taught, labels), cfg)
        return cfg.alpha * cfg.temperature**2 * soft + (1 - cfg.alpha) * hard, task.count(labels)

    return Bound(loss=loss, count=lambda batch: task.count(batch["labels"]))


def extra_models(cfg: Config) -> dict[str, str]:
    """The teacher, unless its per-row logits come from the cache (prepare then loads it only on a miss)."""
    return {} if cfg.cache else {"teacher": cfg.teacher}


def prepare(cfg: Config, task: Task, data: TrainingData, extra: dict[str, nn.Module]) -> list[dict[str, Any]] | None:
    """Check the teacher against the student and the data; per-row tasks: its logits per training row when they
    cannot be computed on the batch (another tokenizer) or are cached. One line, before anything is written, for a
    teacher of another task, classes or vocabulary."""
    from ftune.objectives import teacher as teachers

    about = teachers.describe(cfg.teacher, data.open_run, data.trust_remote_code)
    teachers.check_fits(about, task.name, data.label_names)
    if isinstance(data.examples[0]["labels"], list):  # an output per token
        if cfg.cache:
            raise RecipeError(
                f"objective.cache: only a teacher's outputs per row are cached; {task.name} has one "
                "per token (a vocabulary of floats each); set cache: false"
            )
        teachers.check_vocabulary(about, data.tokenizer)
        return None
    shared = teachers.same_tokenizer(about.tokenizer, data.tokenizer)
    encoded = data.examples if shared else data.encode(data.rows, about.tokenizer)
    if len(encoded) != len(data.examples):
        raise RecipeError(f"objective.teacher: its tokenizer keeps {len(encoded)} of the {len(data.examples)} rows")
    if cfg.cache:
        key = teachers.cache_key(about, encoded)
        logits = teachers.read_cache(key, len(encoded))
        if logits is None:
            model = data.load_model("teacher", cfg.teacher)
            logits = teachers.per_row_logits(model.to(data.device), encoded, about.tokenizer.pad_token_id, data.device)
            teachers.write_cache(key, logits)
    elif shared or all(t["input_ids"] == s["input_ids"] for t, s in zip(encoded, data.examples)):
        return None  # the teacher reads the student's batch
    else:
        logits = teachers.per_row_logits(extra["teacher"], encoded, about.tokenizer.pad_token_id, data.device)
    if logits.shape[-1] != len(data.label_names or []):
        raise RecipeError(
            f"objective.teacher: {cfg.teacher} gives {logits.shape[-1]} outputs per row, the student "
            f"has {len(data.label_names or [])} classes"
        )
    return [{TEACHER_LOGITS: row} for row in logits]


def check(cfg: Config, task: Task, method: Any) -> None:
    if task.paired:
        raise ValueError(
            f"objective.name: distill learns from labels and a teacher's outputs per row or token; "
            f"{task.name} rows are preference pairs (train them with reward or dpo)"
        )


OBJECTIVE = Objective(
    name="distill",
    config_cls=Config,
    summary="knowledge distillation from a frozen teacher: T²-scaled KL, reverse KL or GKD's JSD, plus the task loss",
    bind=bind,
    extra_models=extra_models,
    prepare=prepare,
    check=check,
)
