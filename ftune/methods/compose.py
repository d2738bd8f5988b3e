"""Several methods applied to one model together: a recipe whose `method:` is a list.

E.g. LoRA + BitFit (low-rank updates and every bias), or prefix tuning + a parallel adapter (the MAM adapter's parts):
    method:
      - {name: lora, targets: query-value}
      - {name: bitfit}
The parts are applied in the order the model needs and train together (ftune/methods/combine.py says how). The task head
trains unless a part sets `train_head: false`. Parts that rebuild the same part of the model are refused with the
reason: LoRA and AdaLoRA both replace the linears, two adapter methods both wrap the sub-block outputs, two soft
prompts both wrap the model, and full fine-tuning already trains every weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from ftune.methods import base
from ftune.methods.combine import check_compatible, combine, resolved_trainable

if TYPE_CHECKING:
    from ftune.methods import AnyMethodConfig


class Config(base.MethodConfig):
    name: Literal["compose"] = "compose"
    methods: list[AnyMethodConfig] = Field(min_length=2)
    """The methods to apply together, each a method section of its own (name and options)."""

    @model_validator(mode="before")
    @classmethod
    def _head_from_parts(cls, data: Any) -> Any:
        # the list form has no place for the composite's own train_head: a part that turns the head off decides
        if isinstance(data, dict) and "train_head" not in data and isinstance(data.get("methods"), list):
            heads = [part.get("train_head", True) for part in data["methods"] if isinstance(part, dict)]
            data = {**data, "train_head": all(h is not False for h in heads)}
        return data

    @model_validator(mode="after")
    def _compatible(self) -> Config:
        check_compatible(self.methods)
        return self


def resolve(cfg: Config) -> base.Method:
    return combine("+".join(part.name for part in cfg.methods), Config, cfg.methods)


METHOD = base.Method(  # what it trains and claims: the record `resolve` makes from the parts
    name="compose",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset(),
    trainable=resolved_trainable,
    resolve=resolve,
    about=base.About(
        "several methods together (a recipe's `method:` as a list), e.g. LoRA + BitFit, prefix + adapter",
        "the parts' papers",
    ),
)
