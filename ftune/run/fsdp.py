"""Fully sharded data parallel (FSDP2, through accelerate's plugin): `train.distributed: fsdp`.

Each process holds a shard of every parameter, gradient and optimizer state (Zhao et al. 2023, "PyTorch FSDP"),
with one FSDP unit per transformer block. What the loop writes must be whole: the method's weights and the optimizer
state are gathered into full tensors on the main process (torch.distributed.checkpoint's state-dict API), and a
resume hands them back, each process keeping its shard.

accelerate shards only on GPUs: on CPU processes it ignores the plugin and trains plain DDP without a word, so
`train.distributed: fsdp` without CUDA is refused rather than silently not sharded.
"""

from __future__ import annotations

import torch
from torch import nn

from ftune.errors import RecipeError


def gpus_shard() -> bool:
    """Whether accelerate will shard here (CUDA GPUs)."""
    return torch.cuda.is_available()


def check(method_name: str, custom_saving: bool, stepwise_state: bool) -> None:
    """Refuse what cannot shard, in one line naming the field."""
    if not gpus_shard():
        raise RecipeError(
            "train.distributed: fsdp shards over CUDA GPUs; accelerate trains CPU processes as plain DDP "
            "(it would not shard), so use ddp here"
        )
    if custom_saving or stepwise_state:
        why = "saves what its encoder produces" if custom_saving else "reads whole gradients between steps"
        raise RecipeError(f"train.distributed: {method_name} {why}, which sharded parameters do not give; use ddp")


def _options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def gathered_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as full tensors, on the main process (empty elsewhere). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(ignore_frozen_params=True))


def gathered_optimizer(model: nn.Module, optimizer) -> dict:
    """The optimizer state as full tensors, on the main process. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load(model: nn.Module, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Hand full weights and optimizer state back: each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())
