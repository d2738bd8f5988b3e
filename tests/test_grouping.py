"""Length-grouped batches (train.group_by_length): every epoch is still a permutation decided by (seed, epoch) alone,
whole optimizer steps are grouped (so accumulation and several processes see the same step rows), resuming
mid-epoch continues the same order, and padding really shrinks."""

from __future__ import annotations

import random

import pytest

from ftune.data.loader import MEGABATCH_STEPS, EpochBatches, example_length


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 200) for _ in range(n)]


def _padded(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("size", [1, 37, 1000])
def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch(size):
    lengths = _lengths(size)
    sampler = EpochBatches(size, 8, seed=3, lengths=lengths, step_batches=2)
    assert sorted(sampler.order(0)) == list(range(size))
    assert sampler.order(0) == EpochBatches(size, 8, seed=3, lengths=lengths, step_batches=2).order(0)
    if size > 16:
        assert sampler.order(0) != sampler.order(1)
        assert sampler.order(0) != EpochBatches(size, 8, seed=4, lengths=lengths, step_batches=2).order(0)


def test_steps_hold_similar_lengths_and_padding_shrinks():
    lengths = _lengths(2000)
    grouped = list(EpochBatches(2000, 16, seed=0, lengths=lengths))
    plain = list(EpochBatches(2000, 16, seed=0))
    real = sum(lengths)
    assert _padded(grouped, lengths) - real < 0.05 * (_padded(plain, lengths) - real)
    # grouping within megabatches, not over the epoch: steps of all lengths are spread through it
    firsts = [max(lengths[i] for i in b) for b in grouped[1:MEGABATCH_STEPS]]
    assert firsts != sorted(firsts, reverse=True)


@pytest.mark.parametrize(("batch", "accum", "world"), [(8, 1, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2), (1, 8, 1)])
def test_a_step_sees_the_same_rows_however_it_is_split(batch, accum, world):
    """Steps of 8 rows: one process with batch 8, accumulation of 4 × 2, two processes of 4, ...: the same rows."""
    size, lengths = 203, _lengths(203, seed=1)
    reference = list(EpochBatches(size, 8, seed=5, lengths=lengths))
    shards = [
        list(EpochBatches(size, batch, seed=5, rank=r, world=world, lengths=lengths, step_batches=accum))
        for r in range(world)
    ]
    full_steps = size // 8
    for step in range(full_steps):
        rows = [i for shard in shards for b in shard[step * accum : (step + 1) * accum] for i in b]
        assert sorted(rows) == sorted(reference[step])


def test_resuming_mid_epoch_continues_the_grouped_order():
    lengths = _lengths(90)
    whole = list(EpochBatches(90, 4, seed=1, rank=1, world=2, lengths=lengths))
    later = EpochBatches(90, 4, seed=1, rank=1, world=2, lengths=lengths)
    later.set_position(0, 5)
    assert list(later) == whole[5:] and len(later) == len(whole) - 5


def test_evaluation_order_is_not_grouped():
    assert EpochBatches(10, 3, seed=0, shuffle=False, lengths=_lengths(10)).order(0) == list(range(10))


def test_example_length_counts_what_a_batch_holds():
    assert example_length({"input_ids": [1, 2, 3], "labels": 0}) == 3
    assert example_length({"input_ids": [1, 2], "decoder_input_ids": [0, 5, 6], "labels": [5, 6, 1]}) == 5
    assert example_length({"input_ids": [[1, 2, 3], [1, 2]], "labels": [[1], [2]]}) == 5  # a preference pair


def test_evaluation_batches_run_longest_first_and_score_every_row_once(tiny_bert, cls_data, tmp_path):
    from types import SimpleNamespace

    from conftest import recipe_doc
    from ftune.assemble import eval_loader
    from ftune.recipe import Recipe

    recipe = Recipe.model_validate(recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", eval_batch_size=4))
    lengths = _lengths(30)
    examples = [{"input_ids": list(range(1, n + 1)), "labels": i} for i, n in enumerate(lengths)]
    batches = list(eval_loader(recipe, examples, SimpleNamespace(pad_token_id=0)))
    rows = [int(label) for b in batches for label in b["labels"]]
    assert sorted(rows) == list(range(30))  # each row once
    assert [lengths[i] for i in rows] == sorted(lengths, reverse=True)
    # sorted rows pad no wider than their own longest: far less padding than the data order
    assert sum(b["input_ids"].numel() for b in batches) < sum(
        len(chunk) * max(chunk) for chunk in (lengths[i : i + 4] for i in range(0, 30, 4))
    )
