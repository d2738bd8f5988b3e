"""UniPELT: LoRA, prefix tuning and a bottleneck adapter in one model, each scaled by a learned gate.

Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning", arXiv:2110.07577.
The three sub-modules are ftune's own `lora`, `adapter` (placement pfeiffer) and `prefix_tuning`, applied together by
`combine` (ftune/methods/combine.py); each gets gates (ftune/layers/gates.py): g = mean over the row's real tokens of
sigmoid(w·h + b), (B, 1, 1), w (d,) and b trained, from the sub-module's input h (B, T, d):
    LoRA    (each adapted linear, input x):         W x + g_L(x) · (alpha / r) B A x
    adapter (after each block's FFN, input y):      y + g_A(y) · adapter(y)
    prefix  (each layer, input h_in of attention):  keys/values [g_P(h_in) P_K; K], [g_P(h_in) P_V; V]
Defaults (the reference run_glue.py; the paper's adapter size): LoRA r = 8, alpha = 16 on the attention's query and
value projections; adapter bottleneck 48; prefix length 10 through a 512-wide MLP. A sub-section given in the recipe
(e.g. `lora: {r: 4}`) overrides these defaults key by key; any other option of the part's own method may be set there.

Where ftune follows the reference code (morningmoni/UniPELT) and where it deviates:
- Every gate, LoRA's included, is a per-row mean over tokens, as the code computes it (lora_layers.py takes the
  token mean of sigmoid(lora_gate(x)) as well); gates start as the code's BERT initialiser leaves them (N(0, 0.02)
  weights, zero bias: g ≈ 0.5).
- The mean runs over real tokens only, not over padding too: a padded row gives the output it gives alone.
- The LoRA gate multiplies (alpha / r) B A x, where paper and code replace alpha / r by it. A gate pinned open then
  is plain LoRA with the same weights, alpha keeps its meaning in the recipe, and the update's scale at start
  (g · alpha / r ≈ 1) is the same order as plain LoRA's, so LoRA's learning rates carry over.
- Gates can be pinned (`force`): 1 is the plain sub-module, 0 switches it off. For the prefix, 0 removes it from the
  attention (PrefixedModel.prefixes_on): a learned gate cannot, since keys scaled to zero still draw softmax weight.
- Refused: DoRA (its update is a rescaled weight, not an additive term to scale) and adapter placements other than
  pfeiffer (the paper's adapter after the feed-forward block).
- Encoder-decoder models (T5, BART; the paper and its code tune encoders only): every part where its own method puts
  it (LoRA's query-value: self- and cross-attention; an adapter after each feed-forward block of both stacks;
  prefixes at the prefix part's `sites`, default Li & Liang's three). Encoder gates are the above; in the decoder,
  LoRA and adapter gates are per position and the decoder's prefix gates read the encoder's output, so no position
  sees later ones and generation computes what the full forward does (ftune/layers/gates.py says why).
Not mergeable (the gates depend on the input). Saved: the prefixes folded, the gates and every other trained weight.
Report (method_report.json), over the last evaluation's real tokens: {"tokens": n, "layers": one row per block,
{"lora.<linear's path in the block>": mean g_L, "adapter.<path>": mean g_A, "prefix": mean g_P}}; an encoder-decoder
model's rows: encoder blocks, then decoder blocks with "prefix.cross" too (its evaluation's generation calls count).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import field_validator, model_validator
from torch import nn

from ftune.layers.gates import Gate, add_gates, gates_by_block
from ftune.methods import adapter as adapter_method
from ftune.methods import base, prefix_tuning
from ftune.methods import lora as lora_method
from ftune.methods.combine import combine, keep_part_defaults, resolved_trainable

DEFAULTS = {
    "lora": {"r": 8, "alpha": 16, "targets": "query-value"},
    "adapter": {"placement": "pfeiffer", "bottleneck": 48},
    "prefix": {"n_tokens": 10, "mlp_hidden": 512},
}


class Config(base.MethodConfig):
    name: Literal["unipelt"] = "unipelt"
    lora: lora_method.Config = lora_method.Config(**DEFAULTS["lora"])
    """The LoRA part: `lora` method options (default r 8, alpha 16, targets query-value)."""
    adapter: adapter_method.Config = adapter_method.Config(**DEFAULTS["adapter"])
    """The adapter part: `adapter` method options (default placement pfeiffer, bottleneck 48)."""
    prefix: prefix_tuning.Config = prefix_tuning.Config(**DEFAULTS["prefix"])
    """The prefix part: `prefix_tuning` method options (default n_tokens 10, mlp_hidden 512)."""

    @model_validator(mode="before")
    @classmethod
    def _unipelt_defaults(cls, data: Any) -> Any:
        return keep_part_defaults(data, DEFAULTS)

    @field_validator("lora")
    @classmethod
    def _gateable_lora(cls, value: lora_method.Config) -> lora_method.Config:
        if value.dora:
            raise ValueError(
                "dora: DoRA rescales the whole weight, so its update is no additive term a gate can "
                "scale; set method.lora.dora to false"
            )
        return value

    @field_validator("adapter")
    @classmethod
    def _gateable_adapter(cls, value: adapter_method.Config) -> adapter_method.Config:
        if value.placement != "pfeiffer":
            raise ValueError(
                f"placement: {value.placement} is not UniPELT's adapter; set method.adapter.placement "
                "to pfeiffer (one adapter after each feed-forward block)"
            )
        return value


def report(model: nn.Module) -> dict[str, Any]:
    """The mean of each gate per block over the last evaluation's real tokens (null for a gate that did not run)."""
    rows = gates_by_block(model)
    return {
        "tokens": max((g.tokens for row in rows for g in row.values()), default=0),
        "layers": [{name: gate.mean() for name, gate in row.items()} for row in rows],
    }


def resolve(cfg: Config) -> base.Method:
    parts = combine("unipelt", Config, [cfg.lora, cfg.adapter, cfg.prefix])

    def trainable(model: nn.Module, config: Config) -> list[nn.Parameter]:
        gates = [p for m in model.modules() if isinstance(m, Gate) for p in m.parameters()]
        return list(parts.trainable(model, config)) + gates

    return dataclasses.replace(  # the gates depend on the input: no merging
        parts,
        apply=lambda model, config: add_gates(parts.apply(model, config)),
        trainable=trainable,
        merging=None,
        hooks=dataclasses.replace(parts.hooks, report=report),
        about=METHOD.about,
    )


METHOD = base.Method(
    name="unipelt",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset({base.Claim.LINEARS, base.Claim.SUB_BLOCKS, base.Claim.WHOLE_MODEL}),
    trainable=resolved_trainable,
    resolve=resolve,
    about=base.About(
        "LoRA + prefix tuning + a pfeiffer adapter, each scaled by a learned gate (mean gates in method_report.json)",
        "Mao et al. 2022, UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning, arXiv:2110.07577",
        base.Recommended(2e-3, "ftune's unipelt_sst2 recipe (README)"),
    ),
)
