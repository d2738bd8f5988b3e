"""A stack of transformer blocks from which blocks are dropped while training goes on (progressive shrinking).

The stack keeps every block under its original index, so parameter names, the optimizer's parameter groups and
checkpoints stay those of the full model, while the model's own forward sees only the blocks still kept: iterating,
indexing, slicing and len() read the kept blocks. A dropped block is skipped, its parameters get no gradient, and
AdamW leaves a parameter without a gradient (and its moments) untouched, so it stops training without the optimizer
being rebuilt. Which blocks are dropped (`dropped`) travels with the weights (`saved_buffers`), so a checkpoint or a
finished run reloads into the structure it was saved with.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ftune.models.depth import Depth, renumber


class ShrinkingBlocks(nn.ModuleList):
    """A read-only view of a ModuleList of n blocks as the k blocks not dropped.

    Args:
        blocks: the stack's n blocks, in order.
        depth: what must follow the stack's count (the config's count and per-layer lists, see models/depth.py).

    `dropped`: (n,) bool, a plain CPU tensor rather than a registered buffer, so moving the model to a device leaves it
    on the host, where every forward reads it without a device sync. `collapse()` re-keys the kept blocks 0..k-1
    and hides the dropped ones (the standalone model's names, for `ftune merge`); `expand()` undoes it. (Not
    `merged`: `unwrap_merged` deletes merged modules that hold saved buffers.)
    """

    saved_buffers = ("dropped",)

    def __init__(self, blocks: Iterable[nn.Module], depth: Depth) -> None:
        super().__init__()
        for i, block in enumerate(blocks):
            self.add_module(str(i), block)
        self.dropped = torch.zeros(len(self._modules), dtype=torch.bool)
        self.depth = depth
        self.collapsed = False
        self._every_block: dict[str, nn.Module] | None = None

    def kept(self) -> list[int]:
        """Original indices of the blocks not dropped."""
        return [i for i, gone in enumerate(self.dropped.tolist()) if not gone]

    def _visible(self) -> list[nn.Module]:
        blocks = list(self._modules.values())
        return blocks if self.collapsed else [blocks[i] for i in self.kept()]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._visible())

    def __len__(self) -> int:
        return len(self._visible())

    def __getitem__(self, index: int | slice) -> nn.Module:
        visible = self._visible()
        return nn.ModuleList(visible[index]) if isinstance(index, slice) else visible[index]

    def drop(self, indices: Iterable[int]) -> None:
        """Drop the blocks of original indices `indices` (already dropped ones stay dropped)."""
        self.dropped[list(indices)] = True
        self.sync()

    def sync(self) -> None:
        """Renumber the kept blocks' cache slots and the config's counts after `dropped` changed (also by loading
        saved weights into it: `train()` and `eval()` call this, and every run calls one of them before use)."""
        if not self.collapsed:
            renumber(self._visible(), self.kept(), self.depth)

    def train(self, mode: bool = True) -> ShrinkingBlocks:
        super().train(mode)
        self.sync()
        return self

    def collapse(self) -> None:
        if self.collapsed:
            return
        self.sync()
        self._every_block = dict(self._modules)
        kept = self._visible()
        self._modules.clear()
        self._modules.update((str(j), block) for j, block in enumerate(kept))
        self.collapsed = True

    def expand(self) -> None:
        if not self.collapsed:
            return
        self._modules.clear()
        self._modules.update(self._every_block)
        self._every_block, self.collapsed = None, False


def shrinking_stacks(model: nn.Module) -> list[ShrinkingBlocks]:
    return [m for m in model.modules() if isinstance(m, ShrinkingBlocks)]


def dropped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each stack's `dropped`, by its name in the model (what a run saves beside its weights)."""
    return {f"{name}.dropped": m.dropped for name, m in model.named_modules() if isinstance(m, ShrinkingBlocks)}


def collapse_all(model: nn.Module) -> None:
    for stack in shrinking_stacks(model):
        stack.collapse()


def expand_all(model: nn.Module) -> None:
    for stack in shrinking_stacks(model):
        stack.expand()
