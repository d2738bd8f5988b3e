"""UniPELT's gates: a learned scalar per row that scales one sub-module's contribution (Mao et al. 2022, §3.2),
and how they go into a model with LoRA layers, adapters and prefixes (ftune/methods/unipelt.py is the method).

Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning", arXiv:2110.07577.
From the sub-module's input h (B, T, d): g = mean over the row's real tokens of sigmoid(w·h_t + b), shape (B, 1, 1),
so it broadcasts over a (B, T, d) output. w (d,) and b start as BERT's initialiser (N(0, 0.02), zero), which the
reference code applies to every gate, so each gate starts near 0.5.

"Real tokens": the reference averages over every position, padding included, so a row's gate (and output) depends
on how far its batch was padded. Here the mean runs over the positions the attention mask marks real, which keeps a
padded row's output equal to its output alone. The mask is handed over per call (`token_mask`, (B, T)) by a model
forward pre-hook; without one (None, or a shape that does not match h) every position counts.

`forced` pins the gate to a constant (1: the sub-module as it is without a gate, 0: switched off) for tests and
analysis (`force`). In eval mode each call adds its gate values over real tokens to `value_sum` / `tokens`, which the
method's report averages; they restart when an evaluation follows training.
"""

from __future__ import annotations

import torch
from torch import nn

from ftune.layers.bottleneck import AdapterAt
from ftune.layers.lora import LoRALinear
from ftune.layers.soft_prompts import PrefixedModel
from ftune.models.arch import blocks_with_layout, first_input


class Gate(nn.Module):
    """h (B, T, d) -> g (B, 1, 1) in (0, 1): the mean over real tokens of sigmoid(Linear(d, 1)(h))."""

    def __init__(self, d: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 1, device=device)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)
        self.forced: float | None = None
        self.token_mask: torch.Tensor | None = None
        self.value_sum, self.tokens = 0.0, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mask = self.token_mask
        if mask is None or mask.shape != h.shape[:2]:
            mask = torch.ones(h.shape[:2], device=h.device)
        counts = mask.sum(1)  # (B,)
        if self.forced is not None:
            gate = torch.full(counts.shape, float(self.forced), device=h.device)
        else:
            per_token = torch.sigmoid(self.linear(h.to(self.linear.weight.dtype))).squeeze(-1)  # (B, T)
            gate = (per_token * mask.to(per_token.dtype)).sum(1) / counts.clamp(min=1).to(per_token.dtype)
        if not self.training:
            self.value_sum += float((gate.detach().double() * counts.double()).sum())
            self.tokens += int(counts.sum())
        return gate.view(-1, 1, 1)

    def restart(self) -> None:
        """Forget the summed gate values (an evaluation begins)."""
        self.value_sum, self.tokens = 0.0, 0

    def mean(self) -> float | None:
        """The mean gate value over the real tokens seen since `restart`; None when none were seen."""
        return round(self.value_sum / self.tokens, 6) if self.tokens else None


def gates_by_block(model: nn.Module) -> list[dict[str, Gate]]:
    """Each block's gates by report name: lora.<path in the block>, adapter.<path>, prefix."""
    blocks, layout = blocks_with_layout(model)
    rows = []
    for block in blocks:
        row = {f"{kind}.{path}": m.gate for path, m in block.named_modules()
               for kind, owner in (("lora", LoRALinear), ("adapter", AdapterAt))
               if isinstance(m, owner) and m.gate is not None}
        prefix = getattr(block.get_submodule(layout.attn_in), "prefix_gate", None)
        rows.append(row | ({"prefix": prefix} if prefix is not None else {}))
    return rows


def add_gates(model: PrefixedModel) -> PrefixedModel:
    """Gate every LoRA layer, adapter and per-layer prefix of `model`, a PrefixedModel around a model with LoRA
    layers and adapters. Each attention gets a `prefix_gate` and a pre-hook that scales its layer's cache entry (just
    the prefix at that time); the model gets a pre-hook that hands the attention mask to every gate."""
    from ftune.methods.adapter import hidden_size  # not at the top: the method registry imports this module

    device = next(model.parameters()).device
    for m in list(model.modules()):
        if isinstance(m, LoRALinear):
            m.gate = Gate(m.base_layer.in_features, device)
        elif isinstance(m, AdapterAt):
            m.gate = Gate(m.adapter.down.in_features, device)
    blocks, layout = blocks_with_layout(model)
    for layer, block in enumerate(blocks):
        attention = block.get_submodule(layout.attn_in)
        attention.prefix_gate = Gate(hidden_size(model), device)

        def scale_prefix(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
            if model.cache is not None:  # None: prefixes switched off
                entry = model.cache.layers[layer]
                g = module.prefix_gate(first_input(args, kwargs)).view(-1, 1, 1, 1).to(entry.keys.dtype)
                entry.keys, entry.values = entry.keys * g, entry.values * g

        attention.register_forward_pre_hook(scale_prefix, with_kwargs=True)
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    last = {"training": True}

    def hand_over_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        restart, last["training"] = not module.training and last["training"], module.training  # eval starts
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        for gate in gates:
            gate.token_mask = mask
            if restart:
                gate.restart()

    model.register_forward_pre_hook(hand_over_mask, with_kwargs=True)
    return model


def force(model: nn.Module, lora: float | None = None, adapter: float | None = None, prefix: float | None = None):
    """Pin each kind of gate to 0 or 1, or (None) let it compute. A prefix pinned to 0 is taken out of the attention
    (`PrefixedModel.prefixes_on`), since keys scaled to zero would still draw softmax weight."""
    for row in gates_by_block(model):
        for name, gate in row.items():
            gate.forced = {"lora": lora, "adapter": adapter, "prefix": prefix}[name.split(".")[0]]
    next(m for m in model.modules() if isinstance(m, PrefixedModel)).prefixes_on = prefix != 0
