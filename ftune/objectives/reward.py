"""A reward model from preference pairs (Bradley-Terry), as in InstructGPT (Ouyang et al. 2022, §3.5) and TRL's
RewardTrainer.

The model is the base with a sequence-classification head of one output: r(x, y) is the head's value at the last
real token of prompt + completion (transformers picks it by the pad id). For a batch of B pairs,

    loss = mean over pairs of −log σ(r_c − r_r) + c · (r_c + r_r)²

with c = `center_coefficient` (default 0, off; TRL's `center_rewards_coefficient`, 0.01 suggested by Eisenstein et al.
2023): it keeps rewards centred on zero, which the pairwise loss alone leaves free. Metrics: loss, accuracy (share
of pairs with r_c > r_r), margin (mean r_c − r_r), mean rewards of chosen and rejected completions.

`score_completions` (and ftune/serve/label_pairs.py's `reward_scorer` for a finished run) score (prompt,
completion) texts with a trained reward model, e.g. to judge sampled pairs (RLAIF).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ftune.objectives.base import Bound, Objective, ObjectiveConfig, Trained
from ftune.tasks import Task


class Config(ObjectiveConfig):
    name: Literal["reward"] = "reward"
    center_coefficient: float = Field(0.0, ge=0.0)
    """c in + c · mean((r_c + r_r)²), which pulls rewards towards zero mean; 0 leaves it out (TRL suggests 0.01)."""


def pair_rewards(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_c, r_r), each (B,) fp32, from the head's logits (2B, 1) of a paired batch (chosen rows first)."""
    rewards = logits[:, 0].float()
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def bradley_terry(logits: torch.Tensor, labels: torch.Tensor, center: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed −log σ(r_c − r_r) + c·(r_c + r_r)² over the batch's pairs, and the number of pairs."""
    chosen, rejected = pair_rewards(logits)
    per_pair = -nn.functional.logsigmoid(chosen - rejected) + center * (chosen + rejected) ** 2
    return per_pair.sum(), torch.tensor(chosen.shape[0])


def count_pairs(labels: torch.Tensor) -> torch.Tensor:
    return torch.tensor(labels.shape[0] // 2)


class Scorer:
    def __init__(self, names: list[str] | None = None, center: float = 0.0) -> None:
        self.center = center
        self.loss, self.pairs, self.correct, self.margin, self.chosen, self.rejected = 0.0, 0, 0, 0.0, 0.0, 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        chosen, rejected = pair_rewards(logits)
        self.loss += float(bradley_terry(logits, labels, self.center)[0])
        self.pairs += chosen.shape[0]
        self.correct += int((chosen > rejected).sum())
        self.margin += float((chosen - rejected).sum())
        self.chosen += float(chosen.sum())
        self.rejected += float(rejected.sum())

    def merge(self, other: Scorer) -> None:
        for key in ("loss", "pairs", "correct", "margin", "chosen", "rejected"):
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def result(self) -> dict[str, float]:
        n = max(self.pairs, 1)
        return {
            "loss": self.loss / n,
            "accuracy": self.correct / n,
            "margin": self.margin / n,
            "reward/chosen": self.chosen / n,
            "reward/rejected": self.rejected / n,
            "pairs": self.pairs,
        }


def _one_output(rows, spec) -> list[str]:
    return ["reward"]


def shape_task(cfg: Config, task: Task) -> Task:
    """The preference task read by a one-output classification head, with the Bradley-Terry loss and metrics."""
    return replace(
        task,
        summary=f"{task.name} pairs scored by a reward head (Bradley-Terry)",
        model_class="AutoModelForSequenceClassification",
        peft_task_type="SEQ_CLS",
        loss=partial(bradley_terry, center=cfg.center_coefficient),
        count=count_pairs,
        scorer=partial(Scorer, center=cfg.center_coefficient),
        class_names=_one_output,
        predict_row=None,
        next_token=False,
    )


def check(cfg: Config, task: Task, method) -> None:
    if not task.paired:
        raise ValueError(
            f"objective.name: reward trains on preference pairs; task {task.name} has none "
            "(use task: preference with prompt, chosen and rejected columns)"
        )


def bind(cfg: Config, task: Task, extra: dict[str, nn.Module], trained: Trained) -> Bound:
    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return task.loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )

    return Bound(loss=loss, count=lambda batch: task.count(batch["labels"]))


@torch.no_grad()
def score_completions(model: nn.Module, tokenizer, data_spec, prompt: str, completions: list[str]) -> list[float]:
    """The reward of each completion of `prompt`: the run's reward model (`model`, in eval mode) on the sequences
    its training encoded (data_spec: the run's `data` section: template and max_length)."""
    from ftune.data.loader import collate
    from ftune.tasks import preference

    chat = preference.uses_chat(tokenizer, data_spec.template)
    head = preference.prompt_ids(tokenizer, prompt, chat)
    answers = [preference.completion_ids(tokenizer, prompt, text, chat) for text in completions]
    head, answers, _ = preference.fit(head, answers, data_spec.max_length)
    batch = collate(tokenizer.pad_token_id)([preference.sequence(head, answer) for answer in answers])
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return logits[:, 0].float().tolist()


OBJECTIVE = Objective(
    name="reward",
    config_cls=Config,
    bind=bind,
    shape_task=shape_task,
    check=check,
    summary="reward model: one-output head, Bradley-Terry loss on preference pairs (+ centring)",
)
