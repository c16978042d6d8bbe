"""Pure tests of mini/micro-batching, padding trimming and the LR schedule (no DeepSpeed)."""

from __future__ import annotations

import math

import pytest
import torch

from prime.train.batching import make_micro_batches, make_mini_batches
from prime.train.engine import lr_factor


def _flatten(batches):
    return sorted(i for mb in batches for i in mb)


def test_micro_batches_pack_longest_first_within_budget():
    # lengths 5, 3, 8, 2 with budget 10 (rows x longest row):
    # longest first: 8 alone (adding 5 -> 2 x 8 = 16 > 10); then 5 + 3 -> 2 x 5 = 10 fits,
    # adding 2 -> 3 x 5 = 15 > 10; then 2 alone.
    assert make_micro_batches([5, 3, 8, 2], 10) == [[2], [0, 1], [3]]


def test_micro_batches_cover_every_sample_once():
    lengths = [7, 1, 4, 4, 9, 2, 3, 6, 5, 5]
    for budget in (1, 9, 12, 30, 1000):
        mbs = make_micro_batches(lengths, budget)
        assert _flatten(mbs) == list(range(len(lengths)))
        for mb in mbs:
            # Within budget unless a single sample is already over it.
            assert len(mb) * max(lengths[i] for i in mb) <= budget or len(mb) == 1


def test_sample_longer_than_budget_gets_its_own_micro_batch():
    assert make_micro_batches([50, 2, 2], 10) == [[0], [1, 2]]


def test_micro_batches_keep_groups_whole():
    # groups: {0, 1} (max len 6), {2, 3} (max 2), {4, 5} (max 9). Budget 24:
    # group 2 first (2 x 9 = 18), + group 0 -> 4 x 9 = 36 > 24, so close; group 0 (2 x 6 = 12)
    # + group 1 -> 4 x 6 = 24 fits.
    lengths = [6, 1, 2, 2, 9, 3]
    group_ids = [0, 0, 1, 1, 2, 2]
    assert make_micro_batches(lengths, 24, group_ids) == [[4, 5], [0, 1, 2, 3]]
    # A group over the budget is still kept whole.
    assert make_micro_batches(lengths, 5, group_ids) == [[4, 5], [0, 1], [2, 3]]


def test_padding_free_micro_batches_count_real_tokens():
    # lengths 5, 3, 8, 2 with budget 10 on the sum of lengths: 8 + 2 = 10 would fit but units go
    # longest first: 8 alone (8 + 5 = 13 > 10); 5 + 3 = 8, + 2 = 10 fits.
    assert make_micro_batches([5, 3, 8, 2], 10, padding_free=True) == [[2], [0, 1, 3]]
    # Many short rows beside a long one: padded, 4 x 9 = 36 > 20 splits them; packed, 9 + 3 x 1 = 12 fits.
    assert make_micro_batches([9, 1, 1, 1], 20) == [[0, 1], [2, 3]]
    assert make_micro_batches([9, 1, 1, 1], 20, padding_free=True) == [[0, 1, 2, 3]]
    lengths = [7, 1, 4, 4, 9, 2, 3, 6, 5, 5]
    for budget in (1, 9, 12, 30, 1000):
        mbs = make_micro_batches(lengths, budget, padding_free=True)
        assert _flatten(mbs) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in mb) <= budget or len(mb) == 1 for mb in mbs)
    # Whole groups, counted by their real tokens: {4, 5} = 12, + {0, 1} = 19 <= 20, + {2, 3} = 23 > 20.
    assert make_micro_batches([6, 1, 2, 2, 9, 3], 20, [0, 0, 1, 1, 2, 2], padding_free=True) == [[0, 1, 4, 5], [2, 3]]


def test_micro_batches_reject_bad_input():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        make_micro_batches([1, 2], 0)
    with pytest.raises(ValueError, match="group_ids"):
        make_micro_batches([1, 2], 10, group_ids=[0])


def test_mini_batches_slices_and_whole_groups():
    assert make_mini_batches(5, 2) == [[0, 1], [2, 3], [4]]
    # Groups of 3 with a mini-batch of 4 responses: a mini-batch closes once it holds >= 4.
    assert make_mini_batches(6, 4, [0, 0, 0, 1, 1, 1]) == [[0, 1, 2, 3, 4, 5]]
    assert make_mini_batches(6, 2, [0, 1, 0, 1, 2, 2]) == [[0, 2], [1, 3], [4, 5]]


def test_lr_factor_warmup_then_constant_or_cosine():
    # Warm-up of 4 steps: 1/4, 2/4, 3/4, 4/4, then constant.
    assert [lr_factor(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # Cosine from 1 to min 0.1 over total 12 with 2 warm-up steps: at step 2 progress 0 -> 1.0;
    # at step 7 progress 0.5 -> 0.1 + 0.9 * 0.5 = 0.55; at 12 and beyond -> 0.1.
    kw = dict(warmup_steps=2, schedule="cosine", total_steps=12, min_lr_ratio=0.1)
    assert lr_factor(2, **kw) == pytest.approx(1.0)
    assert lr_factor(7, **kw) == pytest.approx(0.55)
    assert lr_factor(12, **kw) == pytest.approx(0.1)
    assert lr_factor(40, **kw) == pytest.approx(0.1)
    assert lr_factor(4, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(0, schedule="cosine")
    with pytest.raises(ValueError, match="constant"):
        lr_factor(0, schedule="linear")
