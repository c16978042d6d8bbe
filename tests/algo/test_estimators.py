"""The estimator entry point, the group filter over [G, K] scores, and the log-prob gap."""

import pytest
import torch

from prime.algo import (
    ESTIMATORS,
    compute_advantages,
    keep_groups,
    logprob_gap,
    policy_loss_kind,
    uses_process_rewards,
)
from prime.algo.advantages import (
    gvpo_centered_scores,
    grpo_advantages,
    prime_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)


def test_compute_advantages_dispatch_matches_the_library():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)
    acc = torch.tensor([1.0, 0.0, 1.0, 1.0])
    gid = torch.tensor([0, 0, 1, 1])
    r = torch.randn(4, 3) * mask
    kw = dict(scores=acc, group_ids=gid, mask=mask, process_rewards=r)
    # The dispatch adds no arithmetic of its own: each result is the library function's, exactly.
    assert torch.equal(compute_advantages("prime", **kw)[0], prime_advantages(r, acc, gid, mask))
    assert torch.equal(compute_advantages("grpo", **kw)[0], grpo_advantages(acc, gid, mask))
    assert torch.equal(compute_advantages("rloo", **kw)[0], rloo_advantages(acc, gid, mask))
    # REINFORCE++: the outcome sits on each response's last valid token.
    last = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float32) * acc[:, None]
    assert torch.equal(compute_advantages("reinforce_pp", **kw)[0], reinforce_pp_advantages(last, mask))
    # GVPO: R_i - mean_g R on every valid token: group 0 has scores (1, 0) -> (0.5, -0.5);
    # group 1 has (1, 1) -> (0, 0).
    gvpo, metrics = compute_advantages("gvpo", **kw)
    assert torch.equal(gvpo, gvpo_centered_scores(acc, gid)[:, None] * mask)
    assert gvpo[:, 0].tolist() == [0.5, -0.5, 0.0, 0.0]
    # mean |A| over the 8 valid tokens: (0.5 * 2 + 0.5 * 3) / 8 = 0.3125
    assert metrics["advantages/mean_abs"] == pytest.approx(0.3125)
    with pytest.raises(ValueError, match="choose one of .*'prime', 'grpo', 'rloo', 'reinforce_pp', 'gvpo'"):
        compute_advantages("ppo", **kw)


def test_what_each_estimator_needs():
    assert [policy_loss_kind(n) for n in ESTIMATORS] == ["ppo", "ppo", "ppo", "ppo", "gvpo"]
    assert uses_process_rewards("prime", 5.0) and not uses_process_rewards("prime", 0.0)
    assert not any(uses_process_rewards(n, 5.0) for n in ESTIMATORS if n != "prime")
    with pytest.raises(ValueError, match="algo.name='dpo'"):
        policy_loss_kind("dpo")


def test_keep_groups_accuracy_and_truncation():
    scores = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)  # means 0, .25, .5, 1
    cut = torch.zeros(4, 4, dtype=torch.bool)
    assert keep_groups(scores, cut).tolist() == [False, True, True, False]
    cut[2, 1] = True  # one cut response drops group 2
    assert keep_groups(scores, cut, drop_truncated=True).tolist() == [False, True, False, False]
    assert keep_groups(scores, cut, accuracy=False).tolist() == [True] * 4
    with pytest.raises(ValueError, match=r"\[G, K\]"):
        keep_groups(scores.reshape(-1), cut.reshape(-1))


def test_logprob_gap_is_masked_mean_abs():
    a = torch.tensor([[0.0, -1.0, 5.0], [-2.0, 0.0, 0.0]])
    b = torch.tensor([[0.5, -1.0, 0.0], [-1.0, 0.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert logprob_gap(a, b, m) == pytest.approx((0.5 + 0.0 + 1.0) / 3)
