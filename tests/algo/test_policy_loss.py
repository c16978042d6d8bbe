"""Policy losses: aggregation modes, split invariance, PPO clip + dual clip, GVPO gradient."""

import math

import pytest
import torch

from prime.algo.policy_loss import (
    LOSS_AGG_MODES,
    aggregate_loss,
    entropy_loss,
    gvpo_loss,
    local_normalizer,
    ppo_clip_loss,
    sequence_logp_sum,
)

# Tolerances: unless a line says otherwise, values are float64 and compared with assert_close's
# float64 defaults (rtol 1e-7, atol 1e-7) or pytest.approx's (rel 1e-6): the expected values are
# computed by hand, exactly, and the code's float64 arithmetic differs from them by a few ulps.
D = torch.float64


@pytest.fixture
def values_mask():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=D)
    return values, mask


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 18.0 / 5.0),  # (1 + 2 + 4 + 5 + 6) / 5 valid tokens
        ("seq-mean-token-mean", (3.0 / 2.0 + 15.0 / 3.0) / 2.0),  # (1.5 + 5) / 2 sequences = 3.25
        ("seq-mean-token-sum", (3.0 + 15.0) / 2.0),  # 9
        ("seq-mean-token-sum-norm", (3.0 + 15.0) / 3.0),  # sum(L*m) / T_max = 18 / 3 = 6, no count
    ],
)
def test_aggregate_modes(values_mask, mode, expected):
    values, mask = values_mask
    assert aggregate_loss(values, mask, mode).item() == pytest.approx(expected)


def test_aggregate_sum_norm_max_len(values_mask):
    values, mask = values_mask
    # max_len = 6: 18 / 6 = 3 (a global normaliser does not apply to this mode)
    assert aggregate_loss(values, mask, "seq-mean-token-sum-norm", max_len=6).item() == pytest.approx(3.0)
    assert aggregate_loss(values, mask, "seq-mean-token-sum-norm", global_normalizer=7.0, max_len=6).item() == pytest.approx(3.0)


def test_aggregate_global_normalizer(values_mask):
    values, mask = values_mask
    # token-mean with a global count of 10 tokens: 18 / 10
    assert aggregate_loss(values, mask, "token-mean", global_normalizer=10).item() == pytest.approx(1.8)
    # local normalisers: 5 valid tokens; 2 non-empty sequences
    assert local_normalizer(mask, "token-mean") == 5.0
    assert local_normalizer(mask, "seq-mean-token-mean") == 2.0


def test_aggregate_unknown_mode(values_mask):
    valid = "token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm"
    with pytest.raises(ValueError, match=valid):
        aggregate_loss(*values_mask, "sum")


