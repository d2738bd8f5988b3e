"""Preference optimisation of a causal LM on preference pairs (task: preference): DPO and its variants.

With π the policy and π_ref the frozen reference, log π(y|x) summed over the completion's tokens, and
Δ = (log π_c − log π_ref,c) − (log π_r − log π_ref,r), the per-pair losses are (`loss:`):

- sigmoid: DPO (Rafailov et al. 2023, eq. 7), −log σ(βΔ); with `label_smoothing` ε, conservative DPO (cDPO,
  Mitchell 2023; TRL): −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ).
- ipo: IPO (Azar et al. 2023, eq. 17), (Δ − 1/(2β))², with log-probs averaged over completion tokens, as TRL does.
- orpo: ORPO (Hong et al. 2024), no reference: −ℓ̄_c − λ·log σ(log-odds), where ℓ̄ is the mean per-token log-prob,
  log-odds = (ℓ̄_c − ℓ̄_r) − (log(1 − e^ℓ̄_c) − log(1 − e^ℓ̄_r)), λ = β; the NLL term is the chosen completion's mean
  per-token NLL per pair, as the paper's L_SFT (TRL averages it over the batch's tokens instead).
- simpo: SimPO (Meng et al. 2024, eq. 6), no reference: −log σ(β·(ℓ̄_c − ℓ̄_r) − γ).

Defaults: β 0.1 for sigmoid and ipo (TRL's DPOConfig), λ 0.1 for orpo (Hong et al.; TRL's ORPOConfig), β 2.0 and
γ 0.5 for simpo (the SimPO authors' config: beta 2.0, gamma_beta_ratio 0.25); ε 0.

The reference (`reference:`) is the policy with its method switched off (`Method.disabled`: no second copy of the
weights) for parameter-efficient methods, a frozen copy of the base model for methods that train base weights in
place (full, bitfit, ...), always in eval mode; `auto` picks between them. `precompute_reference` computes the
reference's log-probs of every training pair once before training (in fixed batches, so a resumed run recomputes
the same values) and drops the reference forward from every step.

Metrics per evaluation, as TRL logs them: rewards/chosen and rewards/rejected (mean β·(log π − log π_ref); for orpo
and simpo β·ℓ̄), rewards/accuracies (share of pairs whose chosen reward is strictly higher), rewards/margins, and
logps/chosen, logps/rejected (mean summed log-probs), besides the loss.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ftune.objectives.base import Bound, Evaluation, Objective, ObjectiveConfig, Trained, TrainingData
from ftune.tasks import Task
from ftune.tasks.preference import completion_logps

DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
DEFAULT_GAMMA = 0.5
WITH_REFERENCE = ("sigmoid", "ipo")
PRECOMPUTE_BATCH = 8  # pairs per reference forward when precomputing: fixed, so a resumed run gets the same values
REFERENCE_LOGPS = "reference_logps"
"""The batch field of precomputed reference log-probs, one per row (2B,)."""


class Config(ObjectiveConfig):
    name: Literal["dpo"] = "dpo"
    loss: Literal["sigmoid", "ipo", "orpo", "simpo"] = "sigmoid"
    """sigmoid (DPO; cDPO with label_smoothing), ipo, orpo or simpo (the last two without a reference model)."""
    beta: float | None = Field(None, gt=0)
    """β (orpo: λ, the weight of the odds-ratio term). Default: 0.1, or 2.0 for simpo."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """ε of conservative DPO: the share of pairs assumed mislabelled (loss: sigmoid only)."""
    gamma: float | None = Field(None, ge=0.0)
    """SimPO's target reward margin γ (loss: simpo only). Default 0.5."""
    reference: Literal["auto", "disabled", "copy"] = "auto"
    """The reference model: the policy with its method switched off (disabled), a frozen copy of the base model
    (copy), or auto: disabled where the method can be switched off, else copy (sigmoid and ipo only)."""
    precompute_reference: bool = False
    """Compute the reference's log-probs of every training pair once before training (sigmoid and ipo only)."""

    @model_validator(mode="after")
    def _options_fit_the_loss(self) -> Config:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing is conservative DPO's (loss: sigmoid), not {self.loss}'s; drop it")
        if self.gamma is not None and self.loss != "simpo":
            raise ValueError(f"gamma is SimPO's target margin (loss: simpo), not {self.loss}'s; drop it")
        if self.loss not in WITH_REFERENCE and (self.reference != "auto" or self.precompute_reference):
            raise ValueError(f"loss: {self.loss} uses no reference model; drop reference and precompute_reference")
        return self

    @property
    def strength(self) -> float:
        """β as set, or the loss's default."""
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]


