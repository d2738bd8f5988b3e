"""Choosing a sparse fine-tuning mask (ftune/methods/sparse.py): a score per entry of the adapted weights, (N,).

Both scores run the model with `SparseDelta.probes` in place of the sparse difference: dense zero tensors whose
gradient is the loss gradient with respect to each W (summed over a tied weight's uses), or which an optimizer moves,
so W itself is never written and `requires_grad` is never touched. Memory: the probes, their gradients and the
score, about three more copies of the body (plus AdamW's two for `moved_entries`, as a full fine-tune).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ftune.layers.sparse import SparseDelta, adapted_weights

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
"""The objective's `loss(model, batch) -> (sum, count)`."""


def fisher_scores(
    model: nn.Module, store: SparseDelta, batches: Iterable[Batch], loss_fn: LossFn, samples: int
) -> torch.Tensor:
    """(N,): Σ over `samples` examples of (∂ loss / ∂ W)², each example alone, in eval mode (no dropout). At most
    one pass over the data: in eval mode a row's squared gradient is the same each time, so a second pass would only
    weigh again the rows a partial pass reaches (and cost `samples` backward passes on a small data set)."""
    probes = _probes(model, store)
    scores = torch.zeros(store.size, device=probes[0].device)
    rows = (
        ({k: v[i : i + 1].to(scores.device) for k, v in b.items()} for i in range(len(b["input_ids"]))) for b in batches
    )
    was_training, seen = model.training, 0
    model.eval()
    try:
        for row in itertools.chain.from_iterable(rows):
            total, count = loss_fn(model, row)
            if not count:
                continue  # a row without a scored token
            (total / count).backward()
            for offset, probe in zip(store.offsets, probes):
                scores[offset : offset + probe.numel()] += probe.grad.view(-1).square()
                probe.grad = None
            seen += 1
            if seen == samples:
                break
    finally:
        store.probes = None
        model.train(was_training)
    return scores


def moved_entries(
    model: nn.Module, store: SparseDelta, batches: Iterable[Batch], loss_fn: LossFn, steps: int, lr: float
) -> torch.Tensor:
    """(N,): |w - w0| after `steps` steps of full fine-tuning (AdamW, `lr`, no weight decay, train mode); everything
    it moved, the head too, is put back after."""
    probes = _probes(model, store)  # the full fine-tune moves these dense differences, never W itself
    adapted = {id(w) for w in adapted_weights(model, store)}  # a weight the checkpoint lacked moves by its probe
    head = [p for p in model.parameters() if p.requires_grad and p is not store.values and id(p) not in adapted]
    start = [p.detach().clone() for p in head]
    optimizer = torch.optim.AdamW(probes + head, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    try:
        for batch in itertools.islice(_cycle(batches, store.values.device), steps):
            total, count = loss_fn(model, batch)
            (total / count.clamp(min=1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return torch.cat([probe.detach().abs().view(-1) for probe in probes])
    finally:
        store.probes = None
        model.train(was_training)
        with torch.no_grad():
            for p, p0 in zip(head, start):
                p.copy_(p0)


def random_positions(size: int, k: int, device: torch.device) -> torch.Tensor:
    """k distinct positions in [0, size), uniform, from the global RNG (seeded by train.seed)."""
    if 2 * k > size:
        return torch.randperm(size)[:k].to(device)
    found = torch.empty(0, dtype=torch.long)
    while found.numel() < k:  # draws with repeats, deduplicated; few rounds while k ≤ size / 2
        found = torch.unique(torch.cat([found, torch.randint(size, (k + k // 8 + 8,))]))
    return found[torch.randperm(found.numel())[:k]].to(device)


def _probes(model: nn.Module, store: SparseDelta) -> list[torch.Tensor]:
    store.probes = [torch.zeros(w.shape, device=w.device, requires_grad=True) for w in adapted_weights(model, store)]
    return store.probes


def _cycle(batches: Iterable[Batch], device: torch.device):
    """The batches on `device`, pass after pass."""
    while True:
        for batch in batches:
            yield {k: v.to(device) for k, v in batch.items()}
