"""P-tuning: virtual tokens produced by a trainable prompt encoder, placed around the input.

Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385. A template [P_0..P_(i-1)] x [P_i..P_(n-1)] puts virtual
tokens before and after the input x; their embeddings h_i come from a prompt encoder over n trainable inputs, which
ties the virtual tokens together. Encoders as peft's (`p_tuning/model.py`): `mlp` is Linear(d, h) -> ReLU ->
Linear(h, h) -> ReLU -> Linear(h, d); `lstm` is a 2-layer bi-LSTM(d, h) followed by Linear(2h, 2h) -> ReLU ->
Linear(2h, d). h defaults to d. After training the encoder is folded away: only its output, the (n, d) prompt, is
saved, and it loads into peft's P_TUNING as `prompt_embeddings`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ftune.layers.soft_prompts import PromptedModel, embedding_width, prompt_parameters
from ftune.methods import base
from ftune.methods.prompt_tuning import disabled, peft_prompt_fields


class Config(base.MethodConfig):
    name: Literal["p_tuning"] = "p_tuning"
    n_tokens: int = Field(20, gt=0)
    """Virtual tokens n."""
    tokens_before: int | None = Field(None, ge=0)
    """How many of the n go before the input; the rest follow it (sequence classification only). Default: all."""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """Prompt encoder: a 3-layer MLP, or a bi-LSTM followed by an MLP."""
    encoder_hidden: int | None = Field(None, gt=0)
    """Encoder width h; default the embedding width d."""
    lstm_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout between the two LSTM layers."""

    @model_validator(mode="after")
    def _split_fits(self) -> Config:
        if self.tokens_before is not None and self.tokens_before > self.n_tokens:
            raise ValueError(f"method.tokens_before: {self.tokens_before} exceeds n_tokens ({self.n_tokens})")
        return self


class PromptEncoder(nn.Module):
    """n trainable inputs (n, d) -> encoder -> the prompt (n, d). Module names as peft's, so weights copy across."""

    def __init__(self, n: int, d: int, hidden: int, kind: str, lstm_dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, d)
        self.lstm_head = (
            nn.LSTM(d, hidden, num_layers=2, dropout=lstm_dropout, bidirectional=True, batch_first=True)
            if kind == "lstm"
            else None
        )
        width = 2 * hidden if kind == "lstm" else hidden
        layers = [nn.Linear(d, hidden), nn.ReLU()] if kind == "mlp" else []
        self.mlp_head = nn.Sequential(*layers, nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight[None]
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    d = embedding_width(model)
    device = model.get_input_embeddings().weight.device
    encoder = PromptEncoder(cfg.n_tokens, d, cfg.encoder_hidden or d, cfg.encoder, cfg.lstm_dropout).to(device)
    return PromptedModel(model, encoder, before=cfg.tokens_before)


def peft_config(model: PromptedModel, cfg: Config) -> dict[str, Any]:
    if cfg.tokens_before is not None and cfg.tokens_before < cfg.n_tokens:
        from ftune.errors import MethodError

        raise MethodError(
            "export --format peft: peft's P-tuning puts every virtual token before the input; this "
            "run places some after it (method.tokens_before)"
        )
    return {
        "peft_type": "P_TUNING",
        **peft_prompt_fields(model, cfg.n_tokens),
        "encoder_reparameterization_type": cfg.encoder.upper(),
        "encoder_hidden_size": cfg.encoder_hidden or embedding_width(model),
        "encoder_num_layers": 2,
        "encoder_dropout": cfg.lstm_dropout,
    }


METHOD = base.Method(
    name="p_tuning",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset({base.Claim.WHOLE_MODEL}),
    apply=apply,
    trainable=prompt_parameters,
    disabled=disabled,
    saving=base.Saving(
        PromptedModel.saved_weights, PromptedModel.fold, base.Peft(peft_config, PromptedModel.peft_weights)
    ),
    runs_with=base.RunsWith(quantized_base=True, prompt_site="input"),
    about=base.About(
        "virtual tokens from an MLP or bi-LSTM prompt encoder, before and after the input",
        "Liu et al. 2021, GPT Understands, Too, arXiv:2103.10385",
        base.Recommended(1e-3, "peft's P-tuning sequence-classification example (AdamW, 1e-3)"),
    ),
)
