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
equivalent. A resumed or reloaded run reads its mask from its files and never recomputes it. The scores are computed
in ftune/layers/sparse_select.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ftune.errors import MethodError
from ftune.layers.sparse import SparseDelta, adapted_weights, attach_to, stores
from ftune.layers.sparse_select import LossFn, fisher_scores, moved_entries, random_positions
from ftune.methods import base


class Config(base.MethodConfig):
    name: Literal["sparse"] = "sparse"
    selection: Literal["fisher", "most_changed", "random"] = "fisher"
    """How the mask is chosen: squared gradients (FISH), the entries a short full fine-tune moved most (LT-SFT), or
    at random."""
    density: float = Field(0.005, gt=0, le=1)
    """Fraction of the body's parameters that train, in (0, 1]."""
    samples: int = Field(1024, gt=0)
    """fisher: training examples whose squared gradients are summed (at most every training row once)."""
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


def calibrate(model: nn.Module, cfg: Config, batches: Iterable[dict[str, torch.Tensor]], loss_fn: LossFn) -> None:
    """Choose the mask from `batches` (the training data, on the model's device) and `loss_fn` (sum, count)."""
    (store,) = stores(model)
    k = store.values.numel()
    if cfg.selection == "random":
        chosen = random_positions(store.size, k, store.indices.device)
    else:
        scores = (
            fisher_scores(model, store, batches, loss_fn, cfg.samples)
            if cfg.selection == "fisher"
            else moved_entries(model, store, batches, loss_fn, cfg.full_steps, cfg.full_lr)
        )
        chosen = torch.topk(scores, k, sorted=False).indices
    store.set_indices(chosen)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(store.indices, 0)  # one mask on every process, whatever rounding differed
    for p in model.parameters():
        p.grad = None


def saved_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The k values (and the head) plus each store's (k,) indices: what is needed to rebuild ΔW without data."""
    indices = {f"{name}.indices": m.indices for name, m in model.named_modules() if isinstance(m, SparseDelta)}
    return base.trainable_state_dict(model) | indices


def merge(model: nn.Module) -> None:
    for store in stores(model):
        store.merge(adapted_weights(model, store))


def unmerge(model: nn.Module) -> None:
    for store in stores(model):
        store.unmerge(adapted_weights(model, store))


def disabled(model: nn.Module) -> AbstractContextManager[None]:
    """The base weights alone: every adapted weight skips its difference."""
    return base.switched_off(stores(model))


METHOD = base.Method(
    name="sparse",
    config_cls=Config,
    trains=base.Trains.EXISTING,
    claims=frozenset({base.Claim.EVERY_WEIGHT}),
    apply=apply,
    trainable=trainable,
    disabled=disabled,
    merging=base.Merging(merge, unmerge),
    saving=base.Saving(saved_weights),
    hooks=base.Hooks(calibrate=calibrate),
    about=base.About(
        "a fixed sparse mask over every weight trains (FISH: Fisher, LT-SFT: most changed, or random)",
        "Sung et al. 2021, FISH mask, arXiv:2111.09839; Ansell et al. 2022, LT-SFT, arXiv:2110.07560",
        base.Recommended(
            5e-4,
            "LoRA's rate at a like number of trained values; sparse_fisher_sst2 at 1e-4 trailed "
            "LoRA (README) and a tiny model barely moved in 40 steps (tests/test_learns.py)",
        ),
    ),
)
