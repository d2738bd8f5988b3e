"""UniPELT's gates: a learned scalar per row that scales one sub-module's contribution (Mao et al. 2022, §3.2),
and how they go into a model with LoRA layers, adapters and prefixes (ftune/methods/unipelt.py is the method).

Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning", arXiv:2110.07577.
From the sub-module's input h (B, T, d): g = mean over the row's real tokens of sigmoid(w·h_t + b), shape (B, 1, 1),
so it broadcasts over a (B, T, d) output. w (d,) and b start as BERT's initialiser (N(0, 0.02), zero), which the
reference code applies to every gate, so each gate starts near 0.5.

"Real tokens": the reference averages over every position, padding included, so a row's gate (and output) depends
on how far its batch was padded. Here the mean runs over the positions the attention mask marks real, which keeps a
padded row's output equal to its output alone. The mask is handed over per call (`token_mask`, (B, T)) by a forward
pre-hook per stack (ftune/layers/token_masks.py); without one (None, or a shape that does not match h) every
position counts.

Encoder-decoder models (T5, BART): the encoder's gates are the above over the real source tokens. In the decoder a
mean over the target's tokens would let each position see later ones, and generation (one token per step, earlier
keys and values cached) could not compute it; so
- each LoRA layer and adapter in a decoder block gates per position (`per_position`): g_t = sigmoid(w·h_t + b),
  (B, T, 1), which a generation step computes for its own token as the full forward does;
- the prefixes of the decoder's self-attention and of the cross-attention are gated per row from the encoder's
  output (the mean over real source tokens), which is known in full before the first decoding step; the prefixes
  go into the decoder's cache scaled, once, and later steps reuse them.
The encoder's self-attention prefixes are gated from that attention's input, as in a single-stack model. For the
report a decoder's per-position gate counts every position it sees (a seq2seq batch has no decoder mask to hand
over): the target's, or the source's, padding included, for LoRA on the cross-attention's keys and values.

`forced` pins the gate to a constant (1: the sub-module as it is without a gate, 0: switched off) for tests and
analysis (`force`). In eval mode each call adds its gate values over real tokens to `value_sum` / `tokens`, which the
method's report averages; they restart when an evaluation follows training.
"""

from __future__ import annotations

import torch
from torch import nn

from ftune.layers.bottleneck import AdapterAt
from ftune.layers.lora import LoRALinear
from ftune.layers.soft_prompts import CACHE_KEYWORDS, PrefixedModel
from ftune.layers.token_masks import hand_over_masks, real_tokens
from ftune.models.arch import block_stacks, first_input, hidden_size, is_encoder_decoder


class Gate(nn.Module):
    """h (B, T, d) -> g (B, 1, 1) in (0, 1): the mean over real tokens of sigmoid(Linear(d, 1)(h)); with
    `per_position`, g (B, T, 1): sigmoid(Linear(d, 1)(h_t)) for each position."""

    def __init__(self, d: int, device: torch.device | None = None, per_position: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 1, device=device)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)
        self.per_position = per_position
        self.forced: float | None = None
        self.token_mask: torch.Tensor | None = None
        self.value_sum, self.tokens = 0.0, 0

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, T): h's real tokens; default the handed-over `token_mask`."""
        mask = self.token_mask if mask is None else mask
        if mask is None or mask.shape != h.shape[:2]:
            mask = torch.ones(h.shape[:2], device=h.device)
        if self.forced is not None:
            values = torch.full(h.shape[:2], float(self.forced), device=h.device)
        else:
            values = torch.sigmoid(self.linear(h.to(self.linear.weight.dtype))).squeeze(-1)  # (B, T)
        real = mask.to(values.dtype)
        if not self.training:
            self.value_sum += float((values.detach().double() * real.double()).sum())
            self.tokens += int(real.sum())
        if self.per_position:
            return values.unsqueeze(-1)
        return ((values * real).sum(1) / real.sum(1).clamp(min=1)).view(-1, 1, 1)

    def restart(self) -> None:
        """Forget the summed gate values (an evaluation begins)."""
        self.value_sum, self.tokens = 0.0, 0

    def mean(self) -> float | None:
        """The mean gate value over the real tokens seen since `restart`; None when none were seen."""
        return round(self.value_sum / self.tokens, 6) if self.tokens else None


def gates_by_block(model: nn.Module) -> list[dict[str, Gate]]:
    """Each block's gates by report name: lora.<path in the block>, adapter.<path>, prefix (self-attention),
    prefix.cross (a decoder block's cross-attention); an encoder-decoder model's encoder blocks come first."""
    rows = []
    for blocks, layout in block_stacks(model):
        for block in blocks:
            row = {
                f"{kind}.{path}": m.gate
                for path, m in block.named_modules()
                for kind, owner in (("lora", LoRALinear), ("adapter", AdapterAt))
                if isinstance(m, owner) and m.gate is not None
            }
            for name, path in (("prefix", layout.attn_in), ("prefix.cross", layout.cross_in)):
                gate = getattr(block.get_submodule(path), "prefix_gate", None) if path else None
                if gate is not None:
                    row[name] = gate
            rows.append(row)
    return rows


