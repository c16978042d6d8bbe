"""Implicit PRM: token rewards (granularity, batch_norm), sequence rewards, CE and DPO losses."""

import math

import pytest
import torch

from prime.algo.implicit_prm import (
    batch_norm_scale,
    prm_ce_loss,
    prm_dpo_loss,
    sequence_rewards,
    token_rewards,
)

# Tolerances: unless a line says otherwise, values are float64 and compared with assert_close's
# float64 defaults (rtol 1e-7, atol 1e-7) or pytest.approx's (rel 1e-6): the expected values are
# computed by hand, exactly, and the code's float64 arithmetic differs from them by a few ulps.
D = torch.float64


def test_token_rewards_token_no_norm():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=D)
    ref = torch.tensor([[-1.5, -1.0, -9.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0]], dtype=D)
    r = token_rewards(logp, ref, mask, beta=0.05, granularity="token", norm="none")
    # q = logp - ref = [0.5, -1, (6, masked)] -> r = 0.05 * q = [0.025, -0.05, 0]
    torch.testing.assert_close(r, torch.tensor([[0.025, -0.05, 0.0]], dtype=D))


@pytest.fixture
def two_rows():
    # q = logp - ref: row 0 [1, 2, -4] (3 valid tokens), row 1 [3, 1, (7 masked)]
    ref = torch.zeros(2, 3, dtype=D)
    logp = torch.tensor([[1.0, 2.0, -4.0], [3.0, 1.0, 7.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=D)
    return logp, ref, mask


def test_batch_norm(two_rows):
    logp, ref, mask = two_rows
    r = token_rewards(logp, ref, mask, beta=1.0)
    # Reverse cumsums: row 0 [-1, -2, -4], row 1 [4, 1, 0]; max |.| = 4 over the whole batch.
    expected = torch.tensor([[1.0, 2.0, -4.0], [3.0, 1.0, 0.0]], dtype=D) / (4.0 + 1e-6)
    torch.testing.assert_close(r, expected)
    assert batch_norm_scale(logp - ref, mask).item() == pytest.approx(4.0 + 1e-6)
    # beta cancels under batch_norm (up to the 1e-6): beta = 0.05 gives 0.05*q / (0.05*4 + 1e-6)
    r_small = token_rewards(logp, ref, mask, beta=0.05)
    # 0.05 / (0.2 + 1e-6) vs 1 / (4 + 1e-6): the eps weighs 20x more, a relative change of ~5e-6.
    torch.testing.assert_close(r_small, expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_is_global_not_per_row(two_rows):
    logp, ref, mask = two_rows
    # Row 0 alone has max |reverse cumsum| 4 too; use row 1 alone: max(|4|, |1|) = 4. Scale row 1 by 10
    # so the batch max (40) differs from row 0's own max (4): row 0 must be divided by 40.
    logp = logp.clone()
    logp[1] *= 10
    r = token_rewards(logp, ref, mask, beta=1.0)
    torch.testing.assert_close(r[0], torch.tensor([1.0, 2.0, -4.0], dtype=D) / (40.0 + 1e-6))
    # A precomputed scale (e.g. reduced over shards) is used as given.
    r = token_rewards(logp, ref, mask, beta=1.0, norm_scale=2.0)
    torch.testing.assert_close(r[0], torch.tensor([0.5, 1.0, -2.0], dtype=D))


def test_whole_granularity(two_rows):
    logp, ref, mask = two_rows
    r = token_rewards(logp, ref, mask, beta=0.5, granularity="whole", norm="none")
    # Row 0: 0.5 * (1 + 2 - 4) = -0.5 on its last valid token t=2; row 1: 0.5 * (3 + 1) = 2 on t=1.
    torch.testing.assert_close(r, torch.tensor([[0.0, 0.0, -0.5], [0.0, 2.0, 0.0]], dtype=D))
    r = token_rewards(logp, ref, mask, beta=0.5, granularity="whole", norm="batch_norm")
    # Reverse cumsums: row 0 [-0.5, -0.5, -0.5], row 1 [2, 2, 0]; divide by 2 + 1e-6.
    torch.testing.assert_close(r, torch.tensor([[0.0, 0.0, -0.5], [0.0, 2.0, 0.0]], dtype=D) / (2.0 + 1e-6))


def test_bad_names(two_rows):
    with pytest.raises(ValueError, match="valid: token, whole"):
        token_rewards(*two_rows, beta=1.0, granularity="step")
    with pytest.raises(ValueError, match="valid: batch_norm, none"):
        token_rewards(*two_rows, beta=1.0, norm="layer_norm")


def test_sequence_rewards(two_rows):
    # Q = beta * masked sum of q: row 0 0.1 * (1 + 2 - 4) = -0.1; row 1 0.1 * (3 + 1) = 0.4
    torch.testing.assert_close(sequence_rewards(*two_rows, beta=0.1), torch.tensor([-0.1, 0.4], dtype=D))


def _with_q(q, beta=1.0):
    """logp/ref/mask whose sequence reward is q: one valid token per row holding q / beta, one pad."""
    B = len(q)
    logp = torch.zeros(B, 2, dtype=D)
    logp[:, 0] = torch.tensor(q, dtype=D) / beta
    logp[:, 1] = 123.0  # padding, must be ignored
    return logp, torch.zeros(B, 2, dtype=D), torch.tensor([[1.0, 0.0]] * B, dtype=D)


def test_prm_ce_loss():
    ln3 = math.log(3.0)
    logp, ref, mask = _with_q([0.0, ln3, -ln3])
    acc = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    loss, m = prm_ce_loss(logp, ref, mask, acc, beta=1.0, group_ids=torch.tensor([5, 5, 5]))
    # sigmoid(Q) = [0.5, 0.75, 0.25]; BCE = [-log 0.5, -log(1 - 0.75), -log(1 - 0.25)] = [ln2, ln4, ln(4/3)]
    expected = (math.log(2) + math.log(4) + math.log(4 / 3)) / 3
    assert loss.item() == pytest.approx(expected)
    assert m["prm/loss"] == pytest.approx(expected)
    # sigmoid(Q) > 0.5 vs acc > 0.5: [F vs T, T vs F, F vs F] -> 1/3 agree
    assert m["prm/acc"] == pytest.approx(1 / 3)
    # Pairs (0 beats 1), (0 beats 2): Q0 = 0 > ln3? no; Q0 > -ln3? yes -> 1/2
    assert m["prm/rank_acc"] == pytest.approx(0.5)


def test_prm_ce_fractional_acc_and_grad():
    logp, ref, mask = _with_q([0.0], beta=0.5)
    logp.requires_grad_(True)
    loss, _ = prm_ce_loss(logp, ref, mask, torch.tensor([0.25], dtype=D), beta=0.5)
    # Q = 0: BCE = -(0.25 log 0.5 + 0.75 log 0.5) = ln 2; dL/dQ = sigmoid(0) - 0.25 = 0.25; dQ/dlogp = beta
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.25 * 0.5, 0.0]], dtype=D))


