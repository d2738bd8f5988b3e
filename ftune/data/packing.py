"""Padding-free packing of causal-LM micro-batches (data.packing): a micro-batch's sequences end to end in one row.

Each sequence keeps its own position ids (0, 1, ... restarting at every sequence) and the row has no attention mask:
transformers then reads the sequence boundaries from the position ids and keeps attention inside each sequence (its
"packed sequences" masks, as `DataCollatorWithFlattening` feeds them; flash-attention kernels skip the blocks between
sequences, sdpa and eager mask them). The first label of every sequence is dropped (IGNORE_INDEX), so the last token
of one sequence never learns to predict the first of the next: the row's next-token loss is the sum of the
sequences' losses, exactly the unpacked batch's, over the same count. The micro-batch's rows and their order are
the sampler's, unchanged, so accumulation, sharding and resuming are as without packing.

Whether a model keeps packed sequences apart depends on its code, so `require_isolation` checks it on the model
itself before training (a model or method that builds its own mask would silently let sequences see each other).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ftune.data.encoded import IGNORE_INDEX
from ftune.errors import RecipeError

PACKED_KEYS = {"input_ids", "labels"}


def collate_packed(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One (1, N) row of `examples`' N tokens: input_ids, position_ids restarting per sequence, and labels whose
    first position per sequence is IGNORE_INDEX (a next-token loss never reads it within its own sequence)."""
    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids += e["input_ids"]
        positions += range(len(e["input_ids"]))
        labels += [IGNORE_INDEX, *e["labels"][1:]]
    as_row = lambda values: torch.tensor([values], dtype=torch.long)
    return {"input_ids": as_row(ids), "position_ids": as_row(positions), "labels": as_row(labels)}


def check_examples(examples: list[dict[str, Any]]) -> None:
    """Packing concatenates token lists only: examples carrying more (an objective's per-example values, a pair of
    sequences) are refused in one line."""
    extra = set(examples[0]) - PACKED_KEYS
    if extra or not isinstance(examples[0]["labels"], list) or isinstance(examples[0]["input_ids"][0], list):
        what = f"carry {', '.join(sorted(extra))}" if extra else "are not single token sequences"
        raise RecipeError(
            f"data.packing: the training examples {what}, which packing cannot join into one row; "
            "set data.packing: false"
        )


def require_isolation(model: nn.Module, examples: list[dict[str, Any]]) -> None:
    """Check that `model` computes for two packed sequences exactly what it computes for each alone; RecipeError
    otherwise. Turns the model's key/value cache off first: training needs none, and with a cache transformers
    builds an ordinary causal mask instead of the packed one."""
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    first, second = examples[0], examples[1 % len(examples)]
    pieces = [
        {"input_ids": first["input_ids"][:12], "labels": first["labels"][:12]},
        {"input_ids": second["input_ids"][:7], "labels": second["labels"][:7]},
    ]
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**{k: v.to(device) for k, v in collate_packed(pieces).items() if k != "labels"}).logits[0]
            alone = torch.cat(
                [model(input_ids=torch.tensor([p["input_ids"]], device=device)).logits[0] for p in pieces]
            )
        scale = 1.0 + float(alone.abs().max())
        apart = packed.shape == alone.shape and bool((packed.float() - alone.float()).abs().max() <= 1e-4 * scale)
    except (TypeError, ValueError, RuntimeError, AttributeError):  # e.g. a forward that takes no position_ids
        apart = False
    finally:
        model.train(training)
    if not apart:
        raise RecipeError(
            f"data.packing: {type(model).__name__} with this method does not keep packed sequences "
            "apart (its attention does not follow position ids); set data.packing: false"
        )
