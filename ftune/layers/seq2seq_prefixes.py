"""Key/value prefixes in an encoder-decoder model (T5, BART): Li & Liang's placement, or peft's.

Li & Liang 2021 (arXiv:2101.00190, §4.2; their BART code's `encoder`, `self` and `encoder_decoder` prefixes) put
trainable prefixes in three places: the encoder's self-attention, the decoder's self-attention, and the
cross-attention (the decoder attends to [P_K; K_enc], [P_V; V_enc]). peft's PREFIX_TUNING for SEQ_2_SEQ_LM keeps only
the decoder's self-attention. `sites` chooses: "all" (the paper) or "decoder" (peft's).

Source layout: (n, width), width = chunks x w with w = key/value heads x head dim, two chunks (keys, values) per
attention layer, in this order:
    decoder self-attention, layers 0..L_dec-1      (2 L_dec chunks: peft's prefix layout)
    cross-attention, layers 0..L_dec-1             (2 L_dec chunks; sites "all" only)
    encoder self-attention, layers 0..L_enc-1      (2 L_enc chunks; sites "all" only)

How each prefix enters (shapes per layer: (B, heads, n, head_dim)), always through transformers' own attention
cache, whose `update` puts cached keys and values before the ones the layer computes:
- decoder self-attention: the `self_attention_cache` of an `EncoderDecoderCache` handed to the model, holding the
  prefix, so the decoder continues it (positions and the causal mask start at n, as in peft);
- cross-attention: the `cross_attention_cache` of the same cache, holding the prefix and marked not yet computed,
  so each layer appends the encoder's keys/values behind it ([P; K_enc]) and reuses that in later generation steps;
- encoder self-attention, which transformers runs without a cache: a forward pre-hook on each encoder attention
  hands it a one-layer cache holding its prefix (the same concatenation).
The attention mask of the source gains n leading entries (1 for a real prefix slot) for the encoder and the
cross-attention; T5's relative positions then place the prefix before the first token, BART's learned positions
are unchanged. All of it is done by hooks while a call is active, so the wrapped model's `generate` (the encoder
run once, then decoder steps with a growing cache, beams repeating rows) gets the prefixes the same way as `forward`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ftune.errors import MethodError
from ftune.layers.soft_prompts import CACHE_KEYWORDS, PrefixedModel
from ftune.models.arch import block_stacks, first_input


def seq2seq_prefix_width(model: nn.Module, sites: str) -> tuple[int, int]:
    """(w, chunks): the width of one key or value prefix, and how many the sites need."""
    (encoder, _), (decoder, _) = block_stacks(model)
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    chunks = 2 * len(decoder) + (2 * len(decoder) + 2 * len(encoder) if sites == "all" else 0)
    return heads * head_dim, chunks


class Sites(nn.Module):
    """One prefix encoder per site of an encoder-decoder model, their outputs side by side: (n, sum of widths)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self) -> torch.Tensor:
        return torch.cat([part() for part in self.parts], -1)


def peft_decoder_order(model: EncoderDecoderPrefixes) -> list[int]:
    """Which of ftune's decoder layers each of peft's key/value pairs holds.

    peft (0.21) duplicates the prefix for an encoder-decoder model and regroups it by four, so decoder layer l reads
    the pair at index 2l mod L of the tensor it loads: a permutation for odd L, which the export undoes; for even L
    two layers share one pair in peft, which cannot hold ftune's prefixes."""
    layers = model.layers[1]
    if model.sites != "decoder":
        raise MethodError(
            "export --format peft: peft puts prefixes in the decoder's self-attention only; this run "
            "also has them in the encoder and the cross-attention (method.sites: all)"
        )
    if layers % 2 == 0:
        raise MethodError(
            f"export --format peft: peft gives decoder layer l the prefix pair 2l mod L, so with "
            f"{layers} decoder layers some layers share one pair; it cannot hold this run's prefixes"
        )
    return [next(l for l in range(layers) if (2 * l) % layers == p) for p in range(layers)]


