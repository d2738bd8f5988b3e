"""A model's stacks of transformer blocks as its config counts them: dropping blocks while keeping the config, the
attention caches' layer numbers and the config's per-layer lists in step, and the forward FLOPs the blocks cost.

Progressive shrinking (ftune/methods/shrink.py) drops blocks through here. A single-stack model (BERT, Llama, GPT-2,
...) has one stack, counted by `num_hidden_layers`. An encoder-decoder model has two, each counted under its own
config key (`ENCODER_DECODER_COUNTS`); T5's stacks also carry a copy of the config each. A model whose shrunk form is
saved and reloaded by `AutoModelFor*` must find the same blocks there: the kept blocks become 0..k-1, every attention
module's `layer_idx` (its slot in a key/value cache) follows, and each per-layer config list (`PER_LAYER_KEYS`, e.g.
Qwen's and Gemma's `layer_types`) keeps the kept blocks' entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from ftune.errors import MethodError
from ftune.models.arch import block_stacks, is_encoder_decoder, transformer_blocks

ENCODER_DECODER_COUNTS = {
    "t5": ("num_layers", "num_decoder_layers"),
    "mt5": ("num_layers", "num_decoder_layers"),
    "bart": ("encoder_layers", "decoder_layers"),
}
"""Encoder-decoder architectures: the config keys counting (encoder blocks, decoder blocks)."""
PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "kv_sharing_modes", "no_rope_layers")
"""Config lists with one entry per block of a single-stack model (transformers' names)."""


@dataclass
class Depth:
    """What must follow a stack's block count: (config, key) pairs holding the count, and the per-layer config
    lists as they were before any block was dropped, by key: (config, list)."""

    counts: list[tuple[Any, str]]
    per_layer: dict[str, tuple[Any, list]] = field(default_factory=dict)


@dataclass
class Stack:
    """One stack of blocks: the ModuleList, where it hangs (`owner.<attr>`), and its `Depth`."""

    blocks: nn.ModuleList
    owner: nn.Module
    attr: str
    depth: Depth


def stacks(model: nn.Module) -> list[Stack]:
    """Every stack of blocks of `model`, input side first (MethodError for an encoder-decoder model whose config
    keys are unknown)."""
    if not is_encoder_decoder(model):
        blocks = transformer_blocks(model)
        lists = {
            key: (model.config, list(value))
            for key in PER_LAYER_KEYS
            if isinstance(value := getattr(model.config, key, None), list) and len(value) == len(blocks)
        }
        return [_stack(model, blocks, Depth([(model.config, "num_hidden_layers")], lists))]
    model_type = model.config.model_type
    if model_type not in ENCODER_DECODER_COUNTS:
        raise MethodError(
            f"shrink: {model_type} is an encoder-decoder model whose block counts ftune does not know; "
            f"supported: {', '.join(ENCODER_DECODER_COUNTS)} and single-stack models"
        )
    found = []
    sides = (model.get_encoder(), model.get_decoder())
    for side, key, (blocks, _) in zip(sides, ENCODER_DECODER_COUNTS[model_type], block_stacks(model)):
        counts = [(model.config, key)]
        if getattr(side, "config", model.config) is not model.config:  # T5: each stack has its own copy
            counts.append((side.config, "num_hidden_layers"))
        found.append(_stack(model, blocks, Depth(counts)))
    return found


def _stack(model: nn.Module, blocks: nn.ModuleList, depth: Depth) -> Stack:
    name = next(n for n, m in model.named_modules() if m is blocks)
    owner, _, attr = name.rpartition(".")
    return Stack(blocks, model.get_submodule(owner) if owner else model, attr, depth)


def check_droppable(blocks: list[nn.Module], dropped: list[int], field_name: str) -> None:
    """Refuse dropping a block that others read from: T5's first block holds the relative position bias."""
    for i in dropped:
        if any(getattr(m, "has_relative_attention_bias", False) for m in blocks[i].modules()):
            raise MethodError(
                f"{field_name}: block {i} holds the relative position bias every other block of its "
                "stack reads; keep it"
            )


def renumber(kept_blocks: list[nn.Module], kept: list[int], depth: Depth) -> None:
    """Make the config and the cache slots describe `kept_blocks`, the blocks of original indices `kept`, in order."""
    for new, block in enumerate(kept_blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    for config, key in depth.counts:
        setattr(config, key, len(kept))
    for key, (config, original) in depth.per_layer.items():
        setattr(config, key, [original[i] for i in kept])


def remove(stack: Stack, dropped: list[int]) -> None:
    """Drop the blocks `dropped` (original indices) from the stack for good; the rest become 0..k-1."""
    kept = sorted(set(range(len(stack.blocks))) - set(dropped))
    renumber([stack.blocks[i] for i in kept], kept, stack.depth)
    for i in sorted(dropped, reverse=True):
        del stack.blocks[i]  # ModuleList re-keys the rest in order


def linear_weights(module: nn.Module) -> int:
    """Weights a token is multiplied by in `module`: every 2-D parameter outside embedding tables (linears, GPT-2's
    Conv1D, an output layer even when tied to the input embeddings)."""
    return sum(
        p.numel()
        for m in module.modules()
        if not isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
        if p.dim() == 2
    )


def forward_flops_per_token(model: nn.Module, found: list[Stack], blocks_per_stack: list[int], n_ctx: int) -> float:
    """Forward FLOPs per token with `blocks_per_stack[s]` blocks in stack s, after Kaplan et al. 2020 ("Scaling
    Laws for Neural Language Models", arXiv:2001.08361, Table 1): 2 × each weight a token passes through, plus
    2 × n_ctx × d_model per block for the attention scores and their weighted sum. Blocks of a stack are taken to
    be alike (the first one is measured); embedding lookups, norms, softmax, cross-attention scores and padding are
    left out."""
    config = model.config
    d_model = getattr(config, "hidden_size", None) or config.d_model
    in_blocks = sum(linear_weights(block) for stack in found for block in stack.blocks.children())
    flops = 2.0 * (linear_weights(model) - in_blocks)
    for stack, count in zip(found, blocks_per_stack):
        first = next(iter(stack.blocks.children()))
        flops += count * (2.0 * linear_weights(first) + 2.0 * n_ctx * d_model)
    return flops


def estimate(
    model: nn.Module, found: list[Stack], before: list[int], after: list[int], n_ctx: int
) -> tuple[int, int, float]:
    """(parameters with `before[s]` blocks in stack s, parameters with `after[s]`, forward FLOPs ratio) for `model`,
    whose stacks hold `len(stack.blocks)` blocks now; blocks of a stack are taken to be alike."""
    now = sum(p.numel() for p in model.parameters())
    per_block = [sum(p.numel() for p in next(iter(s.blocks.children())).parameters()) for s in found]
    present = [len(list(s.blocks.children())) for s in found]
    params = [now + sum(b * (c - p) for b, c, p in zip(per_block, counts, present)) for counts in (before, after)]
    ratio = forward_flops_per_token(model, found, before, n_ctx) / forward_flops_per_token(model, found, after, n_ctx)
    return params[0], params[1], ratio


def blocks_to_drop(drop: str, k: int | None, listed: Sequence[int], n: int, owner: str) -> list[int]:
    """The blocks `drop` ("top-k", "every-other", "list") removes from a stack of `n`, in removal order: the top k;
    the top k of the odd blocks; `listed` as given (k None: n // 2). MethodError, naming `<owner>.k` or
    `<owner>.blocks`, when they do not fit the stack or would leave no block."""
    if drop != "list" and (k or n // 2) == 0:
        raise MethodError(f"{owner}.k: this model's stack has {n} block, none to spare")
    if drop == "top-k":
        if (k or n // 2) >= n:
            raise MethodError(f"{owner}.k: dropping {k} of this model's {n} blocks leaves none; drop at most {n - 1}")
        return list(range(n - 1, n - 1 - (k or n // 2), -1))
    if drop == "every-other":
        odd = list(range(n - 1 if n % 2 == 0 else n - 2, 0, -2))
        if (k or 0) > len(odd):
            raise MethodError(f"{owner}.k: every-other drops odd blocks, and this model's {n} blocks have {len(odd)}")
        return odd[: k or len(odd)]
    if missing := [i for i in listed if i >= n]:
        raise MethodError(f"{owner}.blocks: block {missing[0]} does not exist; this model's blocks are 0..{n - 1}")
    if len(listed) == n:
        raise MethodError(f"{owner}.blocks: all {n} blocks would be dropped; keep at least one")
    return list(listed)


# the `shrink` method's `schedule: {start, end}`: from when to when `removal_steps` spreads the removals
class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    start: int | float
    """First removal: after this optimizer step (an integer ≥ 1), or this fraction of the run (a float in (0, 1])."""
    end: int | float
    """Last removal, likewise; at most the run's last step."""

    @field_validator("start", "end")
    @classmethod
    def _step_or_fraction(cls, value: float) -> float:
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"{value} is a fraction of the run, which lies in (0, 1]; give a step as a whole number")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value}: steps count from 1, the first optimizer step")
        return value

    def steps(self, total_steps: int) -> tuple[int, int]:
        """(start, end) as optimizer steps of a run of `total_steps`."""
        return tuple(p if isinstance(p, int) else max(1, round(p * total_steps)) for p in (self.start, self.end))


def removal_steps(start: int, end: int, m: int) -> list[int]:
    """After which optimizer step each of `m` removals comes: start + round(j (end - start) / (m - 1)) for
    j = 0..m-1, rounded half up (one removal: after `start`)."""
    return [start + (2 * j * (end - start) + m - 1) // (2 * (m - 1)) if m > 1 else start for j in range(m)]


def describe(model: nn.Module, base_config, dropped_of: Callable[[int], list[int]], when: str, n_ctx: int) -> list[str]:
    """Lines for `ftune validate`: per stack the blocks kept of the base model's (`base_config`, unshrunk) and the
    blocks `dropped_of(n)` drops, `when`; the parameters before and after; the FLOPs ratio at `n_ctx`."""
    found = stacks(model)
    before = [getattr(base_config, stack.depth.counts[0][1]) for stack in found]
    orders = [dropped_of(n) for n in before]
    lines = [
        f"shrink: {n} -> {n - len(o)} blocks (drops {', '.join(map(str, o))}, {when})" for n, o in zip(before, orders)
    ]
    after = [n - len(o) for n, o in zip(before, orders)]
    params_before, params_after, speedup = estimate(model, found, before, after, n_ctx)
    assumes = (
        "2 x weights + 2 n_ctx d_model per block, Kaplan et al. 2020; no embeddings, norms, softmax or padding; "
        "small batches gain less"
    )
    return [
        *lines,
        f"parameters: {params_before:,} unshrunk -> {params_after:,} shrunk",
        f"speed-up estimate: {speedup:.2f}x fewer forward FLOPs per token at data.max_length = {n_ctx} ({assumes})",
    ]
