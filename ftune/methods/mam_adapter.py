"""MAM adapter: prefix tuning on attention plus a scaled parallel adapter beside the feed-forward block.

He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv:2110.04366, §4.6: the
"Mix-And-Match" adapter puts a small modification on attention (prefixes, which §4.4 finds best there) and a larger
one on the feed-forward block (a parallel adapter with its output scaled by s, which §4.5 finds best there):
    attention: keys and values of every layer gain l prefix positions (`prefix_tuning`, trained through its MLP);
    FFN: h <- h + s * up(relu(down(x))), x the FFN's input, down Kaiming-uniform, up zero (`adapter`, parallel).
Composed from those two methods (ftune/methods/combine.py); its config holds theirs, under `prefix` and `adapter`.

Defaults are the paper's MAM adapter as Table 6 defines it for generation (XSum, WMT;
jxhe/unify-parameter-efficient-tuning README): l = 30 prefixes, FFN bottleneck 512, s = 4 (Table 5: s = 4 beats s = 1),
except that the prefixes train directly, as `prefix_tuning`'s default (its docstring says why): through the paper's
800-wide MLP (the reference code's mid_dim, also AdapterHub's MAMConfig) MAM did not learn on a small encoder, since
one learning rate serves both parts and the MLP needs a far smaller one; `prefix: {mlp_hidden: 800}` restores it. The
defaults are 6.7 % of BART-large, and wider than a small encoder (MiniLM's d is 384): for classification use the
paper's 0.5 % GLUE setting (exps/run_glue.sh: l = 16, bottleneck 16, s = 2), as recipes/mam_adapter_sst2.yaml does. A
part given in part (`adapter: {bottleneck: 16}`) keeps MAM's defaults for the rest. The adapter must stay parallel
beside the FFN; list `prefix_tuning` and `adapter` as a method list for another placement.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import field_validator, model_validator

from ftune.methods import base
from ftune.methods.adapter import Config as AdapterConfig
from ftune.methods.combine import combine, keep_part_defaults, resolved_trainable
from ftune.methods.prefix_tuning import Config as PrefixConfig

PREFIX = {"n_tokens": 30}
ADAPTER = {"placement": "parallel", "parallel_at": "ffn", "bottleneck": 512, "scaling": 4.0}


class Config(base.MethodConfig):
    name: Literal["mam_adapter"] = "mam_adapter"
    prefix: PrefixConfig = PrefixConfig(**PREFIX)
    """Prefix tuning on every attention layer; default l = 30, trained directly."""
    adapter: AdapterConfig = AdapterConfig(**ADAPTER)
    """The parallel adapter beside each feed-forward block; default bottleneck 512, scaling 4."""

    @model_validator(mode="before")
    @classmethod
    def _mam_defaults(cls, data: Any) -> Any:
        return keep_part_defaults(data, {"prefix": PREFIX, "adapter": ADAPTER})

    @field_validator("adapter")
    @classmethod
    def _parallel_ffn(cls, value: AdapterConfig) -> AdapterConfig:
        if value.placement != "parallel" or value.parallel_at != "ffn":
            raise ValueError(
                "MAM's adapter is parallel beside the feed-forward block (placement: parallel, "
                "parallel_at: ffn); for another placement list prefix_tuning and adapter as `method:`"
            )
        return value


def resolve(cfg: Config) -> base.Method:
    parts = combine("mam_adapter", Config, [cfg.prefix, cfg.adapter])
    return dataclasses.replace(parts, about=METHOD.about)


METHOD = base.Method(
    name="mam_adapter",
    config_cls=Config,
    trains=base.Trains.ADDED,
    trainable=resolved_trainable,
    resolve=resolve,
    claims=frozenset({base.Claim.SUB_BLOCKS, base.Claim.WHOLE_MODEL}),
    about=base.About(
        "prefix tuning on attention + a scaled parallel adapter on the feed-forward block",
        "He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning, arXiv:2110.04366",
        base.Recommended(
            3e-3,
            "the paper's 0.5 % GLUE setting, as recipes/mam_adapter_sst2.yaml (README)",
            {"prefix": {"n_tokens": 16}, "adapter": {"bottleneck": 16, "scaling": 2.0}},
        ),
    ),
)