class EncoderDecoderPrefixes(PrefixedModel):
    """Prefixes in an encoder-decoder model (see the module docstring); `sites` "all" or "decoder".

    `cache` (PrefixedModel's): the running call's EncoderDecoderCache while its entries hold just the prefixes (a
    forward, or the first step of generate), else None; UniPELT's gates scale the decoder's prefixes in it then."""

    def __init__(self, model: nn.Module, source: nn.Module, dropout: float = 0.0, sites: str = "all") -> None:
        super().__init__(model, source, dropout)
        (encoder, enc_layout), (decoder, _) = block_stacks(model)
        self.sites, self.layers = sites, (len(encoder), len(decoder))
        config = model.config
        self.heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.chunks = seq2seq_prefix_width(model, sites)[1]
        self._active: dict[str, torch.Tensor] | None = None
        model.register_forward_pre_hook(self._into_model, with_kwargs=True)
        if sites == "all":
            model.get_encoder().register_forward_pre_hook(self._into_encoder, with_kwargs=True)
            for block in encoder:
                attention = block.get_submodule(enc_layout.attn_in)
                keyword = next(
                    (k for k in CACHE_KEYWORDS if k in inspect.signature(attention.forward).parameters), None
                )
                if keyword is None or getattr(attention, "layer_idx", None) is None:
                    raise MethodError(
                        f"{type(model).__name__}'s encoder attention takes no attention cache, which "
                        "its prefixes enter through; use method.sites: decoder"
                    )
                attention.register_forward_pre_hook(self._hook_encoder_layer(keyword), with_kwargs=True)

    @contextlib.contextmanager
    def _prefixes(self, batch: int, device: torch.device) -> Iterator[None]:
        """Make this call's prefixes, (chunks, B, heads, n, head_dim) per site, for the hooks to put in."""
        prefixes, slots, _ = self._bank(batch, device, None)
        n = prefixes.shape[1]
        dtype = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else next(self.model.parameters()).dtype
        )
        kv = self.dropout(prefixes).view(batch, n, self.chunks, self.heads, -1).permute(2, 0, 3, 1, 4).to(dtype)
        dec = self.layers[1]
        self._active = {"self": kv[: 2 * dec], "cross": kv[2 * dec : 4 * dec], "encoder": kv[4 * dec :], "slots": slots}
        try:
            yield
        finally:
            self._active, self.cache = None, None

    def _rows(self, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        """This call's per-row tensor for `batch` rows: beam search repeats each row num_beams times."""
        return tensor if tensor.shape[0] == batch else tensor.repeat_interleave(batch // tensor.shape[0], dim=0)

    def _mask(self, mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
        """The source mask with the prefix slots in front, once (a mask already wider than the source is kept)."""
        if mask is None or mask.shape[1] != width:
            return mask
        return torch.cat([self._rows(self._active["slots"], mask.shape[0]).to(mask.dtype), mask], 1)

    def _into_model(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._active is None:
            return None
        from transformers import DynamicCache, EncoderDecoderCache

        decoder_ids = kwargs.get("decoder_input_ids")
        batch = decoder_ids.shape[0] if decoder_ids is not None else kwargs["decoder_inputs_embeds"].shape[0]
        cache = kwargs.get(self.cache_keyword)
        if cache is None or cache.get_seq_length() == 0:  # training, or the first step of generate: put prefixes in
            cache = (
                cache if isinstance(cache, EncoderDecoderCache) else EncoderDecoderCache(DynamicCache(), DynamicCache())
            )
            for site, target in (("self", cache.self_attention_cache), ("cross", cache.cross_attention_cache)):
                kv = self._active[site]
                for layer in range(kv.shape[0] // 2):
                    target.update(self._rows(kv[2 * layer], batch), self._rows(kv[2 * layer + 1], batch), layer)
            for layer in range(self.layers[1]):  # cross keys: the encoder's still to be appended behind the prefix
                cache.is_updated[layer] = False
            kwargs[self.cache_keyword] = cache
            self.cache = cache  # PrefixedModel.cache: its entries hold just the prefixes until each layer runs
        else:  # a later step of generate: the entries also hold the tokens decoded so far
            self.cache = None
        if self.sites == "all":
            source = kwargs.get("input_ids")
            if source is None:
                source = kwargs.get("inputs_embeds")
            if source is None:
                source = kwargs["encoder_outputs"][0]
            kwargs["attention_mask"] = self._mask(kwargs.get("attention_mask"), source.shape[1])
        return args, kwargs

    def _into_encoder(self, module: nn.Module, args: tuple, kwargs: dict):
        """The encoder run alone (generate encodes once, before decoding): its mask gains the prefix slots too."""
        if self._active is None or "attention_mask" not in kwargs:
            return None
        source = kwargs.get("input_ids")
        source = source if source is not None else kwargs.get("inputs_embeds")
        if source is None:
            return None
        kwargs["attention_mask"] = self._mask(kwargs["attention_mask"], source.shape[1])
        return args, kwargs

    def _hook_encoder_layer(self, keyword: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self._active is None:
                return None
            from transformers import DynamicCache

            batch, layer = first_input(args, kwargs).shape[0], module.layer_idx
            kv = self._active["encoder"]
            cache = DynamicCache()
            cache.update(self._rows(kv[2 * layer], batch), self._rows(kv[2 * layer + 1], batch), layer)
            kwargs[keyword] = cache
            return args, kwargs

        return hook

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        if not self.prefixes_on:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if task_ids is not None:
            raise MethodError("several prefix tasks in one batch are not supported for encoder-decoder models")
        reference = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        with self._prefixes(reference.shape[0], reference.device):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **settings):
        """The wrapped model's generate, with the prefixes in every step (the hooks put them in)."""
        if not self.prefixes_on:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self._prefixes(input_ids.shape[0], input_ids.device):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
