"""P-tuning v2: deep prompts (trainable key/value prefixes) in every layer, plus a randomly initialised task head.

Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales and
Tasks", arXiv:2110.07602. The same prefixes as prefix tuning, composed from its module, but trained directly
(no reparameterisation by default: §3.2 finds it helps some tasks and hurts others), with dropout on the prefixes
(the reference code's hidden_dropout_prob, 0.1), and with the task head trained on the first token
(sequence classification's [CLS] pooler) or on every token (token classification). The prompt length suits the
task: the paper finds short prompts (< 20) best for classification and about 100 for sequence labelling, so set
`n_tokens` per task in the recipe. Default 16; the reference code's default is 4.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ftune.methods import prefix_tuning
from ftune.methods.base import Method, MethodConfig
from ftune.soft_prompts import PrefixedModel


class Config(MethodConfig):
    name: Literal["p_tuning_v2"] = "p_tuning_v2"
    n_tokens: int = Field(16, gt=0)
    """Prompt length per layer; the paper's best: < 20 for classification, ~100 for sequence labelling."""
    reparameterize: bool = False
    """Train the prompts through prefix tuning's MLP instead of directly."""
    mlp_hidden: int = Field(512, gt=0)
    """Width of that MLP (the reference code's prefix_hidden_size)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on the prompts during training (the reference code applies the model's hidden dropout, 0.1)."""


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    source = prefix_tuning.prefix_source(model, cfg.n_tokens, cfg.reparameterize, cfg.mlp_hidden)
    return PrefixedModel(model, source, cfg.dropout)


METHOD = Method(
    name="p_tuning_v2",
    config_cls=Config,
    apply=apply,
    trainable=prefix_tuning.trainable,
    saved_weights=PrefixedModel.saved_weights,
    fold=PrefixedModel.fold,
    peft_config=prefix_tuning.peft_config,
    gradient_checkpointing=False,
    quantized_base=True,
    summary="deep prompts in every layer without reparameterisation, plus a task head",
    paper="Liu et al. 2022, P-Tuning v2, arXiv:2110.07602",
)
