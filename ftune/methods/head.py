"""Head only (linear probe): the pretrained body is frozen and only the task head trains.

For classification the head is the new classifier (every parameter outside `model.base_model`); for a causal LM it
is the output projection (`get_output_embeddings()`), which is tied to the input embeddings in many LMs.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ftune.errors import MethodError
from ftune.methods.base import Method, MethodConfig, Recommended, fold_nothing


class Config(MethodConfig):
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


METHOD = Method(
    name="head",
    config_cls=Config,
    trainable=trainable,
    merge=fold_nothing,
    unmerge=fold_nothing,
    quantized_base=True,
    summary="only the task head trains (linear probe)",
    paper="Pfeiffer et al. 2021, AdapterFusion, Table 1 'Head' baseline, arXiv:2005.00247",
    recommended=Recommended(1e-2, "a logistic regression on frozen features: at head_sst2's 2e-3 MiniLM's probe "
                            "reached 0.635 in a whole epoch and had not left chance after 60 steps (README)"),
)
