"""What the QLoRA tests share (tests/test_qlora*.py): the NF4 quantisation with fp32 compute, a LoRA recipe over a
quantised base, training it quietly, and a small padded batch for a forward."""

from __future__ import annotations

import io

import torch
from rich.console import Console

from conftest import recipe_doc
from ftune.recipe import validate_recipe
from ftune.run.train import train

NF4 = {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}


def _recipe(kind, model, data, out, method=None, quantization=None, **train_args):
    doc = recipe_doc(kind, model, data, out, method or {"name": "lora", "r": 4, "alpha": 8}, **train_args)
    doc["model"]["quantization"] = quantization or NF4
    return validate_recipe(doc)


def _train(recipe):
    return train(recipe, console=Console(file=io.StringIO()))


def _inputs():
    ids = torch.randint(5, 25, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}
