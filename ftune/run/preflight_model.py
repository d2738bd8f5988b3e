"""The model against the data, checked before the run directory is written (ftune/run/preflight.py runs these):
positions (data.max_length and a soft prompt's virtual tokens against a learned position table) and the vocabulary
(the tokenizer's and the encoded rows' ids against the input embedding). What each refuses and warns about is told
in ftune/run/preflight.py's docstring."""

from __future__ import annotations

from typing import Any

from torch import nn

from ftune.errors import ModelError, RecipeError

POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")
"""Names of the learned absolute position tables (nn.Embedding) of transformers' models."""


def positions(recipe, model: nn.Module) -> list[str]:
    """Refuse a length past a learned position table (RecipeError); warnings (lines) for a length past a rotary
    model's max_position_embeddings."""
    from ftune.models.arch import is_encoder_decoder

    d, seq2seq = recipe.data, is_encoder_decoder(model)
    encoder_extra, decoder_extra = virtual_tokens(model)
    tables = position_limits(model)
    for name, limit in tables.items():
        on_decoder = seq2seq and "decoder" in name.split(".")
        field, length, extra = (
            ("data.max_target_length", d.max_target_length, decoder_extra)
            if on_decoder
            else ("data.max_length", d.max_length, encoder_extra)
        )
        if length + extra > limit:
            virtual = f" + {extra} virtual tokens of method {_method_name(recipe)}" if extra else ""
            fix = f"set {field} to at most {limit - extra}" if limit > extra else "use fewer virtual tokens"
            table = ".".join(name.split(".")[-2:])  # without the path of a wrapper around the model
            raise RecipeError(
                f"{field}: {length} tokens{virtual} exceed the {limit} positions of the model's "
                f"learned position embeddings ({table}); {fix}"
            )
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    trained_at = getattr(config, "max_position_embeddings", None)
    length = d.max_length + encoder_extra
    if tables or not isinstance(trained_at, int) or seq2seq or length <= trained_at:
        return []
    return [
        (
            f"data.max_length: {length} tokens run past the {trained_at} positions the model was trained at "
            "(config max_position_embeddings); it computes them, but quality past that length may suffer"
        )
    ]


def position_limits(model: nn.Module) -> dict[str, int]:
    """{module name: positions it holds} of every learned absolute position table in `model`."""
    config = getattr(model, "config", None)
    if getattr(config, "position_embedding_type", "absolute") != "absolute":  # BERT's relative_key variants
        return {}
    limits = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in POSITION_TABLES:
            if getattr(module, "offset", None) is not None:  # BART, OPT: ids shifted by 2
                limits[name] = module.num_embeddings - module.offset
            elif module.padding_idx is not None:  # RoBERTa, XLM-R: positions count from padding_idx + 1
                limits[name] = module.num_embeddings - module.padding_idx - 1
            else:
                limits[name] = module.num_embeddings
    return limits


def virtual_tokens(model: nn.Module) -> tuple[int, int]:
    """(encoder side, decoder side) positions a soft-prompt method adds in front of the caller's tokens
    (ftune/layers/soft_prompts.py): PromptedModel's n virtual tokens before the input (or the encoder's input) take
    positions 0..n-1; PrefixedModel's n key/value prefixes start the positions at n; EncoderDecoderPrefixes does
    that in the decoder only (the encoder's positions are unchanged)."""
    from ftune.layers.seq2seq_prefixes import EncoderDecoderPrefixes
    from ftune.layers.soft_prompts import PrefixedModel, PromptedModel

    encoder = decoder = 0
    for module in model.modules():
        if isinstance(module, PromptedModel | PrefixedModel):
            n = module.produced().shape[-2]  # (n, width), or a bank of prompts (tasks, n, width)
            if isinstance(module, EncoderDecoderPrefixes):
                decoder += n
            else:
                encoder += n
    return encoder, decoder


def _method_name(recipe) -> str:
    return getattr(recipe.method, "name", "")


# --- vocabulary --------------------------------------------------------------------------------------------------


def vocabulary(model: nn.Module, tokenizer, examples: list[dict[str, Any]]) -> str | None:
    """Refuse (ModelError) a tokenizer whose special ids (pad, eos, bos, unk: ftune adds them itself), or whose ids in
    the encoded training `examples`, reach past the input embedding's rows. A tokenizer with more ids than rows whose
    extra ids the data never uses is a warning (returned): Gemma 3's text models ship their family's tokenizer, with
    an image token one past the embedding (transformers issue 37011)."""
    try:
        rows = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return None
    size, fix = len(tokenizer), "use the tokenizer saved with this model (or resize the model's embeddings to it)"
    for token in ("pad", "eos", "bos", "unk"):
        value = getattr(tokenizer, f"{token}_token_id", None)
        if isinstance(value, int) and value >= rows:
            raise ModelError(
                f"model.name: the tokenizer's {token} id {value} is past the model's input embedding "
                f"({rows} rows; the tokenizer has {size} ids); {fix}"
            )
    if size <= rows:  # the usual case: nothing to scan
        return None
    top = max((_largest_id(e.get(key)) for e in examples for key in ("input_ids", "decoder_input_ids")), default=-1)
    if top >= rows:
        raise ModelError(
            f"model.name: the tokenizer has {size} ids but the model's input embedding has {rows} rows, "
            f"and the training data encodes to ids up to {top}; {fix}"
        )
    unused = tokenizer.convert_ids_to_tokens(list(range(rows, min(size, rows + 3))))
    more = ", ..." if size - rows > 3 else ""
    return (
        f"model.name: the tokenizer has {size} ids but the model's input embedding has {rows} rows; the training "
        f"data uses none past them ({', '.join(map(str, unused))}{more}), but text that does will fail"
    )


def _largest_id(ids) -> int:
    """The largest token id of a list of ids, or of a group of them (a preference pair's); -1 for none."""
    if not ids:
        return -1
    return max(map(_largest_id, ids)) if isinstance(ids[0], list) else max(ids)
