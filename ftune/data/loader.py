"""Examples into padded batches: the collator, and the resumable sampler that shards each epoch over processes."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ftune.tasks.base import IGNORE_INDEX


def collate(pad_token_id: int):
    """Pad a list of examples to the longest one (right padding; the attention mask hides it).

    Per-token labels are padded with IGNORE_INDEX to the longest label row (as wide as input_ids for token tasks; as
    wide as the target for seq2seq, whose `decoder_input_ids` are padded with the pad id: the decoder is causal, so
    padding after a row's target changes none of its positions).
    """

    def pad(rows: list[list[int]], fill: int) -> torch.Tensor:
        out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def _collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = pad([e["input_ids"] for e in examples], pad_token_id)
        mask = pad([[1] * len(e["input_ids"]) for e in examples], 0)
        if isinstance(examples[0]["labels"], list):
            labels = pad([e["labels"] for e in examples], IGNORE_INDEX)
        else:
            labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "decoder_input_ids" in examples[0]:
            batch["decoder_input_ids"] = pad([e["decoder_input_ids"] for e in examples], pad_token_id)
        return batch

    return _collate


class EpochBatches(Sampler[list[int]]):
    """One process's micro-batches, epoch after epoch: a fresh permutation per epoch from (seed, epoch) alone, so a
    resumed run sees exactly the same order.

    Several processes: each global micro-batch (`world` × `batch_size` consecutive rows of the epoch's order) is cut
    into `world` contiguous parts and process `rank` reads part `rank`, so the processes' rows are disjoint and
    together are what one process reads with batch `world` × `batch_size`. The epoch's last, smaller global batch is
    cut into near-equal parts; when fewer rows than processes remain they are left out (every process must take the
    same number of steps). `set_position(epoch, batch)` skips the first `batch` global micro-batches of that epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start = epoch, batch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self):
        order, span = self.order(self.epoch), self.batch_size * self.world
        for first in range(self.start * span, self.size, span):
            chunk = order[first:first + span]
            if len(chunk) < self.world:
                return
            share, extra = divmod(len(chunk), self.world)
            lo = self.rank * share + min(self.rank, extra)
            yield chunk[lo:lo + share + (self.rank < extra)]

    def __len__(self) -> int:
        span = self.batch_size * self.world
        full, rest = divmod(self.size, span)
        return max(0, full + (rest >= self.world) - self.start)


def make_loader(examples: list[dict[str, Any]], batch_size: int, pad_token_id: int, seed: int, shuffle: bool,
                rank: int = 0, world: int = 1) -> DataLoader:
    """Training batches of this process (`EpochBatches`); evaluation passes shuffle=False and its own shard."""
    batches = EpochBatches(len(examples), batch_size, seed, shuffle, rank, world)
    # its own generator: a DataLoader iterator otherwise draws a worker seed from the global RNG, which would
    # shift dropout masks between a resumed run and an uninterrupted one
    return DataLoader(examples, batch_sampler=batches, collate_fn=collate(pad_token_id),
                      generator=torch.Generator().manual_seed(seed))
