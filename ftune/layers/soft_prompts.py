"""Soft prompts: virtual tokens at the input, or key/value prefixes in every attention layer.

The machinery prompt tuning, P-tuning, prefix tuning and P-tuning v2 share (and hybrids compose): a method only says
where its vectors come from (a `Prompt` tensor, or an encoder that produces one); the wrappers here put them into
the model. Both wrap a whole transformers model and keep its interface, so the loop, `eval` and `export` see an
ordinary model: `wrapper(input_ids=..., attention_mask=..., labels=...)` returns the model's usual output.

Padding and positions: each row's real tokens are one contiguous run (right- or left-padded). Position ids are
computed from the attention mask, so a padded row gives the output it gives alone. Per-token outputs (causal LM,
token classification) come back with the virtual positions removed, aligned with the caller's input_ids and labels.

Encoder-decoder models (T5, BART): input prompts go before the encoder's input (PromptedModel.encoder_input), the
decoder's input is untouched, and `generate` runs through the prompt; prefixes go into the encoder's self-attention,
the decoder's self-attention and the cross-attention (ftune/layers/seq2seq_prefixes.py).

Several tasks in one batch: a source may hold a bank of T prompts (shape (T, n, d), with per-task lengths for
prompts shorter than n); `task_ids` (B,) picks each row's prompt, and a shorter prompt's unused slots are masked.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ftune.data.encoded import IGNORE_INDEX
from ftune.errors import MethodError


class Prompt(nn.Module):
    """A plain tensor of prompt vectors: (n, width), or a bank (T, n, width) with each task's length in `lengths`."""

    def __init__(self, weight: torch.Tensor, lengths: list[int] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.lengths = lengths

    def forward(self) -> torch.Tensor:
        return self.weight


class _Wrapper(nn.Module):
    """Forwards every attribute it lacks (config, generate, gradient checkpointing switches) to the wrapped model."""

    def __init__(self, model: nn.Module, source: nn.Module) -> None:
        super().__init__()
        self.model, self.source = model, source

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "source"):
                raise
            return getattr(self.model, name)

    def _bank(self, batch: int, device: torch.device, task_ids: torch.Tensor | None):
        """Each row's prompt (B, n, width) and which of its n slots are real (B, n)."""
        prompts = self.source()
        bank = prompts if prompts.dim() == 3 else prompts[None]
        lengths = torch.tensor(getattr(self.source, "lengths", None) or [bank.shape[1]], device=device)
        ids = task_ids if task_ids is not None else torch.zeros(batch, dtype=torch.long, device=device)
        if int(ids.max()) >= len(bank) or int(ids.min()) < 0:
            raise MethodError(f"task_ids must lie in 0..{len(bank) - 1}")
        slots = torch.arange(bank.shape[1], device=device)[None] < lengths[ids][:, None]
        return bank[ids], slots, lengths[ids]

    def produced(self) -> torch.Tensor:
        """The prompt the source produces at inference: in eval mode (no encoder dropout), so saving mid-run neither
        stores a dropped-out prompt nor draws from the random stream training uses."""
        was_training = self.source.training
        self.source.eval()
        try:
            with torch.no_grad():
                return self.source().detach().clone()
        finally:
            self.source.train(was_training)

    def fold(self) -> None:
        """Replace a reparameterising encoder by the prompt it produces (what training leaves behind)."""
        if not isinstance(self.source, Prompt):
            self.source = Prompt(self.produced())

    def saved_weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights with the encoder folded: `source.weight` is the prompt itself."""
        own = {id(p) for p in self.source.parameters()}
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad and id(p) not in own}
        return state | {"source.weight": self.produced()}

    def peft_weights(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Tensors named as peft's prompt-learning adapters save them, and the modules peft must save beside them
        (the task head): the prompt as `prompt_embeddings`, a head weight as `base_model.<its name in the model>`."""
        own = {id(p) for p in self.source.parameters()}
        head = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in own}
        tensors = {"prompt_embeddings": self.produced()} | {f"base_model.{n}": t for n, t in head.items()}
        return tensors, sorted({n.rpartition(".")[0] for n in head})


