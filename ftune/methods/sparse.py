"""Sparse fine-tuning: a fixed mask of k entries over every weight of the body trains; the rest stay pretrained.

The mask is chosen before training (`selection`), from the training data and the loss:
- `fisher`: the FISH mask, Sung, Nair & Raffel 2021, "Training Neural Networks with Fixed Sparse Masks",
  arXiv:2111.09839: importance = Σ over `samples` examples (one at a time, reference: 1,024) of the squared gradient
  of the example's loss, in eval mode; global top-k over all adapted weights.
- `most_changed`: LT-SFT, Ansell et al. 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer",
  arXiv:2110.07560: a full fine-tune of `full_steps` steps (AdamW, `full_lr`), keep the k entries with the largest
  |w - w0|, reset everything (the head too) to where it started, then train only those.
- `random`: k entries drawn uniformly (a baseline).

k = round(density x N), N the parameters of the body (`model.base_model`: every weight, bias, norm and embedding);
default density 0.005, the FISH keep ratio. The task head trains densely on top of k, as under every ftune method
(the FISH code counts the classifier within k instead). Stored sparse (ftune/layers/sparse.py): a (k,) `values`
parameter and a (k,) `indices` buffer; method.safetensors holds both and the head, and the optimizer keeps state for
the k values only. merge adds ΔW into W exactly and unmerge puts W's own entries back bit for bit. peft has no
equivalent. A resumed or reloaded run reads its mask from its files and never recomputes it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ftune.errors import MethodError
from ftune.layers.sparse import SparseDelta, adapted_weights, attach_to, stores
from ftune.methods.base import Method, MethodConfig, switched_off, trainable_state_dict

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


class Config(MethodConfig):
    name: Literal["sparse"] = "sparse"
    selection: Literal["fisher", "most_changed", "random"] = "fisher"
    """How the mask is chosen: squared gradients (FISH), the entries a short full fine-tune moved most (LT-SFT), or
    at random."""
    density: float = Field(0.005, gt=0, le=1)
    """Fraction of the body's parameters that train, in (0, 1]."""
    samples: int = Field(1024, gt=0)
    """fisher: training examples whose squared gradients are summed."""
    full_steps: int = Field(100, gt=0)
    """most_changed: steps of the full fine-tune that ranks the entries."""
    full_lr: float = Field(2e-5, gt=0)
    """most_changed: AdamW learning rate of that fine-tune."""


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if stores(model):
        raise MethodError("sparse: the model already has a sparse difference")
    size = sum(p.numel() for p in model.base_model.parameters())
    attach_to(model, model.base_model, max(1, round(cfg.density * size)))
    return model


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    return [store.values for store in stores(model)]


def calibrate(model: nn.Module, cfg: Config, batches: Iterable[Batch], loss_fn: LossFn) -> None:
    """Choose the mask from `batches` (the training data, on the model's device) and `loss_fn` (sum, count)."""
    (store,) = stores(model)
    k = store.values.numel()
    if cfg.selection == "random":
        chosen = random_positions(store.size, k, store.indices.device)
    else:
        score = fisher_scores if cfg.selection == "fisher" else moved_entries
        chosen = torch.topk(score(model, store, batches, loss_fn, cfg), k, sorted=False).indices
    store.set_indices(chosen)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(store.indices, 0)  # one mask on every process, whatever rounding differed
    for p in model.parameters():
        p.grad = None


def fisher_scores(model: nn.Module, store: SparseDelta, batches: Iterable[Batch], loss_fn: LossFn,
                  cfg: Config) -> torch.Tensor:
    """(N,): Σ over cfg.samples examples of (∂ loss / ∂ W)², each example alone, in eval mode (no dropout)."""
    probes = _probes(model, store)
    scores = torch.zeros(store.size, device=probes[0].device)
    rows = (({k: v[i:i + 1] for k, v in b.items()} for i in range(len(b["input_ids"])))
            for b in _cycle(batches, scores.device))
    was_training, seen = model.training, 0
    model.eval()
    try:
        for row in itertools.chain.from_iterable(rows):
            total, count = loss_fn(model, row)
            if not count:
                continue  # a row without a scored token
            (total / count).backward()
            for offset, probe in zip(store.offsets, probes):
                scores[offset:offset + probe.numel()] += probe.grad.view(-1).square()
                probe.grad = None
            seen += 1
            if seen == cfg.samples:
                break
    finally:
        store.probes = None
        model.train(was_training)
    return scores


def moved_entries(model: nn.Module, store: SparseDelta, batches: Iterable[Batch], loss_fn: LossFn,
                  cfg: Config) -> torch.Tensor:
    """(N,): |w - w0| after cfg.full_steps steps of full fine-tuning; everything it moved is put back after."""
    probes = _probes(model, store)  # the full fine-tune moves these dense differences, never W itself
    head = [p for p in model.parameters() if p.requires_grad and p is not store.values]
    start = [p.detach().clone() for p in head]
    optimizer = torch.optim.AdamW(probes + head, lr=cfg.full_lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    try:
        for batch in itertools.islice(_cycle(batches, store.values.device), cfg.full_steps):
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


def saved_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The k values (and the head) plus each store's (k,) indices: what is needed to rebuild ΔW without data."""
    indices = {f"{name}.indices": m.indices for name, m in model.named_modules() if isinstance(m, SparseDelta)}
    return trainable_state_dict(model) | indices


def merge(model: nn.Module) -> None:
    for store in stores(model):
        store.merge(adapted_weights(model, store))


def unmerge(model: nn.Module) -> None:
    for store in stores(model):
        store.unmerge(adapted_weights(model, store))


def disabled(model: nn.Module) -> AbstractContextManager[None]:
    """The base weights alone: every adapted weight skips its difference."""
    return switched_off(stores(model))


METHOD = Method(
    name="sparse",
    claims=frozenset({"every weight"}),
    config_cls=Config,
    apply=apply,
    trainable=trainable,
    calibrate=calibrate,
    merge=merge,
    unmerge=unmerge,
    disabled=disabled,
    saved_weights=saved_weights,
    summary="a fixed sparse mask over every weight trains (FISH: Fisher, LT-SFT: most changed, or random)",
    paper="Sung et al. 2021, FISH mask, arXiv:2111.09839; Ansell et al. 2022, LT-SFT, arXiv:2110.07560",
)