def test_prm_ce_micro_batches_sum_to_full():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 4, generator=g, dtype=D)
    ref = torch.randn(6, 4, generator=g, dtype=D)
    mask = torch.ones(6, 4, dtype=D)
    acc = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0], dtype=D)
    full, _ = prm_ce_loss(logp, ref, mask, acc, beta=0.05)
    parts = [
        prm_ce_loss(logp[a:b], ref[a:b], mask[a:b], acc[a:b], beta=0.05, normalizer=6)[0]
        for a, b in [(0, 1), (1, 6)]
    ]
    torch.testing.assert_close(sum(parts), full)


def test_prm_dpo_loss():
    ln3 = math.log(3.0)
    # Group 8: acc [1, 0, 0], Q [0, ln3, -ln3]; group 2: all acc 1 -> no pairs. Interleaved order.
    logp, ref, mask = _with_q([0.0, 0.7, ln3, -0.2, -ln3])
    acc = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0], dtype=D)
    group_ids = torch.tensor([8, 2, 8, 2, 8])
    loss, m = prm_dpo_loss(logp, ref, mask, acc, group_ids, beta=1.0)
    # Pairs (w, l) = (0, 2): -log sigmoid(0 - ln3) = -log 0.25 = ln4
    #                (0, 4): -log sigmoid(0 + ln3) = -log 0.75 = ln(4/3)
    expected = (math.log(4) + math.log(4 / 3)) / 2
    assert loss.item() == pytest.approx(expected)
    assert m["prm/num_pairs"] == 2.0
    assert m["prm/rank_acc"] == pytest.approx(0.5)  # Q0 > Q4 only
    # acc agreement: Q > 0 vs acc > 0.5: [F/T, T/T, T/F, F/T, F/F] -> 2/5
    assert m["prm/acc"] == pytest.approx(2 / 5)


