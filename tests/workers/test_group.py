"""`workers.group.shard_groups`: contiguous shards of whole groups over data-parallel ranks."""

from __future__ import annotations

import pytest

from workers.group import shard_groups


def test_even_split():
    # 8 items in groups of 2 -> 4 groups, 2 per rank.
    assert shard_groups(8, 2, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_uneven_split_gives_earlier_ranks_the_extra_group():
    # 5 groups of 2 over 3 ranks: 5 = 2 + 2 + 1.
    assert shard_groups(10, 2, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_fewer_groups_than_ranks_leaves_empty_shards():
    assert shard_groups(4, 4, 3) == [[0, 1, 2, 3], [], []]


def test_one_rank_takes_everything():
    assert shard_groups(6, 3, 1) == [[0, 1, 2, 3, 4, 5]]


def test_shards_cover_every_item_once_and_keep_groups_whole():
    for n_groups in range(0, 9):
        for k in (1, 2, 4):
            for world in (1, 2, 3, 5):
                shards = shard_groups(n_groups * k, k, world)
                assert len(shards) == world
                assert [i for s in shards for i in s] == list(range(n_groups * k))
                assert all(len(s) % k == 0 for s in shards)
                sizes = [len(s) // k for s in shards]
                assert max(sizes) - min(sizes) <= 1


def test_items_not_in_whole_groups_are_rejected():
    with pytest.raises(ValueError, match="7 items"):
        shard_groups(7, 2, 2)
