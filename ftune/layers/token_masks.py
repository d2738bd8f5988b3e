"""Each stack's mask of real tokens, handed to the modules in its blocks that average or count over tokens
(UniPELT's gates, AdapterFusion's attention statistics), and their restart when an evaluation begins.

A module inside a block sees hidden states (B, T, d) but not the attention mask, which enters the model (or, in an
encoder-decoder model, each stack) as a keyword. `hand_over_masks` registers one forward pre-hook per stack of
blocks that sets `token_mask` (B, T) on each receiver of the stack before the stack runs:
- a model with one stack: a hook on the model given (the outermost wrapper, before a prefix wrapper changes the
  mask), handing over its `attention_mask`;
- an encoder-decoder model: a hook on the encoder, handing over the source mask, and one on the decoder, handing
  over the decoder's own mask (None when the batch has none, as ftune's seq2seq batches: every position counts).
  A mask wider than the stack's input is cut to its last T columns: prefix tuning puts its slots in front of the
  source mask before the encoder runs, and the decoder gets the source mask with those slots as its encoder mask.
Each hook also calls `restart()` on its receivers when its stack runs in eval mode after training (an evaluation
begins), so sums kept in eval mode cover the last evaluation only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ftune.models.arch import is_encoder_decoder


def real_tokens(mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """The last `width` columns of `mask` (B, >= width): the real tokens of a (B, width) input."""
    return mask[:, -width:] if mask is not None and mask.shape[1] > width else mask


def hand_over_masks(model: nn.Module, kind: type[nn.Module]) -> None:
    """Before each stack of `model` runs, hand its mask to every module of type `kind` in it (see the module doc).
    Those modules have a `token_mask` attribute and a `restart()` method."""
    stacks = [model.get_encoder(), model.get_decoder()] if is_encoder_decoder(model) else [model]
    for stack in stacks:
        # first among the stack's pre-hooks: one that runs a receiver (UniPELT's decoder prefix gates) gets the mask
        # and, at an evaluation's start, counts after the restart
        stack.register_forward_pre_hook(
            _hook([m for m in stack.modules() if isinstance(m, kind)]), prepend=True, with_kwargs=True
        )


def _hook(receivers: list[nn.Module]) -> Callable:
    last = {"training": True}

    def hand_over(module: nn.Module, args: tuple, kwargs: dict) -> None:
        restart, last["training"] = not module.training and last["training"], module.training  # eval starts
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        reference = kwargs.get("input_ids", args[0] if args else None)
        reference = reference if reference is not None else kwargs.get("inputs_embeds")
        if reference is not None:
            mask = real_tokens(mask, reference.shape[1])
        for receiver in receivers:
            receiver.token_mask = mask
            if restart:
                receiver.restart()

    return hand_over