def test_prm_dpo_fractional_acc():
    # Code partial credit: acc 0.5 beats 0.25 in the same group.
    logp, ref, mask = _with_q([1.0, 0.0])
    loss, m = prm_dpo_loss(logp, ref, mask, torch.tensor([0.25, 0.5], dtype=D), torch.tensor([0, 0]), beta=1.0)
    # w = 1 (Q 0), l = 0 (Q 1): -log sigmoid(-1) = log(1 + e)
    assert loss.item() == pytest.approx(math.log(1 + math.e))
    assert m["prm/rank_acc"] == 0.0


def test_prm_dpo_no_pairs_is_grad_safe_zero():
    logp, ref, mask = _with_q([0.3, -0.3, 1.0, 2.0])
    logp.requires_grad_(True)
    acc = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=D)
    loss, m = prm_dpo_loss(logp, ref, mask, acc, torch.tensor([1, 1, 2, 2]), beta=1.0)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.zeros_like(logp))
    assert m["prm/num_pairs"] == 0.0
    assert math.isnan(m["prm/rank_acc"])


def test_prm_dpo_normalizer():
    logp, ref, mask = _with_q([0.0, 0.0])
    acc = torch.tensor([1.0, 0.0], dtype=D)
    loss, _ = prm_dpo_loss(logp, ref, mask, acc, torch.tensor([0, 0]), beta=1.0, normalizer=4)
    # one pair with -log sigmoid(0) = ln2, divided by a global pair count of 4
    assert loss.item() == pytest.approx(math.log(2) / 4)


# Loop reference for token_rewards on random data.


def _loop_token_rewards(logp, ref, mask, beta, granularity, norm):
    B, T = mask.shape
    r = torch.zeros(B, T, dtype=D)
    for i in range(B):
        L = int(mask[i].sum())
        if granularity == "token":
            for t in range(L):
                r[i, t] = beta * (logp[i, t] - ref[i, t])
        else:
            r[i, L - 1] = beta * sum(float(logp[i, t] - ref[i, t]) for t in range(L))
    if norm == "batch_norm":
        biggest = 0.0
        for i in range(B):
            for t in range(int(mask[i].sum())):
                biggest = max(biggest, abs(float(r[i, t:].sum())))
        r = r / (biggest + 1e-6)
    return r


@pytest.mark.parametrize("granularity", ["token", "whole"])
@pytest.mark.parametrize("norm", ["batch_norm", "none"])
def test_token_rewards_match_loop(granularity, norm):
    g = torch.Generator().manual_seed(7)
    B, T = 9, 6
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(D)
    logp = torch.randn(B, T, generator=g, dtype=D)
    ref = torch.randn(B, T, generator=g, dtype=D)
    got = token_rewards(logp, ref, mask, 0.05, granularity, norm)
    torch.testing.assert_close(got, _loop_token_rewards(logp, ref, mask, 0.05, granularity, norm))
