"""The optimizer, chosen by name (`train.optimizer`): torch's AdamW, or bitsandbytes' 8-bit / paged AdamW.

8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861) keeps both
moments block-wise quantised to 8 bits; bitsandbytes keeps tensors under 4096 elements in 32 bits. Paged optimizers
(the QLoRA paper, §3) hold their state in CUDA unified memory, evicted to CPU RAM under memory pressure; on CPU
bitsandbytes warns and runs them unpaged. All share AdamW's update and defaults (betas 0.9/0.999, eps 1e-8).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ftune.models.quantize import require_bitsandbytes

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "paged_adamw")
_BNB_CLASSES = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
    "paged_adamw": "PagedAdamW",
}


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    exempt: Iterable[torch.nn.Parameter] = (),
    fused: bool = False,
):
    """The optimizer `name` (one of OPTIMIZERS) over `params`, with decoupled weight decay except on `exempt`
    (a second parameter group with weight_decay 0: L2-SP's parameters, which its own penalty regularises).
    `fused`: torch's AdamW updates every parameter in one kernel (the caller passes it for a CUDA run; the same
    arithmetic as the per-tensor loop)."""
    params, skip = list(params), {id(p) for p in exempt}
    if skip:
        groups = [
            {"params": [p for p in params if id(p) not in skip]},
            {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0},
        ]
        params = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    require_bitsandbytes(f"train.optimizer: {name}")
    import bitsandbytes as bnb

    return getattr(bnb.optim, _BNB_CLASSES[name])(params, lr=lr, weight_decay=weight_decay)


def training_optimizer(train, model: torch.nn.Module, decay_exempt, fused: bool):
    """`train.optimizer` (the recipe's `train` section) over `model`'s trainable parameters, those `decay_exempt`
    returns (a method's: L2-SP's) without weight decay: the loop's optimizer, and the one its memory estimate
    steps."""
    exempt = decay_exempt(model) if decay_exempt else []
    return make_optimizer(
        train.optimizer,
        [p for p in model.parameters() if p.requires_grad],
        train.lr,
        train.weight_decay,
        exempt,
        fused=fused,
    )


def lr_multiplier(kind: str, warmup: int, total: int):
    """Linear warmup to the peak, then linear or cosine decay to zero, or constant (as transformers' schedules).

    Written out rather than imported: transformers' optimization module drags in bitsandbytes at import.
    """

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return multiplier
