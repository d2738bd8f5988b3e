"""Prompt tuning: n trainable virtual-token embeddings in front of the input; the whole model stays frozen.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691. The prompt P
(n x d, d = the embedding width) is prepended to the embedded input. Initialisation (§3.2 of the paper):
`random` draws uniform [-0.5, 0.5] (the reference code's scale); `vocab` copies the embeddings of n tokens sampled
from the whole vocabulary (as peft: BERT-style vocabularies begin with thousands of unused ids, so the reference
code's "first 5000 ids" would sample placeholders); `text` repeats or cuts the embeddings of `init_text` to n.
The default length 20 follows the issue's budget (the paper's 100 serves T5-XXL).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ftune.errors import MethodError
from ftune.layers.soft_prompts import Prompt, PromptedModel, prompt_parameters
from ftune.methods import base


class Config(base.MethodConfig):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    n_tokens: int = Field(20, gt=0)
    """Virtual tokens n."""
    init: Literal["random", "vocab", "text"] = "vocab"
    """random: uniform [-0.5, 0.5]; vocab: embeddings of sampled vocabulary tokens; text: embeddings of init_text."""
    init_text: str | None = None
    """init: text only, e.g. "Classify the sentiment of this review:"."""

    @model_validator(mode="after")
    def _text_given(self) -> Config:
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("method.init_text: set it exactly when method.init is text")
        return self


def initial_prompt(model: nn.Module, n: int, init: str, text: str | None) -> torch.Tensor:
    """(n, d) starting prompt, from the model's own input embedding table (for vocab and text)."""
    table = model.get_input_embeddings().weight.detach()
    if init == "random":
        return torch.empty(n, table.shape[1], device=table.device).uniform_(-0.5, 0.5)
    if init == "vocab":
        ids = torch.randint(0, table.shape[0], (n,), device=table.device)
    else:
        from ftune.models import load_tokenizer

        ids = torch.tensor(load_tokenizer(model.name_or_path)(text, add_special_tokens=False)["input_ids"])
        if len(ids) == 0:
            raise MethodError("method.init_text: tokenises to nothing; give some words")
        ids = ids.repeat((n + len(ids) - 1) // len(ids))[:n].to(table.device)
    return table[ids].float().clone()


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    return PromptedModel(model, Prompt(initial_prompt(model, cfg.n_tokens, cfg.init, cfg.init_text)))


def disabled(model: nn.Module) -> AbstractContextManager[None]:
    """`disabled` of the virtual-token methods: the wrapper hands the caller's inputs to the model as they are."""
    return base.switched_off((m for m in model.modules() if isinstance(m, PromptedModel)), "prompts_on")


def peft_config(model: PromptedModel, cfg: Config) -> dict[str, Any]:
    return {
        "peft_type": "PROMPT_TUNING",
        **peft_prompt_fields(model, cfg.n_tokens),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
    }


def peft_prompt_fields(model: nn.Module, n: int) -> dict[str, Any]:
    """The fields every peft prompt-learning config shares (peft fills them from the model config the same way)."""
    from ftune.layers.soft_prompts import embedding_width, prefix_geometry

    layers, _, _ = prefix_geometry(model.config)
    heads = getattr(model.config, "num_attention_heads", None) or model.config.n_head
    return {
        "num_virtual_tokens": n,
        "token_dim": embedding_width(model),
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
    }


METHOD = base.Method(
    name="prompt_tuning",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset({base.Claim.WHOLE_MODEL}),
    apply=apply,
    trainable=prompt_parameters,
    disabled=disabled,
    saving=base.Saving(peft=base.Peft(peft_config, PromptedModel.peft_weights)),
    runs_with=base.RunsWith(quantized_base=True, prompt_site="input"),
    about=base.About(
        "n trainable virtual-token embeddings before the input",
        "Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning, arXiv:2104.08691",
        base.Recommended(
            3e-2, "peft's prompt-tuning examples (AdamW, 3e-2); Lester et al. 2021 use 0.3 with Adafactor"
        ),
    ),
)
