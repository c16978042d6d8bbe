"""Group filters: accuracy window and truncation, whole groups only."""

import pytest
import torch

from prime.algo.filters import accuracy_filter, group_filter_stats, truncation_filter


@pytest.fixture
def groups():
    # Five groups of K=5 with mean accs: id 10 -> 1/5 = 0.2, id 3 -> 4/5 = 0.8, id 8 -> 1.0,
    # id 5 -> 0.0, id 6 -> 2/5 = 0.4. Responses are interleaved round-robin.
    per_group = {10: [1, 0, 0, 0, 0], 3: [1, 1, 1, 1, 0], 8: [1, 1, 1, 1, 1], 5: [0, 0, 0, 0, 0], 6: [1, 1, 0, 0, 0]}
    ids, acc = [], []
    for k in range(5):
        for gid, accs in per_group.items():
            ids.append(gid)
            acc.append(float(accs[k]))
    return torch.tensor(acc), torch.tensor(ids)


def test_accuracy_filter_inclusive(groups):
    acc, ids = groups
    keep = accuracy_filter(acc, ids, low=0.2, high=0.8)
    # 0.2 and 0.8 are kept (inclusive), 0.4 kept, 1.0 and 0.0 dropped -- every member of a group alike
    kept_ids = {10, 3, 6}
    assert keep.dtype == torch.bool
    assert keep.tolist() == [int(g) in kept_ids for g in ids]


def test_accuracy_filter_fractional_scores():
    # Code partial credit: group 0 mean (0.1 + 0.3) / 2 = 0.2 (rounding in float32 sums must not drop it)
    acc = torch.tensor([0.1, 0.3, 0.9, 1.0])
    keep = accuracy_filter(acc, torch.tensor([0, 0, 1, 1]))
    assert keep.tolist() == [True, True, False, False]  # group 1 mean 0.95 > 0.8


def test_accuracy_filter_bad_window():
    with pytest.raises(ValueError, match="low <= high"):
        accuracy_filter(torch.zeros(2), torch.tensor([0, 0]), low=0.9, high=0.1)


def test_truncation_filter():
    truncated = torch.tensor([False, True, False, False, False, False])
    ids = torch.tensor([4, 4, 9, 9, 4, 9])
    # group 4 has one truncated response -> all of group 4 dropped; group 9 kept
    assert truncation_filter(truncated, ids).tolist() == [False, False, True, True, False, True]


def test_group_filter_stats(groups):
    acc, ids = groups
    keep = accuracy_filter(acc, ids)
    stats = group_filter_stats(acc, ids, keep)
    # 5 groups; one all-correct (8), one all-wrong (5); mean acc = (1 + 4 + 5 + 0 + 2) / 25 = 0.48
    assert stats == {
        "filter/num_groups": 5.0,
        "filter/all_correct_frac": pytest.approx(0.2),
        "filter/all_wrong_frac": pytest.approx(0.2),
        "filter/mean_acc": pytest.approx(0.48),
        "filter/kept_groups": 3.0,
        "filter/kept_frac": pytest.approx(0.6),
    }