def _random_batch(seed, B=10, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0  # an empty padding row must not count as a sequence
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(D)
    return g, mask


def _splits(B):
    # Uneven micro-batches; each is cropped to its own longest response, as a packer would do.
    return [(0, 3), (3, 8), (8, B)]


def _crop(x, mask):
    width = max(int(mask.sum(-1).max()), 1)
    return x[:, :width], mask[:, :width]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_split_invariance(mode):
    g, mask = _random_batch(0)
    values = torch.randn(mask.shape, generator=g, dtype=D)
    max_len = mask.shape[1]
    full = aggregate_loss(values, mask, mode, max_len=max_len)
    total = sum(local_normalizer(mask[a:b], mode) for a, b in _splits(10))
    parts = []
    for a, b in _splits(10):
        v, m = _crop(values[a:b], mask[a:b])
        parts.append(aggregate_loss(v, m, mode, global_normalizer=total, max_len=max_len))
    torch.testing.assert_close(sum(parts), full)
    # The same split with local normalisers differs (this is what the global normaliser fixes).
    local = sum(aggregate_loss(*_crop(values[a:b], mask[a:b]), mode, max_len=max_len) for a, b in _splits(10))
    assert not torch.allclose(local / len(_splits(10)), full)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_ppo_split_invariance_loss_and_grad(mode):
    g, mask = _random_batch(1)
    old = -torch.rand(mask.shape, generator=g, dtype=D) * 3
    logp = (old + 0.4 * torch.randn(mask.shape, generator=g, dtype=D)).requires_grad_(True)
    adv = torch.randn(mask.shape, generator=g, dtype=D)
    max_len = mask.shape[1]

    full, _ = ppo_clip_loss(logp, old, adv, mask, loss_agg=mode, max_len=max_len)
    (full_grad,) = torch.autograd.grad(full, logp)

    total = sum(local_normalizer(mask[a:b], mode) for a, b in _splits(10))
    summed = torch.zeros((), dtype=D)
    acc_grad = torch.zeros_like(logp)
    for a, b in _splits(10):
        width = max(int(mask[a:b].sum(-1).max()), 1)
        lp = logp.detach()[a:b, :width].clone().requires_grad_(True)
        loss, _ = ppo_clip_loss(
            lp, old[a:b, :width], adv[a:b, :width], mask[a:b, :width],
            loss_agg=mode, global_normalizer=total, max_len=max_len,
        )
        loss.backward()  # gradient accumulation
        acc_grad[a:b, :width] += lp.grad
        summed = summed + loss.detach()
    torch.testing.assert_close(summed, full.detach())
    torch.testing.assert_close(acc_grad, full_grad)


def test_ppo_clip_and_dual_clip_values_and_grads():
    # One response of 5 tokens; ratios r and advantages A per token:
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 5.0], dtype=D)
    A = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0]], dtype=D)
    old = torch.full((1, 5), -1.0, dtype=D)
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.ones(1, 5, dtype=D)
    loss, metrics = ppo_clip_loss(logp, old, A, mask)
    # token 0: A=1,  r=1.5: max(-1.5, -1.2) = -1.2  (clipped)
    # token 1: A=1,  r=0.5: max(-0.5, -0.8) = -0.5
    # token 2: A=-1, r=1.5: max( 1.5,  1.2) =  1.5
    # token 3: A=-1, r=0.5: max( 0.5,  0.8) =  0.8  (clipped)
    # token 4: A=-1, r=5:   max( 5.0,  1.2) =  5.0, dual clip min(5, -A*3 = 3) = 3
    # token-mean: (-1.2 - 0.5 + 1.5 + 0.8 + 3) / 5 = 3.6 / 5 = 0.72
    assert loss.item() == pytest.approx(0.72)
    assert metrics["policy/clip_frac"] == pytest.approx(2 / 5)
    assert metrics["policy/dual_clip_frac"] == pytest.approx(1 / 5)
    # approx KL = mean(old - logp) = -mean(log r)
    assert metrics["policy/approx_kl"] == pytest.approx(-(2 * math.log(1.5) + 2 * math.log(0.5) + math.log(5)) / 5)
    assert metrics["policy/ratio_max"] == pytest.approx(5.0)
    assert all(isinstance(v, float) for v in metrics.values())
    loss.backward()
    # Unclipped tokens: d(-A r)/dlogp = -A r, divided by 5 tokens; clipped and dual-clipped tokens: 0.
    expected = torch.tensor([[0.0, -0.5 / 5, 1.5 / 5, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(logp.grad, expected)


def test_ppo_clip_higher_and_dual_clip_off():
    old = torch.zeros(1, 2, dtype=D)
    logp = torch.log(torch.tensor([[1.5, 5.0]], dtype=D))
    A = torch.tensor([[1.0, -2.0]], dtype=D)
    mask = torch.ones(1, 2, dtype=D)
    # clip_high 0.28: token 0 max(-1.5, -1.28) = -1.28. Dual clip off: token 1 max(10, 2.4) = 10.
    loss, m = ppo_clip_loss(logp, old, A, mask, clip_high=0.28, clip_ratio_c=None)
    assert loss.item() == pytest.approx((-1.28 + 10.0) / 2)
    assert m["policy/dual_clip_frac"] == 0.0
    # With the default dual clip c = 3: token 1 min(10, -A*c = 6) = 6
    loss, m = ppo_clip_loss(logp, old, A, mask, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 6.0) / 2)
    assert m["policy/dual_clip_frac"] == pytest.approx(0.5)


def test_ppo_ratio_clamped():
    # logp - old = 50 is clamped to 20 before exp; A = -1 and no dual clip -> L = exp(20)
    loss, _ = ppo_clip_loss(
        torch.tensor([[50.0]], dtype=D), torch.zeros(1, 1, dtype=D), -torch.ones(1, 1, dtype=D),
        torch.ones(1, 1, dtype=D), clip_ratio_c=None,
    )
    assert loss.item() == pytest.approx(math.exp(20.0))


def test_ppo_bad_clip_ratio_c():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_clip_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), clip_ratio_c=0.5)


def test_entropy_loss(values_mask):
    value, metrics = entropy_loss(*values_mask)
    assert value.item() == pytest.approx(3.6)  # same token-mean as test_aggregate_modes
    assert metrics["policy/entropy"] == pytest.approx(3.6)


