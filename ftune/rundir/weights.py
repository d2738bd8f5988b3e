"""A method's weights read back into a model: the one place method.safetensors meets the modules it came from."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ftune.errors import RunDirError
from ftune.rundir.layout import WEIGHTS
from ftune.rundir.read import read_weights

if TYPE_CHECKING:
    import torch
    from torch import nn


def load_weights(folder: Path, model: nn.Module) -> None:
    """Load method weights into a freshly attached model: the names must be exactly its trainable parameters and
    `saved_buffers` (a sparse mask's indices, which the values need: loaded first)."""
    import torch

    tensors = read_weights(folder)
    buffers = saved_buffers(model)
    expected = {n for n, p in model.named_parameters() if p.requires_grad} | buffers.keys()
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        which = f"missing {min(missing)}" if missing else f"unexpected {min(unexpected)}"
        raise RunDirError(
            f"{folder / WEIGHTS}: does not fit this method and model ({which}); was it written by another run?"
        )
    params = dict(model.named_parameters()) | buffers
    with torch.no_grad():
        for name in sorted(tensors, key=lambda n: n not in buffers):
            params[name].copy_(tensors[name])


def saved_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are part of a method's weights, by name: those its modules list in `saved_buffers`."""
    return {
        f"{name}.{b}" if name else b: getattr(m, b)
        for name, m in model.named_modules()
        for b in getattr(m, "saved_buffers", ())
    }