class PromptedModel(_Wrapper):
    """Virtual token embeddings inserted into the input sequence (Lester et al. 2021; Liu et al. 2021).

    The first `before` virtual tokens go in front of each row's real tokens, the rest right after them (P-tuning's
    templates); `before=None` puts all in front. Placeholder ids stand at the virtual positions, so the model's own
    use of input_ids (BERT's token types, a decoder classifier finding the last non-pad token) keeps working; a
    hook on the input embedding swaps the prompt vectors in. Shapes: prompt (n, d) with d the embedding width.
    `prompts_on = False` runs the wrapped model on the caller's inputs as they are (the method switched off).
    """

    def __init__(self, model: nn.Module, source: nn.Module, before: int | None = None) -> None:
        super().__init__(model, source)
        self.before = before
        self.pad = model.config.pad_token_id
        self.placeholder = 1 if self.pad == 0 else 0  # any id but padding: its embedding is replaced anyway
        self._virtual: tuple[torch.Tensor, torch.Tensor] | None = None
        self.prompts_on = True
        model.get_input_embeddings().register_forward_hook(self._swap_in)

    def _swap_in(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._virtual is None or self._virtual[0].shape != output.shape[:2]:
            return output
        where, vectors = self._virtual
        return torch.where(where[..., None], vectors.to(output.dtype), output)

    def _layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, task_ids: torch.Tensor | None):
        """Where the n virtual tokens go in each row of the (B, width + n) sequence: returns (virtual (B, W+n) bool,
        the vectors at every position (B, W+n, d), src (B, W+n): the caller position each real position copies,
        the new mask (B, W+n), first (B, 1): left padding, length (B, 1): real tokens, a: virtual tokens before)."""
        batch, width = input_ids.shape
        device = input_ids.device
        prompts, slots, _ = self._bank(batch, device, task_ids)
        n = prompts.shape[1]
        a = n if self.before is None else min(self.before, n)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        first = (mask.cumsum(1) == 0).sum(1, keepdim=True)  # left padding before each row's tokens
        length = mask.sum(1, keepdim=True)
        j = torch.arange(width + n, device=device)[None]
        k = j - first  # position relative to the row's first token or virtual token
        front, back = (k >= 0) & (k < a), (k >= a + length) & (k < length + n)
        virtual = front | back
        slot = torch.where(front, k, k - length).clamp(0, n - 1)
        src = torch.where(k < 0, j, torch.where(k < a + length, first + k - a, j - n)).clamp(0, width - 1)
        new_mask = torch.where(virtual, slots.gather(1, slot).to(mask.dtype), mask.gather(1, src))
        vectors = prompts.gather(1, slot[..., None].expand(-1, -1, prompts.shape[-1]))
        return virtual, vectors, src, new_mask, first, length, a

    def encoder_input(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, task_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An encoder-decoder model's prompted encoder input: (inputs_embeds (B, W+n, d), attention mask (B, W+n)).

        Embedded directly rather than through the placeholder hook: T5 and BART share one embedding between encoder
        and decoder, and the decoder's input must stay as it is. Positions need no care: T5's are relative, BART's
        encoder numbers the (right-padded) sequence from its start, prompt included, as the row alone.
        """
        virtual, vectors, src, new_mask, _, _, _ = self._layout(input_ids, attention_mask, task_ids)
        embedded = self.model.get_input_embeddings()(input_ids.gather(1, src))
        return torch.where(virtual[..., None], vectors.to(embedded.dtype), embedded), new_mask

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **settings,
    ) -> torch.Tensor:
        """Generated ids of an encoder-decoder model whose encoder reads the prompted input (transformers' generate
        takes the encoder's inputs_embeds); the prompts switched off, the wrapped model's own generate."""
        if not self.prompts_on:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
        if not self.model.config.is_encoder_decoder:
            raise MethodError("generating through a prompt is implemented for encoder-decoder (seq2seq) models")
        embeds, mask = self.encoder_input(input_ids, attention_mask, task_ids)
        return self.model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels=None,
        token_type_ids=None,
        task_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        if not self.prompts_on:  # token_type_ids only if given: decoders take none
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra, **kwargs)
        if self.model.config.is_encoder_decoder:  # the prompt goes into the encoder; the decoder's side is untouched
            embeds, mask = self.encoder_input(input_ids, attention_mask, task_ids)
            return self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)
        width = input_ids.shape[1]
        device = input_ids.device
        virtual, vectors, src, new_mask, first, length, a = self._layout(input_ids, attention_mask, task_ids)
        n = virtual.shape[1] - width
        per_token = labels is not None and labels.dim() == 2
        if n > a and per_token:
            raise MethodError(
                "virtual tokens after the input (method.tokens_before < n_tokens) suit sequence "
                "classification only; put them all before the input for this task"
            )

        def spread(values: torch.Tensor, fill) -> torch.Tensor:
            return torch.where(virtual, torch.as_tensor(fill, dtype=values.dtype, device=device), values.gather(1, src))

        if token_type_ids is not None:
            kwargs["token_type_ids"] = spread(token_type_ids, 0)
        if per_token:
            labels = spread(labels, IGNORE_INDEX)
        self._virtual = (virtual, vectors)
        try:
            ids = spread(input_ids, self.placeholder)
            if self.pad is not None:  # a decoder classifier finds each row's last token by the padding id
                ids = torch.where(new_mask.bool() | virtual, ids, self.pad)
            out = self.model(
                input_ids=ids,
                attention_mask=new_mask,
                labels=labels,
                position_ids=(new_mask.cumsum(1) - 1).clamp(min=0),
                **kwargs,
            )
        finally:
            self._virtual = None
        if n > a and out.logits.dim() == 3:
            raise MethodError(
                "virtual tokens after the input (method.tokens_before < n_tokens) suit sequence "
                "classification only; put them all before the input for this task"
            )
        if out.logits.dim() == 3:  # per-token outputs: drop the virtual positions again
            t = torch.arange(width, device=device)[None]
            at = t + a * (t >= first) + (n - a) * (t >= first + length)
            out.logits = out.logits.gather(1, at[..., None].expand(-1, -1, out.logits.shape[-1]))
        return out


class PrefixedModel(_Wrapper):
    """Trainable key/value prefixes in every attention layer (Li & Liang 2021; Liu et al. 2022, P-tuning v2).

    The source yields (n, 2 * layers * kv_heads * head_dim), laid out as peft's prefix tuning: for layer l, chunk
    2l holds the keys and 2l + 1 the values of n prefix positions. They enter the model as an attention cache,
    the interface transformers models share for keys and values computed before the input; the mask gains n
    leading ones and positions start at n, as for a continuation of the prefix.

    For methods that act on the prefixes (UniPELT's gate scales them): `cache` is the attention cache a forward call
    is running with, None outside one; while layer l's attention has not run yet its entry holds just the prefix, so a
    forward pre-hook on that attention may rescale it. `prefixes_on = False` runs the wrapped model as it is, without
    prefixes (a prefix scaled to zero would still draw softmax weight; this removes it).
    """

    def __init__(self, model: nn.Module, source: nn.Module, dropout: float = 0.0) -> None:
        keyword = cache_keyword(model)
        if keyword is None:
            raise MethodError(f"{type(model).__name__} takes no attention cache, which prefixes enter through")
        super().__init__(model, source)
        self.cache_keyword = keyword
        self.dropout = nn.Dropout(dropout)
        self.prefixes_on, self.cache = True, None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        from transformers import DynamicCache

        if not self.prefixes_on:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        reference = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        batch, device = reference.shape[0], reference.device
        prefixes, slots, lengths = self._bank(batch, device, task_ids)
        layers, heads, head_dim = prefix_geometry(self.model.config)
        n = prefixes.shape[1]
        kv = self.dropout(prefixes).view(batch, n, 2 * layers, heads, head_dim).permute(2, 0, 3, 1, 4)
        dtype = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else next(self.model.parameters()).dtype
        )
        kv = kv.to(dtype)
        cache = DynamicCache(config=self.model.config)
        for layer in range(layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        mask = (
            attention_mask
            if attention_mask is not None
            else torch.ones(reference.shape[:2], device=device, dtype=torch.long)
        )
        positions = lengths[:, None] + (mask.cumsum(1) - 1).clamp(min=0)
        self.cache = cache
        try:
            return self.model(
                input_ids=input_ids,
                attention_mask=torch.cat([slots.to(mask.dtype), mask], 1),
                position_ids=positions,
                **{self.cache_keyword: cache},
                **kwargs,
            )
        finally:
            self.cache = None


def prompt_parameters(model: _Wrapper, cfg: object = None) -> list[nn.Parameter]:
    """`trainable` of every soft-prompt method: the source (a prompt tensor or the encoder producing it)."""
    return list(model.source.parameters())


CACHE_KEYWORDS = ("cache", "past_key_values")
"""The forward keyword of the attention cache: `cache` from transformers 5.24, `past_key_values` before it."""


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword `model.forward` takes the attention cache by, itself or through the body it hands its keyword
    arguments to (a transformers task model passes **kwargs to its base model); None when it takes none.

    Read from the signatures once, at wrap time: transformers 5.24 renamed `past_key_values` to `cache` (the old name
    still arrives through a deprecation shim until 5.40, but a signature shows only the new one).
    """
    params = inspect.signature(model.forward).parameters
    own = next((k for k in CACHE_KEYWORDS if k in params), None)
    if own:
        return own
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    body = getattr(model, "base_model", model)
    if not passes_on or body is model:
        return None
    body_params = inspect.signature(body.forward).parameters
    return next((k for k in CACHE_KEYWORDS if k in body_params), None)


def prefix_geometry(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers config: the shape one layer's prefix must have."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads  # d_kv: T5
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return layers, kv_heads, head_dim


class PrefixEncoder(nn.Module):
    """(n, w) inputs -> Linear(w, k) -> Tanh -> Linear(k, width): the prefixes (n, width). Names as peft's."""

    def __init__(self, n: int, d: int, hidden: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, d)
        self.transform = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, width))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


def prefix_source(model: nn.Module, n: int, reparameterize: bool, hidden: int) -> nn.Module:
    """The module that yields (n, layers * 2 * kv_width) prefixes: the MLP, or a plain N(0, 1) tensor (nn.Embedding's
    initialisation, as peft and the P-tuning v2 code use)."""
    layers, heads, head_dim = prefix_geometry(model.config)
    width = layers * 2 * heads * head_dim
    device = model.get_input_embeddings().weight.device
    if reparameterize:
        return PrefixEncoder(n, heads * head_dim, hidden, width).to(device)
    return Prompt(torch.randn(n, width, device=device))


def embedding_width(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[1]
