"""A sparse difference to pretrained weights, ΔW with k nonzero entries over many weights at once (sparse fine-tuning).

`SparseDelta` holds, for the n weights it adapts (each flattened and laid end to end, N entries in all), a trainable
`values` (k,) and a buffer `indices` (k,) of sorted positions in that concatenation. Each adapted weight is
parametrised (torch.nn.utils.parametrize) as W + scatter(values of its span), so every module keeps its interface
(`module.weight` is still a tensor) and weights tied across modules (GPT-2's embeddings and output layer) share one
difference. Only `values` trains, so the optimizer holds state for k entries and not for N.

Cost: each forward builds the dense W + ΔW of every adapted weight (zeros plus k scattered entries); under autograd the
layers keep those for backward, about one more copy of the adapted weights until the step's backward ends (no grad:
one weight at a time). A weight's entries in `indices` are found with two binary searches, cached until the buffer
changes (its version counter), so the forward does no host sync.

`probes` (calibration only): a dense zero tensor per weight, added in place of the sparse difference, whose gradient is
the loss gradient with respect to W (over every use of a tied weight), or which an optimizer moves (a short full
fine-tune). `merged`: ΔW is inside W (the parametrisation adds nothing); unmerge restores the k entries W had, bit
for bit. `enabled = False`: the base weights alone (the method's `disabled`).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils import parametrize


class SparseDelta(nn.Module):
    """k trainable entries over the concatenation of `weights` (N = Σ numel), all starting at zero (ΔW = 0).

    Args:
        weights: the adapted parameters, in a fixed order (their model order); each is parametrised by `attach_to`.
        k: number of trainable entries, 1 ≤ k ≤ N.
    """

    saved_buffers = ("indices",)
    """Buffers method.safetensors holds beside the trainable values (rundir.load_weights loads them)."""

    def __init__(self, weights: list[nn.Parameter], k: int) -> None:
        super().__init__()
        device = weights[0].device
        self.numels = [w.numel() for w in weights]
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.size = sum(self.numels)
        self.values = nn.Parameter(torch.zeros(k, device=device))  # fp32 even over a bf16 base: small steps survive
        self.register_buffer("indices", torch.arange(k, device=device))  # placeholder until a mask is chosen
        self.probes: list[torch.Tensor] | None = None
        self.merged, self.enabled = False, True
        self._kept: list[torch.Tensor] = []  # W's own values at the k entries while merged
        self._spans_key: tuple | None = None
        self._spans: list[tuple[int, int]] = []

    def set_indices(self, indices: torch.Tensor) -> None:
        """Take `indices` (k distinct positions in [0, N)) as the mask, sorted."""
        self.indices.copy_(torch.sort(indices.to(self.indices)).values)

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of each weight's entries in `indices`, recomputed when the buffer changed."""
        key = (self.indices.data_ptr(), self.indices._version)
        if key != self._spans_key:
            bounds = torch.tensor(self.offsets + [self.size], device=self.indices.device)
            cut = torch.searchsorted(self.indices, bounds).tolist()
            self._spans, self._spans_key = list(itertools.pairwise(cut)), key
        return self._spans

    def delta(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        """The dense ΔW of weight `slot`, shaped and typed like it (zeros but for its entries of the mask)."""
        start, end = self.spans()[slot]
        local = self.indices[start:end] - self.offsets[slot]
        flat = torch.zeros(like.numel(), device=like.device, dtype=self.values.dtype)
        return flat.index_put((local,), self.values[start:end]).view(like.shape).to(like.dtype)

    def merge(self, weights: list[nn.Parameter]) -> None:
        """W += ΔW at the k entries (fp32 sum, as the forward computes it), keeping W's own values there."""
        if self.merged:
            return
        with torch.no_grad():
            self._kept = []
            for slot, (w, (start, end)) in enumerate(zip(weights, self.spans())):
                local = self.indices[start:end] - self.offsets[slot]
                flat = w.data.view(-1)
                self._kept.append(flat[local].clone())
                flat[local] = (flat[local].float() + self.values[start:end]).to(w.dtype)
        self.merged = True

    def unmerge(self, weights: list[nn.Parameter]) -> None:
        """Put back the values W had at the k entries: exact."""
        if not self.merged:
            return
        with torch.no_grad():
            for slot, (w, (start, end), kept) in enumerate(zip(weights, self.spans(), self._kept)):
                w.data.view(-1)[self.indices[start:end] - self.offsets[slot]] = kept
        self._kept, self.merged = [], False


class SparseParametrization(nn.Module):
    """W -> W + ΔW of one weight (`slot`) of a `SparseDelta`, which it reads without owning (one owner: the model)."""

    def __init__(self, store: SparseDelta, slot: int) -> None:
        super().__init__()
        self.slot = slot
        object.__setattr__(self, "_store", store)  # not a submodule: `values` keeps one name

    @property
    def merged(self) -> bool:
        return self._store.merged

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        store = self._store
        if store.probes is not None:
            return weight + store.probes[self.slot].to(weight.dtype)
        if store.merged or not store.enabled:
            return weight
        return weight + store.delta(self.slot, weight)


def attach_to(model: nn.Module, body: nn.Module, k: int) -> SparseDelta:
    """Parametrise every parameter of `body` as W + ΔW, with one `SparseDelta` of k entries registered on `body` as
    `sparse_delta`. A parameter tied to a module outside `body` (an output layer sharing the input embeddings) gets
    the same difference there."""
    weights = list(dict.fromkeys(body.parameters()))  # model order, tied weights once
    store = SparseDelta(weights, k)
    slot_of = {id(w): i for i, w in enumerate(weights)}
    uses = [
        (m, n, slot_of[id(p)])
        for m in model.modules()
        for n, p in m.named_parameters(recurse=False)
        if id(p) in slot_of
    ]
    for module, name, slot in uses:
        parametrize.register_parametrization(module, name, SparseParametrization(store, slot), unsafe=True)
    body.add_module("sparse_delta", store)
    return store


def stores(model: nn.Module) -> list[SparseDelta]:
    return [m for m in model.modules() if isinstance(m, SparseDelta)]


def adapted_weights(model: nn.Module, store: SparseDelta) -> list[nn.Parameter]:
    """The base weights `store` adapts, by slot (each parametrisation's `original`)."""
    found: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if parametrize.is_parametrized(m):
            for plist in m.parametrizations.values():
                for p in plist:
                    if isinstance(p, SparseParametrization) and p._store is store:
                        found.setdefault(p.slot, plist.original)
    return [found[i] for i in range(len(found))]
