"""Examples into padded batches: the collator, and the resumable sampler that shards each epoch over processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ftune.data.encoded import IGNORE_INDEX

# optimizer steps per megabatch when grouping by length: transformers' LengthGroupedSampler sorts 50 batches
MEGABATCH_STEPS = 50


def collate(pad_token_id: int):
    """Pad a list of examples to the longest one (right padding; the attention mask hides it).

    Per-token labels are padded with IGNORE_INDEX to the longest label row (as wide as input_ids for token tasks; as
    wide as the target for seq2seq, whose `decoder_input_ids` are padded with the pad id: the decoder is causal, so
    padding after a row's target changes none of its positions). An example may hold a group of sequences (a
    preference pair): its members become rows, member by member (`members`). A tensor an objective added to every
    example before training (a teacher's logits per row: Objective.prepare) is stacked under its key.
    """

    def pad(rows: list[list[int]], fill: int) -> torch.Tensor:
        out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def _collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if isinstance(examples[0]["input_ids"][0], list):  # a group of sequences per example: a preference pair
            examples = members(examples)
        ids = pad([e["input_ids"] for e in examples], pad_token_id)
        mask = pad([[1] * len(e["input_ids"]) for e in examples], 0)
        if isinstance(examples[0]["labels"], list):
            labels = pad([e["labels"] for e in examples], IGNORE_INDEX)
        else:
            labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "decoder_input_ids" in examples[0]:
            batch["decoder_input_ids"] = pad([e["decoder_input_ids"] for e in examples], pad_token_id)
        for key, value in examples[0].items():
            if isinstance(value, torch.Tensor):  # one shape in every example
                batch[key] = torch.stack([e[key] for e in examples])
        return batch

    return _collate


def members(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Examples that each hold a group of sequences (every value a list, or a tensor along its first axis, with one
    entry per member: a preference pair's chosen and rejected), as one row per member, member by member: the first
    members of all examples, then the second members, ... (so a batch of B pairs is B chosen rows over B rejected
    rows: Task.paired)."""
    size = len(examples[0]["input_ids"])
    return [{key: value[m] for key, value in e.items()} for m in range(size) for e in examples]


class EpochBatches(Sampler[list[int]]):
    """One process's micro-batches, epoch after epoch: a fresh permutation per epoch from (seed, epoch) alone, so a
    resumed run sees exactly the same order.

    Several processes: each global micro-batch (`world` × `batch_size` consecutive rows of the epoch's order) is cut
    into `world` contiguous parts and process `rank` reads part `rank`, so the processes' rows are disjoint and
    together are what one process reads with batch `world` × `batch_size`. The epoch's last, smaller global batch is
    cut into near-equal parts; when fewer rows than processes remain they are left out (every process must take the
    same number of steps). `set_position(epoch, batch)` skips the first `batch` global micro-batches of that epoch.

    Grouped by length (`lengths` given, shuffling): the epoch's permutation is cut into megabatches of
    MEGABATCH_STEPS optimizer steps' rows (`step_batches` global micro-batches per step), each sorted longest first,
    then cut into steps whose order is shuffled by the same generator, as transformers' LengthGroupedSampler groups
    but with whole steps: a step sees the same rows however it is split into micro-batches and processes. Padding then
    nearly vanishes, and no step is padded wider than a random one (the longest step is not moved first: a short run
    peaks no higher than an ungrouped one).
    The order is still a function of (seed, epoch) alone, so resuming and sharding stay exact.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        lengths: list[int] | None = None,
        step_batches: int = 1,
    ) -> None:
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.lengths, self.step_batches = lengths, step_batches
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start = epoch, batch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return self._grouped(order, generator) if self.lengths is not None else order

    def _grouped(self, order: list[int], generator: torch.Generator) -> list[int]:
        step = self.batch_size * self.world * self.step_batches
        mega, lengths = MEGABATCH_STEPS * step, self.lengths
        steps = []
        for first in range(0, len(order), mega):  # sorted() is stable: equal lengths keep their random order
            block = sorted(order[first : first + mega], key=lambda i: -lengths[i])
            steps += [block[k : k + step] for k in range(0, len(block), step)]
        last = [steps.pop()] if steps and len(steps[-1]) < step else []  # the epoch's one short step stays last
        steps = [steps[k] for k in torch.randperm(len(steps), generator=generator).tolist()]
        return [i for rows in steps + last for i in rows]

    def __iter__(self):
        order, span = self.order(self.epoch), self.batch_size * self.world
        for first in range(self.start * span, self.size, span):
            chunk = order[first : first + span]
            if len(chunk) < self.world:
                return
            share, extra = divmod(len(chunk), self.world)
            lo = self.rank * share + min(self.rank, extra)
            yield chunk[lo : lo + share + (self.rank < extra)]

    def __len__(self) -> int:
        span = self.batch_size * self.world
        full, rest = divmod(self.size, span)
        return max(0, full + (rest >= self.world) - self.start)


def make_loader(
    examples: list[dict[str, Any]],
    batch_size: int,
    pad_token_id: int,
    seed: int,
    shuffle: bool,
    rank: int = 0,
    world: int = 1,
    *,
    group_by_length: bool = False,
    step_batches: int = 1,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
) -> DataLoader:
    """Training batches of this process (`EpochBatches`); evaluation passes shuffle=False and its own shard.

    `group_by_length`: rows of similar length share a step (`step_batches` micro-batches per optimizer step);
    `collate_fn`: instead of padding (packing.collate_packed).
    """
    lengths = [example_length(e) for e in examples] if group_by_length else None
    batches = EpochBatches(len(examples), batch_size, seed, shuffle, rank, world, lengths, step_batches)
    # its own generator: a DataLoader iterator otherwise draws a worker seed from the global RNG, which would
    # shift dropout masks between a resumed run and an uninterrupted one
    return DataLoader(
        examples,
        batch_sampler=batches,
        collate_fn=collate_fn or collate(pad_token_id),
        generator=torch.Generator().manual_seed(seed),
    )


def example_length(example: dict[str, Any]) -> int:
    """Tokens an example puts into a batch: its input ids (every member's, for a group of sequences) and its
    decoder input ids (seq2seq)."""
    total = 0
    for key in ("input_ids", "decoder_input_ids"):
        ids = example.get(key, ())
        total += sum(len(m) for m in ids) if ids and isinstance(ids[0], list) else len(ids)
    return total


def token_count(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens in a host batch, padding left out: its attention mask's ones, or every position of a batch
    without padding (packed rows)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