def sigmoid_losses(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO / cDPO per pair from Δ (B,)."""
    logsigmoid = nn.functional.logsigmoid
    return -(1 - label_smoothing) * logsigmoid(beta * delta) - label_smoothing * logsigmoid(-beta * delta)


def ipo_losses(delta: torch.Tensor, beta: float) -> torch.Tensor:
    return (delta - 1 / (2 * beta)) ** 2


def orpo_losses(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO per pair from mean per-token log-probs (B,) each (negative: log(1 − e^ℓ) is finite)."""
    log_odds = (mean_chosen - mean_rejected) - (
        torch.log1p(-torch.exp(mean_chosen)) - torch.log1p(-torch.exp(mean_rejected))
    )
    return -mean_chosen - lam * nn.functional.logsigmoid(log_odds)


def simpo_losses(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    return -nn.functional.logsigmoid(beta * (mean_chosen - mean_rejected) - gamma)


def preference_losses(
    cfg: Config, sums: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and per-row implicit rewards (2B,: chosen rows, then rejected), from the policy's summed
    completion log-probs `sums` (2B,), their token `counts` (2B,) and the reference's sums (2B,; None without one)."""
    beta, half = cfg.strength, sums.shape[0] // 2
    means = sums / counts.clamp(min=1)
    if cfg.loss == "sigmoid":
        ratios = sums - reference
        return sigmoid_losses(ratios[:half] - ratios[half:], beta, cfg.label_smoothing), beta * ratios
    if cfg.loss == "ipo":
        ratios = means - reference / counts.clamp(min=1)
        return ipo_losses(ratios[:half] - ratios[half:], beta), beta * ratios
    if cfg.loss == "orpo":
        return orpo_losses(means[:half], means[half:], beta), beta * means
    gamma = cfg.gamma if cfg.gamma is not None else DEFAULT_GAMMA
    return simpo_losses(means[:half], means[half:], beta, gamma), beta * means


class Reference:
    """The reference's summed completion log-probs of a paired batch: the policy with its method switched off, or a
    frozen copy of the base (loaded on first use)."""

    def __init__(self, cfg: Config, trained: Trained) -> None:
        self.trained, self.copy = trained, None
        self.uses_copy = cfg.reference == "copy" or (cfg.reference == "auto" and trained.method.disabled is None)

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.uses_copy:
            if self.copy is None:
                self.copy = self.trained.load_base().to(self.trained.device)
            logits = self.copy(**inputs).logits
        else:
            model = self.trained.model
            was_training = model.training
            model.eval()  # as a frozen copy would be: no dropout in the base
            try:
                with self.trained.method.disabled(model):
                    logits = model(**inputs).logits
            finally:
                model.train(was_training)
        return completion_logps(logits, batch["labels"])[0]


def pair_terms(
    cfg: Config, model: nn.Module, batch: dict[str, torch.Tensor], reference: Reference | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses (B,), per-row rewards (2B,), per-row summed log-probs (2B,)) of one paired batch; the
    reference's log-probs come from the batch when precomputed."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}  # not the extra fields
    sums, counts = completion_logps(model(**inputs).logits, batch["labels"])
    ref = None
    if cfg.loss in WITH_REFERENCE:
        ref = batch[REFERENCE_LOGPS] if REFERENCE_LOGPS in batch else reference.logps(batch)
    losses, rewards = preference_losses(cfg, sums, counts, ref)
    return losses, rewards, sums


def evaluation(cfg: Config, reference: Reference | None) -> Evaluation:
    def sums(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        losses, rewards, logps = pair_terms(cfg, model, batch, reference)
        half = losses.shape[0]
        chosen, rejected = rewards[:half], rewards[half:]
        return {
            "pairs": half,
            "loss": float(losses.sum()),
            "rewards/chosen": float(chosen.sum()),
            "rewards/rejected": float(rejected.sum()),
            "rewards/correct": float((chosen > rejected).sum()),
            "rewards/margins": float((chosen - rejected).sum()),
            "logps/chosen": float(logps[:half].sum()),
            "logps/rejected": float(logps[half:].sum()),
        }

    def result(totals: dict[str, float]) -> dict[str, float]:
        n = max(totals.get("pairs", 0), 1)
        return {
            "loss": totals["loss"] / n,
            "rewards/chosen": totals["rewards/chosen"] / n,
            "rewards/rejected": totals["rewards/rejected"] / n,
            "rewards/accuracies": totals["rewards/correct"] / n,
            "rewards/margins": totals["rewards/margins"] / n,
            "logps/chosen": totals["logps/chosen"] / n,
            "logps/rejected": totals["logps/rejected"] / n,
            "pairs": int(totals["pairs"]),
        }

    return Evaluation(sums=sums, result=result)


def check(cfg: Config, task: Task, method) -> None:
    if not task.paired:
        raise ValueError(
            f"objective.name: dpo trains on preference pairs; task {task.name} has none "
            "(use task: preference with prompt, chosen and rejected columns)"
        )
    if cfg.reference == "disabled" and method.disabled is None:
        raise ValueError(
            f"objective.reference: disabled, but method {method.name} trains base weights in place, so "
            "it cannot be switched off to give the reference; use reference: copy (or auto)"
        )


def prepare(cfg: Config, task: Task, data: TrainingData, extra: dict[str, nn.Module]) -> list[dict[str, Any]] | None:
    """precompute_reference: every training pair's reference log-probs, {REFERENCE_LOGPS: (chosen, rejected)},
    computed under the run's autocast in fixed batches of PRECOMPUTE_BATCH pairs in data order (a resumed run
    recomputes the very same values). A frozen copy is loaded for this only and let go afterwards."""
    if not cfg.precompute_reference:
        return None
    from ftune.data.loader import collate
    from ftune.models.precision import autocast

    reference, pad = Reference(cfg, data.trained), collate(data.trained.pad_token_id)
    data.trained.model.to(data.device)
    fields = []
    for start in range(0, len(data.examples), PRECOMPUTE_BATCH):
        batch = {k: v.to(data.device) for k, v in pad(data.examples[start : start + PRECOMPUTE_BATCH]).items()}
        with autocast(data.trained.precision, data.device):
            sums = reference.logps(batch).float().cpu()
        half = sums.shape[0] // 2
        fields += [{REFERENCE_LOGPS: torch.stack([sums[i], sums[half + i]])} for i in range(half)]
    return fields


def bind(cfg: Config, task: Task, extra: dict[str, nn.Module], trained: Trained) -> Bound:
    reference = Reference(cfg, trained) if cfg.loss in WITH_REFERENCE else None

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        losses = pair_terms(cfg, model, batch, reference)[0]
        return losses.sum(), torch.tensor(losses.shape[0], device=losses.device)

    return Bound(
        loss=loss,
        count=lambda batch: torch.tensor(batch["input_ids"].shape[0] // 2),
        evaluation=evaluation(cfg, reference),
    )


OBJECTIVE = Objective(
    name="dpo",
    config_cls=Config,
    bind=bind,
    check=check,
    prepare=prepare,
    own_metrics=True,
    summary="DPO (cDPO, IPO) against a reference, or ORPO/SimPO without one, on preference pairs",
)
