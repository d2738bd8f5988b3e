"""Head only (linear probe): the pretrained body is frozen and only the task head trains.

For classification the head is the new classifier (every parameter outside `model.base_model`); for a causal LM it
is the output projection (`get_output_embeddings()`), which is tied to the input embeddings in many LMs.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ftune.errors import MethodError
from ftune.methods import base


class Config(base.MethodConfig):
    name: Literal["head"] = "head"


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    body = {id(p) for p in model.base_model.parameters()}
    outside_body = [p for p in model.parameters() if id(p) not in body]
    if outside_body:
        return outside_body
    output = model.get_output_embeddings()
    if output is None:
        raise MethodError(f"head: {type(model).__name__} has no task head or output embeddings to train")
    return list(output.parameters())


METHOD = base.Method(
    name="head",
    config_cls=Config,
    trains=base.Trains.EXISTING,
    claims=frozenset(),
    trainable=trainable,
    merging=base.ALREADY_MERGED,
    runs_with=base.RunsWith(quantized_base=True),
    about=base.About(
        "only the task head trains (linear probe)",
        "Pfeiffer et al. 2021, AdapterFusion, Table 1 'Head' baseline, arXiv:2005.00247",
        base.Recommended(
            1e-2,
            "a logistic regression on frozen features: MiniLM's probe barely left chance at head_sst2's 2e-3 (README)",
        ),
    ),
)
