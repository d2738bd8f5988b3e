"""Scoring a model on a loader: classification metrics from scikit-learn, entity-level NER metrics from seqeval,
token-level loss and perplexity for LMs."""

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
    """Metrics over the whole loader: loss, accuracy, macro_f1, mcc (classification); loss, precision, recall, f1,
    accuracy (token classification, see `tagging_metrics`); or loss, perplexity (LM)."""
    was_training = model.training
    model.eval()
    loss_sum, count, predictions, golds = 0.0, 0, [], []
    names = _label_names(model) if task == "token_classification" else None
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
        elif task == "token_classification":  # scored only where a word starts (labels != IGNORE_INDEX)
            loss_sum += F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((labels != IGNORE_INDEX).sum())
            for gold_row, predicted_row in zip(labels.tolist(), logits.argmax(-1).tolist()):
                kept = [(g, p) for g, p in zip(gold_row, predicted_row) if g != IGNORE_INDEX]
                golds.append([names[g] for g, _ in kept])
                predictions.append([names[p] for _, p in kept])
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
    if task == "token_classification":
        return {"loss": loss, **tagging_metrics(golds, predictions)}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    return {
        "loss": loss,
        "accuracy": float(accuracy_score(golds, predictions)),
        "macro_f1": float(f1_score(golds, predictions, average="macro")),
        "mcc": float(matthews_corrcoef(golds, predictions)),
        "examples": count,
    }


def tagging_metrics(golds: list[list[str]], predictions: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (seqeval, strict IOB2: an entity counts only when its type and
    both boundaries match, as in the CoNLL-2003 evaluation of Tjong Kim Sang & De Meulder 2003), token accuracy,
    and the number of sentences and tagged words. `golds` and `predictions`: a list of tag names per sentence.

    The entity metrics need IOB2 tag names (O, B-TYPE, I-TYPE); for any other tag set (e.g. part-of-speech tags)
    only the token accuracy is reported.
    """
    words = sum(len(row) for row in golds)
    correct = sum(g == p for gold, predicted in zip(golds, predictions) for g, p in zip(gold, predicted))
    metrics = {"accuracy": correct / max(words, 1), "sentences": len(golds), "words": words}
    tags = {tag for row in golds + predictions for tag in row}
    if not all(tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2) for tag in tags):
        return metrics
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    options = {"mode": "strict", "scheme": IOB2, "average": "micro", "zero_division": 0}
    return {"precision": float(precision_score(golds, predictions, **options)),
            "recall": float(recall_score(golds, predictions, **options)),
            "f1": float(f1_score(golds, predictions, **options)), **metrics}


def _label_names(model: nn.Module) -> list[str]:
    """Tag names in id order, from the config of the transformers model (which a method may have wrapped)."""
    for module in model.modules():
        id2label = getattr(getattr(module, "config", None), "id2label", None)
        if id2label:
            return [id2label[i] for i in range(len(id2label))]
    raise ValueError("token classification needs the model's config.id2label; none was found")
