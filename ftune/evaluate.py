"""Scoring a model on a loader: classification metrics from scikit-learn, token-level loss and perplexity for LMs."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ftune.data import IGNORE_INDEX


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: str, device: torch.device, autocast=nullcontext) -> dict[str, float]:
    """Metrics over the whole loader: loss, accuracy, macro_f1, mcc (classification) or loss, perplexity (LM)."""
    was_training = model.training
    model.eval()
    loss_sum, count, predictions, golds = 0.0, 0, [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        if task == "sequence_classification":
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            count += len(labels)
            predictions += logits.argmax(-1).tolist()
            golds += labels.tolist()
        else:  # causal LM: token i predicts token i + 1; prompt and padding positions are IGNORE_INDEX
            targets = labels[:, 1:]
            loss_sum += F.cross_entropy(
                logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if task == "causal_lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    return {
        "loss": loss,
        "accuracy": float(accuracy_score(golds, predictions)),
        "macro_f1": float(f1_score(golds, predictions, average="macro")),
        "mcc": float(matthews_corrcoef(golds, predictions)),
        "examples": count,
    }
