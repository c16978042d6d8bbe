"""Pure parts of the driver's stages: filtering generated groups, batch packing, dealing work to actors."""

import pytest
import torch

from launch.stages import Group, build_batch
from prime.data.dataset import PromptItem
from prime.rollout.base import Completion


def comp(ids, reason="stop", logprobs=None):
    return Completion(prompt_ids=[], token_ids=ids, text="", logprobs=logprobs or [-0.5] * len(ids),
                      finish_reason=reason)


def item(i, ids):
    return PromptItem(index=i, prompt_ids=ids, prompt_text="", ground_truth="1", ability="math",
                      data_source="t", raw={})


def test_filter_flags_read_scores_and_finish_reasons():
    from launch.stages import Sampling, filter_flags

    s = Sampling(n=4, max_new_tokens=8, temperature=1.0, top_p=1.0, accuracy=True, acc_low=0.2, acc_high=0.8,
                 drop_truncated=True, max_rounds=1, oversample=1.0)
    groups = [Group(item(i, [1]), [comp([1], "length" if i == 2 else "stop")] * 4, sc)
              for i, sc in enumerate([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])]
    # means 0, .25, .5, 1 -> accuracy keeps groups 1 and 2; group 2 was cut at the length limit.
    assert filter_flags(groups, s) == [False, True, False, False]
    assert filter_flags([], s) == []


def test_build_batch_layout():
    groups = [
        Group(item(0, [5, 6, 7]), [comp([1, 2], logprobs=[-1.0, -2.0]), comp([3], "length")], [1.0, 0.0]),
        Group(item(1, [8]), [comp([4, 4, 4]), comp([9, 9])], [0.5, 0.5]),
    ]
    b = build_batch(groups, pad_id=0)
    # prompts left-padded to 3, responses right-padded to 3
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [5, 6, 7, 3, 0, 0], [0, 0, 8, 4, 4, 4], [0, 0, 8, 9, 9, 0]]
    assert b.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert b.rollout_logp[0].tolist() == [-1.0, -2.0, 0.0]
    assert b.scores.tolist() == [1.0, 0.0, 0.5, 0.5]
    assert b.group_ids.tolist() == [0, 0, 1, 1]
    assert b.truncated.tolist() == [False, True, False, False]


def test_deal_and_undeal_round_trip():
    from launch.stages import deal, undeal

    items = list(range(7))
    parts = deal(items, 3)
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert undeal(parts, 7, 3) == items
    # fewer items than actors: the trailing empty parts are not sent, and not needed back
    assert deal([10, 11], 4) == [[10], [11], [], []]
    assert undeal([[10], [11]], 2, 4) == [10, 11]


def test_grading_after_counts_only_what_follows_the_last_engine():
    from launch.stages import _grading_after

    end = 100.0  # the last engine finished at t = 100 s (wall clock)
    # Actor 0 graded a chained share from t = 99.0 to 99.5 (all before the end: 0 s) and one from
    # 99.8 to 100.3 (0.3 s after it); actor 1 graded a chained share from 100.1 to 100.2 (0.1 s)
    # and a share the driver sent after the end, 0.4 s, counted whole: actor 1 is the busiest, 0.5 s.
    metrics = [{"verify/seconds": 0.5, "verify/started_at": 99.0}, {"verify/seconds": 0.5, "verify/started_at": 99.8},
               {"verify/seconds": 0.1, "verify/started_at": 100.1}, {"verify/seconds": 0.4}]
    assert _grading_after(end, [0, 0, 1, 1], metrics) == pytest.approx(0.5)
    assert _grading_after(end, [0, 0], metrics[:2]) == pytest.approx(0.3)


def test_gather_rows_puts_each_ranks_numpy_rows_back_in_place():
    import numpy as np

    from launch.stages import gather_rows

    parts = [[0, 2], [1, 3]]  # rank 0 holds rows 0 and 2, rank 1 rows 1 and 3
    values = [np.array([[1.0, 2.0], [5.0, 6.0]], dtype=np.float32), np.array([[3.0, 4.0], [7.0, 8.0]])]
    for v in values:
        v.flags.writeable = False  # as they come out of Ray's object store
    out = gather_rows(parts, values, torch.Size([4, 2]))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]))