def add_gates(model: PrefixedModel) -> PrefixedModel:
    """Gate every LoRA layer, adapter and per-layer prefix of `model`, a PrefixedModel around a model with LoRA
    layers and adapters (see the module docstring for an encoder-decoder model's decoder); a prefix's gate is the
    `prefix_gate` of its attention. Each stack hands its attention mask to its gates (ftune/layers/token_masks.py)."""
    device, d = next(model.parameters()).device, hidden_size(model)
    seq2seq = is_encoder_decoder(model)
    in_decoder = {id(m) for m in block_stacks(model)[-1][0].modules()} if seq2seq else set()
    for m in list(model.modules()):
        if isinstance(m, (LoRALinear, AdapterAt)):
            width = m.base_layer.in_features if isinstance(m, LoRALinear) else m.adapter.down.in_features
            m.gate = Gate(width, device, per_position=id(m) in in_decoder)
    (_gate_seq2seq_prefixes if seq2seq else _gate_prefixes)(model, d, device)
    hand_over_masks(model, Gate)
    return model


def _scale(entry, gate: torch.Tensor) -> None:
    """Scale one layer's cached prefix keys and values (B, heads, n, head_dim) by a gate (B, 1, 1)."""
    g = gate.view(-1, 1, 1, 1).to(entry.keys.dtype)
    entry.keys, entry.values = entry.keys * g, entry.values * g


def _gate_prefixes(model: PrefixedModel, d: int, device: torch.device) -> None:
    """One stack: a pre-hook on each attention scales its layer's cache entry (just the prefix at that time)."""
    [(blocks, layout)] = block_stacks(model)
    for layer, block in enumerate(blocks):
        attention = block.get_submodule(layout.attn_in)
        attention.prefix_gate = Gate(d, device)

        def scale_prefix(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
            if model.cache is not None:  # None: prefixes switched off
                _scale(model.cache.layers[layer], module.prefix_gate(first_input(args, kwargs)))

        attention.register_forward_pre_hook(scale_prefix, with_kwargs=True)


def _gate_seq2seq_prefixes(model: PrefixedModel, d: int, device: torch.device) -> None:
    """Encoder and decoder (ftune/layers/seq2seq_prefixes.py puts the prefixes in; this scales them)."""
    (encoder, enc_layout), (decoder, dec_layout) = block_stacks(model)
    if model.sites == "all":  # the encoder's prefixes arrive as a one-layer cache in the attention's keywords
        for block in encoder:
            attention = block.get_submodule(enc_layout.attn_in)
            attention.prefix_gate = Gate(d, device)
            attention.register_forward_pre_hook(_scale_encoder_prefix, with_kwargs=True)
    paths = [dec_layout.attn_in] + ([dec_layout.cross_in] if model.sites == "all" else [])
    gates = [[Gate(d, device) for _ in paths] for _ in decoder]
    for block, own in zip(decoder, gates):
        for path, gate in zip(paths, own):
            block.get_submodule(path).prefix_gate = gate

    def scale_decoder_prefixes(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = model.cache  # set while its entries hold just the prefixes: a forward, or generate's first step
        if cache is None:
            return
        source, mask = kwargs["encoder_hidden_states"], kwargs.get("encoder_attention_mask")
        if mask is None:  # given explicitly: the gate's handed-over mask is the decoder's
            mask = torch.ones(source.shape[:2], device=source.device)
        mask = real_tokens(mask, source.shape[1])
        for layer, own in enumerate(gates):
            for gate, entries in zip(own, (cache.self_attention_cache, cache.cross_attention_cache)):
                _scale(entries.layers[layer], gate(source, mask))

    model.get_decoder().register_forward_pre_hook(scale_decoder_prefixes, with_kwargs=True)


def _scale_encoder_prefix(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)
    if cache is not None:  # None: prefixes switched off (the encoder takes no cache of its own)
        _scale(cache.layers[module.layer_idx], module.prefix_gate(first_input(args, kwargs)))


def force(model: nn.Module, lora: float | None = None, adapter: float | None = None, prefix: float | None = None):
    """Pin each kind of gate to 0 or 1, or (None) let it compute. A prefix pinned to 0 is taken out of the attention
    (`PrefixedModel.prefixes_on`), since keys scaled to zero would still draw softmax weight."""
    for row in gates_by_block(model):
        for name, gate in row.items():
            gate.forced = {"lora": lora, "adapter": adapter, "prefix": prefix}[name.split(".")[0]]
    next(m for m in model.modules() if isinstance(m, PrefixedModel)).prefixes_on = prefix != 0
