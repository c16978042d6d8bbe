"""Pure parts of the driver's stages: filtering, batch packing, estimator dispatch, the log-prob gap."""

import pytest
import torch

from launch.stages import Group, build_batch, compute_advantages, keep_groups, logprob_gap
from prime.data.dataset import PromptItem
from prime.rollout.base import Completion


def comp(ids, reason="stop", logprobs=None):
    return Completion(prompt_ids=[], token_ids=ids, text="", logprobs=logprobs or [-0.5] * len(ids),
                      finish_reason=reason)


def item(i, ids):
    return PromptItem(index=i, prompt_ids=ids, prompt_text="", ground_truth="1", ability="math",
                      data_source="t", raw={})


def test_keep_groups_accuracy_and_truncation():
    scores = [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]  # group means 0, .25, .5, 1
    comps = [[comp([1])] * 4 for _ in scores]
    assert keep_groups(scores, comps, accuracy=True, acc_low=0.2, acc_high=0.8, truncated=False) == [
        False, True, True, False]
    comps[2] = [comp([1]), comp([1], "length"), comp([1]), comp([1])]  # one cut response drops group 2
    assert keep_groups(scores, comps, accuracy=True, acc_low=0.2, acc_high=0.8, truncated=True) == [
        False, True, False, False]
    assert keep_groups(scores, comps, accuracy=False, acc_low=0.2, acc_high=0.8, truncated=False) == [True] * 4


def test_build_batch_layout():
    groups = [
        Group(item(0, [5, 6, 7]), [comp([1, 2], logprobs=[-1.0, -2.0]), comp([3], "length")], [1.0, 0.0]),
        Group(item(1, [8]), [comp([4, 4, 4]), comp([9, 9])], [0.5, 0.5]),
    ]
    b = build_batch(groups, pad_id=0)
    # prompts left-padded to 3, responses right-padded to 3
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 2, 0], [5, 6, 7, 3, 0, 0], [0, 0, 8, 4, 4, 4], [0, 0, 8, 9, 9, 0]]
    assert b["response_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert b["rollout_logp"][0].tolist() == [-1.0, -2.0, 0.0]
    assert b["acc"].tolist() == [1.0, 0.0, 0.5, 0.5]
    assert b["group_ids"].tolist() == [0, 0, 1, 1]
    assert b["truncated"].tolist() == [False, True, False, False]


def test_compute_advantages_dispatch_matches_the_library():
    from prime.algo.advantages import grpo_advantages, prime_advantages, reinforce_pp_advantages, rloo_advantages

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)
    acc = torch.tensor([1.0, 0.0, 1.0, 1.0])
    gid = torch.tensor([0, 0, 1, 1])
    r = torch.randn(4, 3) * mask
    kw = dict(acc=acc, group_ids=gid, mask=mask, process_rewards=r, norm_by_std=True, gamma=1.0,
              process_coef=5.0, outcome_coef=5.0, gamma_process=1.0, gamma_outcome=1.0)
    torch.testing.assert_close(compute_advantages("prime", **kw), prime_advantages(r, acc, gid, mask))
    torch.testing.assert_close(compute_advantages("grpo", **kw), grpo_advantages(acc, gid, mask))
    torch.testing.assert_close(compute_advantages("rloo", **kw), rloo_advantages(acc, gid, mask))
    # REINFORCE++: the outcome sits on each response's last valid token.
    last = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float32) * acc[:, None]
    torch.testing.assert_close(compute_advantages("reinforce_pp", **kw), reinforce_pp_advantages(last, mask))
    with pytest.raises(ValueError, match="valid: prime, grpo, rloo, reinforce_pp"):
        compute_advantages("gvpo", **kw)


def test_logprob_gap_is_masked_mean_abs():
    a = torch.tensor([[0.0, -1.0, 5.0], [-2.0, 0.0, 0.0]])
    b = torch.tensor([[0.5, -1.0, 0.0], [-1.0, 0.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert logprob_gap(a, b, m) == pytest.approx((0.5 + 0.0 + 1.0) / 3)


def test_deal_and_undeal_round_trip():
    from launch.stages import deal, undeal

    items = list(range(7))
    parts = deal(items, 3)
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert undeal(parts, 7, 3) == items
    # fewer items than actors: the trailing empty parts are not sent, and not needed back
    assert deal([10, 11], 4) == [[10], [11], [], []]
    assert undeal([[10], [11]], 2, 4) == [10, 11]
