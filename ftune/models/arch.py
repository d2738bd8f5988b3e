"""Where the attention and feed-forward sub-blocks sit in each supported architecture: the one table of names.

Methods that insert modules beside or after a sub-block (adapters, AdapterFusion, later prefixes and hybrids)
look the places up here instead of knowing model internals. Each entry gives, relative to one transformer block:
the module whose *input* is the sub-block's input, and the output projection whose *output* is the sub-block's
output just before the residual connection.

Encoder-decoder models (T5, BART) have two stacks of blocks, each with its own layout (`SEQ2SEQ_LAYOUTS`): encoder
blocks hold self-attention and a feed-forward block; decoder blocks also a cross-attention over the encoder's output
(`cross_in`, `cross_out`, `cross_query_value`). `block_stacks` gives every stack with its layout, for any supported
model; `blocks_with_layout` serves methods written for one stack and refuses an encoder-decoder model by name.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

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
    cross_in: str | None = None
    """Decoder blocks of encoder-decoder models: the cross-attention module (its input: the decoder's hidden states)."""
    cross_out: str | None = None
    """Output projection of the cross-attention sub-block."""
    cross_query_value: tuple[str, str] | None = None
    """The cross-attention's query and value projections."""


_BERT = BlockLayout(
    "attention.self",
    "attention.output.dense",
    "intermediate",
    "output.dense",
    ("attention.self.query", "attention.self.value"),
)
_DECODER = BlockLayout(
    "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj", ("self_attn.q_proj", "self_attn.v_proj")
)
LAYOUTS: dict[str, BlockLayout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "mpnet": BlockLayout(
        "attention.attn", "attention.attn.o", "intermediate", "output.dense", ("attention.attn.q", "attention.attn.v")
    ),
    "llama": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "mistral": _DECODER,
    "gemma3": _DECODER,
    "gemma3_text": _DECODER,
    "gpt2": BlockLayout("attn", "attn.c_proj", "mlp", "mlp.c_proj"),
}

# T5 (pre-norm): block.layer = [self-attention, (cross-attention,) feed-forward]. The FFN's output is the whole
# `DenseReluDense` module's (ReLU and gated variants alike), not `wo`'s: T5 reads `wo.weight` to cast its input, which
# an adapter wrapped around `wo` would hide. BART (post-norm): fairseq's names.
_T5_SELF = ("layer.0.SelfAttention", "layer.0.SelfAttention.o")
_T5_QV = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.v")
_T5_CROSS = (
    "layer.1.EncDecAttention",
    "layer.1.EncDecAttention.o",
    ("layer.1.EncDecAttention.q", "layer.1.EncDecAttention.v"),
)
_T5 = (
    BlockLayout(*_T5_SELF, "layer.1.DenseReluDense", "layer.1.DenseReluDense", _T5_QV),
    BlockLayout(*_T5_SELF, "layer.2.DenseReluDense", "layer.2.DenseReluDense", _T5_QV, *_T5_CROSS),
)
_BART_ENCODER = BlockLayout("self_attn", "self_attn.out_proj", "fc1", "fc2", ("self_attn.q_proj", "self_attn.v_proj"))
_BART = (
    _BART_ENCODER,
    BlockLayout(
        *astuple(_BART_ENCODER)[:5],
        "encoder_attn",
        "encoder_attn.out_proj",
        ("encoder_attn.q_proj", "encoder_attn.v_proj"),
    ),
)
SEQ2SEQ_LAYOUTS: dict[str, tuple[BlockLayout, BlockLayout]] = {"t5": _T5, "mt5": _T5, "bart": _BART}
"""Encoder-decoder architectures: (encoder block layout, decoder block layout)."""


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def hidden_size(model: nn.Module) -> int:
    """The width d of the hidden states between blocks (GPT-2's config calls it n_embd)."""
    return getattr(model.config, "hidden_size", None) or model.config.n_embd


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks, found structurally: the longest ModuleList of identical module types.

    BERT's `encoder.layer`, Llama's `model.layers` and GPT-2's `h` all have this shape, without a name table. An
    encoder-decoder model's output side is its decoder: the decoder's blocks (e.g. `layers.top_k` counts from there).
    """
    if is_encoder_decoder(model):
        return _uniform_stack(model.get_decoder())
    return _uniform_stack(model)


def _uniform_stack(model: nn.Module) -> nn.ModuleList:
    best: nn.ModuleList | None = None
    for module in model.modules():
        uniform = isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
        if uniform and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise MethodError(f"{type(model).__name__} has no stack of transformer blocks (no uniform ModuleList)")
    return best


def block_layout(model: nn.Module) -> BlockLayout:
    """The layout of `model`'s blocks, or a MethodError naming the architecture and the supported ones."""
    model_type = _model_type(model)
    if model_type in SEQ2SEQ_LAYOUTS:
        raise MethodError(
            f"{model_type} is an encoder-decoder model, and this method supports models with one stack "
            f"of blocks ({', '.join(LAYOUTS)})"
        )
    if model_type not in LAYOUTS:
        supported = ", ".join([*LAYOUTS, *SEQ2SEQ_LAYOUTS])
        raise MethodError(f"architecture {model_type!r} is not supported by this method; supported: {supported}")
    return LAYOUTS[model_type]


def blocks_with_layout(model: nn.Module) -> tuple[nn.ModuleList, BlockLayout]:
    """The one stack of a single-stack model and its layout (MethodError for an encoder-decoder model)."""
    return transformer_blocks(model), block_layout(model)


def block_stacks(model: nn.Module) -> list[tuple[nn.ModuleList, BlockLayout]]:
    """Every stack of blocks with its layout, input side first: [(blocks, layout)] for an encoder or a decoder,
    [(encoder blocks, encoder layout), (decoder blocks, decoder layout)] for an encoder-decoder model."""
    model_type = _model_type(model)
    if model_type in SEQ2SEQ_LAYOUTS:
        encoder, decoder = SEQ2SEQ_LAYOUTS[model_type]
        return [(_uniform_stack(model.get_encoder()), encoder), (_uniform_stack(model.get_decoder()), decoder)]
    return [blocks_with_layout(model)]


def block_norms(model: nn.Module) -> list[nn.Module]:
    """The layer norms inside the blocks (by class name, as `layers.module_types`), which Houlsby also trains."""
    return [
        m
        for blocks, _ in block_stacks(model)
        for block in blocks
        for m in block.modules()
        if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
    ]


def attention_sites(layout: BlockLayout) -> list[tuple[str, tuple[str, str] | None]]:
    """(attention module, its query/value projections) of one block: self-attention, and cross-attention if any."""
    sites = [(layout.attn_in, layout.query_value)]
    return sites + ([(layout.cross_in, layout.cross_query_value)] if layout.cross_in else [])


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def first_input(args: tuple, kwargs: dict):
    """The hidden states a sub-block receives, passed positionally (most models) or as `hidden_states=`."""
    return args[0] if args else kwargs["hidden_states"]
