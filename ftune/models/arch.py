"""Where the attention and feed-forward sub-blocks sit in each supported architecture: the one table of names.

Methods that insert modules beside or after a sub-block (adapters, AdapterFusion, later prefixes and hybrids)
look the places up here instead of knowing model internals. Each entry gives, relative to one transformer block:
the module whose *input* is the sub-block's input, and the output projection whose *output* is the sub-block's
output just before the residual connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ftune.errors import MethodError


@dataclass(frozen=True)
class BlockLayout:
    attn_in: str
    """Module whose input is the attention sub-block's input (hidden states after any pre-norm)."""
    attn_out: str
    """Output projection of the attention sub-block (before the residual add)."""
    ffn_in: str
    """Module whose input is the feed-forward sub-block's input."""
    ffn_out: str
    """Output projection of the feed-forward sub-block (before the residual add)."""
    query_value: tuple[str, str] | None = None
    """The attention's query and value projections (LoRA's paper adapts these two); None where they are fused."""


_BERT = BlockLayout("attention.self", "attention.output.dense", "intermediate", "output.dense",
                    ("attention.self.query", "attention.self.value"))
_DECODER = BlockLayout("self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj", ("self_attn.q_proj", "self_attn.v_proj"))
LAYOUTS: dict[str, BlockLayout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "mpnet": BlockLayout("attention.attn", "attention.attn.o", "intermediate", "output.dense",
                         ("attention.attn.q", "attention.attn.v")),
    "llama": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "mistral": _DECODER,
    "gemma3": _DECODER,
    "gemma3_text": _DECODER,
    "gpt2": BlockLayout("attn", "attn.c_proj", "mlp", "mlp.c_proj"),
}


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks, found structurally: the longest ModuleList of identical module types.

    BERT's `encoder.layer`, Llama's `model.layers` and GPT-2's `h` all have this shape, without a name table.
    """
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise MethodError(f"{type(model).__name__} has no stack of transformer blocks (no uniform ModuleList)")
    return best


def block_layout(model: nn.Module) -> BlockLayout:
    """The layout of `model`'s blocks, or a MethodError naming the architecture and the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type not in LAYOUTS:
        raise MethodError(f"architecture {model_type!r} is not supported by this method; supported: {', '.join(LAYOUTS)}")
    return LAYOUTS[model_type]


def blocks_with_layout(model: nn.Module) -> tuple[nn.ModuleList, BlockLayout]:
    return transformer_blocks(model), block_layout(model)


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def first_input(args: tuple, kwargs: dict):
    """The hidden states a sub-block receives, passed positionally (most models) or as `hidden_states=`."""
    return args[0] if args else kwargs["hidden_states"]
