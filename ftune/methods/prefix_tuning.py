"""Prefix tuning: trainable key/value prefixes in every attention layer, trained directly or through an MLP.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190. Every layer's
attention also attends to n prefix positions whose keys and values are trained. The paper finds optimising them
directly unstable (§4.3) and produces them by a reparameterisation: n inputs (n, w) -> Linear(w, k) -> Tanh ->
Linear(k, layers * 2 * w), k = 512 (the reference code's mid_dim), w = key/value heads x head dim (the model width d
without grouped-query attention; w, as peft, where keys are narrower). ftune's default trains them directly, as
peft does (prefix_projection=False) and as P-tuning v2 finds better for some understanding tasks (§3.2): the MLP moves
each prefix by about k/2 times the learning rate per Adam step (every hidden unit's weight moves by the rate), so it
needs the paper's tiny rate (5e-5), where direct prefixes learn at 1e-2 (the README's measured table). Giving
`mlp_hidden` without `reparameterize` selects the MLP. After training the MLP is folded away and only the prefixes,
(n, layers * 2 * kv_width), are saved: peft's PREFIX_TUNING layout, loadable as its `prompt_embeddings`. Works for
encoders and decoders (anything that takes an attention cache). Encoder-decoder models (T5, BART) get prefixes in the
encoder's self-attention, the decoder's self-attention and the cross-attention, as the paper does (`sites: all`, one
MLP per site as its code has), or in the decoder's self-attention only (`sites: decoder`, peft's placement); see
ftune/layers/seq2seq_prefixes.py. Default n = 20 (the issue's reference budget; the paper used 10 for table-to-text,
200 for summarisation).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ftune.layers.seq2seq_prefixes import (
    EncoderDecoderPrefixes,
    Sites,
    peft_decoder_order,
    seq2seq_prefix_width,
)
from ftune.layers.soft_prompts import (
    PrefixedModel,
    PrefixEncoder,
    Prompt,
    prefix_geometry,
    prefix_source,
    prompt_parameters,
)
from ftune.methods import base
from ftune.methods.prompt_tuning import peft_prompt_fields
from ftune.models.arch import block_stacks, is_encoder_decoder


class Config(base.MethodConfig):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    n_tokens: int = Field(20, gt=0)
    """Prefix length n (positions added to every layer's keys and values)."""
    reparameterize: bool = False
    """Train through the MLP (the paper's choice; use a learning rate near its 5e-5) instead of directly. Default:
    true when `mlp_hidden` is given, else false."""
    mlp_hidden: int = Field(512, gt=0)
    """Width k of the reparameterisation MLP."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the prefixes during training."""
    sites: Literal["all", "decoder"] = "all"
    """Encoder-decoder models: prefixes in encoder self-attention, decoder self-attention and cross-attention (all,
    Li & Liang), or in the decoder's self-attention only (decoder, as peft). Other models: every attention."""

    @model_validator(mode="before")
    @classmethod
    def _width_means_mlp(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mlp_hidden" in data and "reparameterize" not in data:
            return {**data, "reparameterize": True}
        return data


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if not is_encoder_decoder(model):
        return PrefixedModel(model, prefix_source(model, cfg.n_tokens, cfg.reparameterize, cfg.mlp_hidden), cfg.dropout)
    w, chunks = seq2seq_prefix_width(model, cfg.sites)
    device = model.get_input_embeddings().weight.device
    if not cfg.reparameterize:
        source = Prompt(torch.randn(cfg.n_tokens, chunks * w, device=device))
    else:  # decoder self-attention (2 L_dec chunks) first, then cross-attention and encoder (see the layer's docs)
        decoder = 2 * len(block_stacks(model)[1][0])
        widths = [decoder, decoder, chunks - 2 * decoder] if cfg.sites == "all" else [decoder]
        parts = [PrefixEncoder(cfg.n_tokens, w, cfg.mlp_hidden, c * w).to(device) for c in widths]
        source = parts[0] if len(parts) == 1 else Sites(parts)
    return EncoderDecoderPrefixes(model, source, cfg.dropout, cfg.sites)


def disabled(model: nn.Module) -> AbstractContextManager[None]:
    """The wrapper runs the model without prefixes, on the caller's inputs as they are."""
    return base.switched_off((m for m in model.modules() if isinstance(m, PrefixedModel)), "prefixes_on")


def peft_config(model: PrefixedModel, cfg: Any) -> dict[str, Any]:
    _, heads, head_dim = prefix_geometry(model.config)
    fields = peft_prompt_fields(model, cfg.n_tokens)
    if isinstance(model, EncoderDecoderPrefixes):
        peft_decoder_order(model)  # refuses what peft cannot hold
        # two submodules: peft then hands the prefixes to the model as an EncoderDecoderCache
        fields |= {"num_transformer_submodules": 2, "num_layers": model.layers[1]}
    # saved prefixes are already folded, so peft takes them as they are (no projection)
    return {
        "peft_type": "PREFIX_TUNING",
        **fields,
        "token_dim": heads * head_dim,
        "num_attention_heads": heads,
        "encoder_hidden_size": heads * head_dim,
        "prefix_projection": False,
    }


def peft_weights(model: PrefixedModel) -> tuple[dict[str, torch.Tensor], list[str]]:
    tensors, owners = model.peft_weights()
    if isinstance(model, EncoderDecoderPrefixes):
        prompt = tensors["prompt_embeddings"]
        pairs = prompt.view(prompt.shape[0], model.layers[1], -1)[:, peft_decoder_order(model)]
        tensors["prompt_embeddings"] = pairs.reshape(prompt.shape)
    return tensors, owners


METHOD = base.Method(
    name="prefix_tuning",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset({base.Claim.WHOLE_MODEL}),
    apply=apply,
    trainable=prompt_parameters,
    disabled=disabled,
    saving=base.Saving(PrefixedModel.saved_weights, PrefixedModel.fold, base.Peft(peft_config, peft_weights)),
    runs_with=base.RunsWith(gradient_checkpointing=False, quantized_base=True, prompt_site="layers"),
    about=base.About(
        "key/value prefixes in every attention layer, trained directly or through an MLP that is folded away",
        "Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation, arXiv:2101.00190",
        base.Recommended(
            1e-2,
            "direct prefixes: P-tuning v2's rates run 5e-3 to 6e-2 (THUDM/P-tuning-v2 "
            "run_script); a MiniLM / SST-2 run at 1e-2 (README)",
        ),
    ),
)