@pytest.fixture
def gvpo_case():
    # Group id 2 (K=2): responses 0, 1. Group id 0 (K=3): responses 2, 3, 4 (interleaved order below).
    group_ids = torch.tensor([2, 0, 2, 0, 0])
    S = torch.tensor([-1.0, 0.0, -3.0, -1.0, -2.0], dtype=D, requires_grad=True)
    S_old = torch.tensor([-2.0, -1.0, -2.0, -1.0, -1.0], dtype=D)
    R = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0], dtype=D)
    return S, S_old, R, group_ids


def test_gvpo_loss_value(gvpo_case):
    S, S_old, R, group_ids = gvpo_case
    loss, metrics = gvpo_loss(S, S_old, R, group_ids, beta=0.1)
    # Group 2: z = 0.1*(S - S_old) = [0.1, -0.1] (already centred); R - mean = [0.5, -0.5];
    #   e = [-0.4, 0.4]; 0.5 * (0.16 + 0.16) / (K-1 = 1) = 0.16
    # Group 0: z = [0.1, 0, -0.1] (centred); R - mean = [-1, -1, 2]; e = [1.1, 1, -2.1];
    #   0.5 * (1.21 + 1 + 4.41) / (K-1 = 2) = 1.655
    # Sum: 0.16 + 1.655 = 1.815
    assert loss.item() == pytest.approx(1.815)
    assert metrics["gvpo/loss"] == pytest.approx(1.815)
    half, _ = gvpo_loss(S, S_old, R, group_ids, beta=0.1, num_micro_batches=2)
    assert half.item() == pytest.approx(1.815 / 2)


def test_gvpo_gradient_hand(gvpo_case):
    S, S_old, R, group_ids = gvpo_case
    loss, _ = gvpo_loss(S, S_old, R, group_ids, beta=0.1)
    loss.backward()
    # dL/dS_i = beta * e_i / (K - 1), with e in batch order [-0.4, 1.1, 0.4, 1.0, -2.1]
    expected = torch.tensor([0.1 * -0.4 / 1, 0.1 * 1.1 / 2, 0.1 * 0.4 / 1, 0.1 * 1.0 / 2, 0.1 * -2.1 / 2], dtype=D)
    torch.testing.assert_close(S.grad, expected)


def test_gvpo_gradient_random():
    g = torch.Generator().manual_seed(3)
    group_ids = torch.tensor([11, 4, 4, 11, 30, 4, 30, 11, 30, 30])
    S = torch.randn(10, generator=g, dtype=D).requires_grad_(True)
    S_old = torch.randn(10, generator=g, dtype=D)
    R = torch.rand(10, generator=g, dtype=D)
    beta = 0.3
    loss, _ = gvpo_loss(S, S_old, R, group_ids, beta)
    loss.backward()
    same = group_ids[:, None] == group_ids[None, :]
    K = same.sum(1).to(D)
    z = beta * (S.detach() - S_old)
    center = lambda x: x - (same.to(D) @ x) / K  # noqa: E731
    e = center(z) - center(R)
    torch.testing.assert_close(S.grad, beta * e / (K - 1))


def test_gvpo_split_by_groups():
    # Whole groups per micro-batch: the sum of micro-batch losses (each / 2 micro-batches) is the
    # full-batch loss / 2.
    S, S_old, R = torch.tensor([1.0, 2.0, 0.0, 3.0, 1.0]), torch.zeros(5), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    ids = torch.tensor([1, 1, 2, 2, 2])
    full, _ = gvpo_loss(S, S_old, R, ids, 0.5, num_micro_batches=2)
    a, _ = gvpo_loss(S[:2], S_old[:2], R[:2], ids[:2], 0.5, num_micro_batches=2)
    b, _ = gvpo_loss(S[2:], S_old[2:], R[2:], ids[2:], 0.5, num_micro_batches=2)
    torch.testing.assert_close(a + b, full)


def test_gvpo_singleton_raises():
    with pytest.raises(ValueError, match="group id 8 has size 1"):
        gvpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.tensor([1, 1, 8]), 0.1)


def test_sequence_logp_sum():
    logp = torch.tensor([[-1.0, -2.0, -4.0]])
    # -1 + -2, the third token is padding
    assert sequence_logp_sum(logp, torch.tensor([[1, 1, 0]])).item() == pytest.approx(-3.0)
