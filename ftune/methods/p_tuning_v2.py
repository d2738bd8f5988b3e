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

import dataclasses
from typing import Literal

from pydantic import Field

from ftune.methods import base, prefix_tuning


class Config(prefix_tuning.Config):
    """Prefix tuning's options with P-tuning v2's defaults: shorter prompts, no MLP, prefix dropout."""

    name: Literal["p_tuning_v2"] = "p_tuning_v2"
    n_tokens: int = Field(16, gt=0)
    """Prompt length per layer; the paper's best: < 20 for classification, ~100 for sequence labelling."""
    reparameterize: bool = False
    """Train the prompts through prefix tuning's MLP instead of directly."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on the prompts during training (the reference code applies the model's hidden dropout, 0.1)."""


# the same prefixes, put in the same way: only the defaults (and the head, which trains under any method) differ
METHOD = dataclasses.replace(
    prefix_tuning.METHOD,
    name="p_tuning_v2",
    config_cls=Config,
    about=base.About(
        "deep prompts in every layer without reparameterisation, plus a task head",
        "Liu et al. 2022, P-Tuning v2, arXiv:2110.07602",
        base.Recommended(1e-2, "THUDM/P-tuning-v2 run_script: rates 5e-3 to 6e-2 (e.g. RTE, RoBERTa: 5e-3)"),
    ),
)
