"""Advantage estimators: hand-computed values, loop-vs-vectorised equivalence, errors."""

import math
import statistics

import pytest
import torch

from prime.algo.advantages import (
    discounted_reverse_cumsum,
    grpo_advantages,
    gvpo_centered_scores,
    prime_advantages,
    prime_returns,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)

# Tolerances: unless a line says otherwise, values are float64 and compared with assert_close's
# float64 defaults (rtol 1e-7, atol 1e-7) or pytest.approx's (rel 1e-6): the expected values are
# computed by hand, exactly, and the code's float64 arithmetic differs from them by a few ulps.
D = torch.float64


@pytest.fixture
def two_groups():
    # Group id 7 = responses 0, 3 (scores 1, 0); group id 3 = responses 1, 2, 4 (scores 2, 4, 6).
    # Ids are interleaved and not contiguous on purpose.
    scores = torch.tensor([1.0, 2.0, 4.0, 0.0, 6.0], dtype=D)
    group_ids = torch.tensor([7, 3, 3, 7, 3])
    mask = torch.tensor(
        [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=D
    )
    return scores, group_ids, mask


def test_grpo_unbiased_std(two_groups):
    scores, group_ids, mask = two_groups
    adv = grpo_advantages(scores, group_ids, mask)
    # Group 7: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5) -> A = +-0.5 / (sqrt(0.5) + 1e-6)
    # Group 3: mean 4, unbiased std sqrt((4 + 0 + 4) / 2) = 2 -> A = (-2, 0, 2) / (2 + 1e-6)
    a7 = 0.5 / (math.sqrt(0.5) + 1e-6)
    a3 = 2.0 / (2.0 + 1e-6)
    per_response = torch.tensor([a7, -a3, 0.0, -a7, a3], dtype=D)
    torch.testing.assert_close(adv, per_response[:, None] * mask)


def test_grpo_without_std(two_groups):
    scores, group_ids, mask = two_groups
    adv = grpo_advantages(scores, group_ids, mask, norm_by_std=False)
    # s - mean_g: 1 - 0.5, 2 - 4, 4 - 4, 0 - 0.5, 6 - 4
    expected = torch.tensor([0.5, -2.0, 0.0, -0.5, 2.0], dtype=D)[:, None] * mask
    torch.testing.assert_close(adv, expected)


def test_grpo_accepts_token_rewards(two_groups):
    scores, group_ids, mask = two_groups
    # Token rewards whose masked row sums are the scores; junk outside the mask must be ignored.
    token = torch.zeros(5, 3, dtype=D)
    token[:, 0] = scores
    token[1, 2] = 100.0  # outside the mask of response 1
    torch.testing.assert_close(grpo_advantages(token, group_ids, mask), grpo_advantages(scores, group_ids, mask))


def test_grpo_singleton_group_gets_zero():
    # One response alone in group 9: s - mean = 0, so its advantage is 0 (no error for GRPO).
    adv = grpo_advantages(torch.tensor([3.0, 1.0, 0.0]), torch.tensor([9, 4, 4]), torch.ones(3, 2))
    torch.testing.assert_close(adv[0], torch.zeros(2))


def test_rloo(two_groups):
    scores, group_ids, mask = two_groups
    adv = rloo_advantages(scores, group_ids, mask)
    # Leave-one-out: response 0: 1 - 0 = 1; response 3: 0 - 1 = -1;
    # response 1: 2 - (4 + 6)/2 = -3; response 2: 4 - (2 + 6)/2 = 0; response 4: 6 - (2 + 4)/2 = 3.
    expected = torch.tensor([1.0, -3.0, 0.0, -1.0, 3.0], dtype=D)[:, None] * mask
    torch.testing.assert_close(adv, expected)


def test_discounted_reverse_cumsum():
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    # gamma 1: [1+2+3, 2+3, 3]; gamma 0.5: G2 = 3, G1 = 2 + 0.5*3 = 3.5, G0 = 1 + 0.5*3.5 = 2.75
    torch.testing.assert_close(discounted_reverse_cumsum(r, 1.0), torch.tensor([[6.0, 5.0, 3.0]], dtype=D))
    torch.testing.assert_close(discounted_reverse_cumsum(r, 0.5), torch.tensor([[2.75, 3.5, 3.0]], dtype=D))


def test_whiten():
    values = torch.tensor([[1.0, 2.0], [3.0, 50.0]], dtype=D)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=D)
    # Valid values 1, 2, 3: mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> (v - 2) / sqrt(1 + 1e-8)
    s = 1.0 / math.sqrt(1.0 + 1e-8)
    torch.testing.assert_close(whiten(values, mask), torch.tensor([[-s, 0.0], [s, 0.0]], dtype=D))


def test_whiten_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        whiten(torch.ones(1, 3), torch.tensor([[1.0, 0.0, 0.0]]))


def test_reinforce_pp():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]], dtype=D)  # 100s are padding
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=D)
    adv = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    # Returns: row 0 [6, 5, 3], row 1 [4]. Mean of 6, 5, 3, 4 = 4.5; deviations 1.5, 0.5, -1.5, -0.5;
    # unbiased var = (2.25 + 0.25 + 2.25 + 0.25) / 3 = 5/3.
    s = math.sqrt(5.0 / 3.0 + 1e-8)
    expected = torch.tensor([[1.5 / s, 0.5 / s, -1.5 / s], [-0.5 / s, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(adv, expected)


def test_reinforce_pp_gamma():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=D)
    # gamma 0.5 returns: row 0 [2.75, 3.5, 3] (see test_discounted_reverse_cumsum), row 1 [4].
    returns = torch.tensor([[2.75, 3.5, 3.0], [4.0, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma=0.5), whiten(returns, mask))


@pytest.fixture
def prime_case():
    # One group (id 4) of K = 2. Response 0 has 2 valid tokens, response 1 has 1.
    process = torch.tensor([[1.0, 3.0], [5.0, 99.0]], dtype=D)  # 99 is padding
    outcome = torch.tensor([1.0, 0.0], dtype=D)
    group_ids = torch.tensor([4, 4])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=D)
    return process, outcome, group_ids, mask


def test_prime_returns(prime_case):
    process, outcome, group_ids, mask = prime_case
    R = prime_returns(process, outcome, group_ids, mask)
    # Process: m_0 = (1 + 3)/2 = 2, m_1 = 5, sum = 7; K/(K-1) = 2, baseline 7/(K-1) = 7.
    #   r~_0 = [2*1 - 7, 2*3 - 7] = [-5, -1] -> reverse cumsum [-6, -1]
    #   r~_1 = [2*5 - 7] = [3]            -> reverse cumsum [3]
    # Outcome on the last valid token: o~_0 = 1 - 0 = 1 at t=1 -> [1, 1]; o~_1 = 0 - 1 = -1 at t=0 -> [-1]
    # R = 5 * process + 5 * outcome: row 0 [5*-6 + 5*1, 5*-1 + 5*1] = [-25, 0]; row 1 [5*3 - 5] = [10]
    torch.testing.assert_close(R, torch.tensor([[-25.0, 0.0], [10.0, 0.0]], dtype=D))


def test_prime_returns_gamma_and_coefs(prime_case):
    process, outcome, group_ids, mask = prime_case
    R = prime_returns(process, outcome, group_ids, mask, process_coef=1.0, outcome_coef=2.0, gamma_process=0.5)
    # Process r~ as above: row 0 [-5, -1] -> with gamma 0.5: [-5 + 0.5*-1, -1] = [-5.5, -1]; row 1 [3].
    # Outcome (gamma 1): row 0 [1, 1], row 1 [-1].
    # R = 1 * process + 2 * outcome: row 0 [-5.5 + 2, -1 + 2] = [-3.5, 1]; row 1 [3 - 2] = [1]
    torch.testing.assert_close(R, torch.tensor([[-3.5, 1.0], [1.0, 0.0]], dtype=D))


def test_prime_advantages_whitens(prime_case):
    adv = prime_advantages(*prime_case)
    # Valid R values -25, 0, 10: mean -5, deviations -20, 5, 15, unbiased var (400 + 25 + 225)/2 = 325
    s = math.sqrt(325.0 + 1e-8)
    torch.testing.assert_close(adv, torch.tensor([[-20.0 / s, 5.0 / s], [15.0 / s, 0.0]], dtype=D))


def test_prime_outcome_only_is_rloo(two_groups):
    scores, group_ids, mask = two_groups
    # process_coef = 0 skips the process source (and allows process_rewards=None): R[i, t] is
    # 5 * (o_i - mean_{j != i} o_j) on every valid token, i.e. 5 * RLOO; e.g. response 1: 5 * -3 = -15.
    R = prime_returns(None, scores, group_ids, mask, process_coef=0.0)
    expected = 5.0 * torch.tensor([1.0, -3.0, 0.0, -1.0, 3.0], dtype=D)[:, None] * mask
    torch.testing.assert_close(R, expected)
    torch.testing.assert_close(R, 5.0 * rloo_advantages(scores, group_ids, mask))


def test_prime_process_only(prime_case):
    process, outcome, group_ids, mask = prime_case
    R = prime_returns(process, outcome, group_ids, mask, outcome_coef=0.0)
    # Only 5 * process returns from test_prime_returns: row 0 [-30, -5], row 1 [15]
    torch.testing.assert_close(R, torch.tensor([[-30.0, -5.0], [15.0, 0.0]], dtype=D))


def test_prime_needs_process_rewards_when_coef_nonzero(prime_case):
    _, outcome, group_ids, mask = prime_case
    with pytest.raises(ValueError, match="process_rewards is None"):
        prime_returns(None, outcome, group_ids, mask)


def test_gvpo_centered_scores(two_groups):
    scores, group_ids, _ = two_groups
    # R - mean_g R: group 7 mean 0.5, group 3 mean 4
    expected = torch.tensor([0.5, -2.0, 0.0, -0.5, 2.0], dtype=D)
    torch.testing.assert_close(gvpo_centered_scores(scores, group_ids), expected)


@pytest.mark.parametrize("which", ["rloo", "prime", "gvpo"])
def test_singleton_group_raises(which):
    scores = torch.tensor([1.0, 0.0, 1.0])
    group_ids = torch.tensor([5, 5, 9])  # group 9 has a single response
    mask = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"group id 9 has size 1"):
        if which == "rloo":
            rloo_advantages(scores, group_ids, mask)
        elif which == "prime":
            prime_returns(torch.zeros(3, 2), scores, group_ids, mask)
        else:
            gvpo_centered_scores(scores, group_ids)


def test_prime_empty_response_raises():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="no valid token"):
        prime_returns(torch.zeros(2, 2), torch.zeros(2), torch.tensor([0, 0]), mask)


def test_group_ids_must_be_integers():
    with pytest.raises(ValueError, match="integers"):
        rloo_advantages(torch.zeros(2), torch.tensor([0.0, 0.0]), torch.ones(2, 1))


# ---------------------------------------------------------------------------------------------
# Loop-vs-vectorised: naive per-response references on random data with shuffled, sparse group ids.


def _random_batch(seed, T=9):
    g = torch.Generator().manual_seed(seed)
    sizes = [2, 3, 5, 4, 2, 3]
    ids = torch.tensor([1000, 17, 3, 250, 42, 9])  # not contiguous
    group_ids = torch.cat([ids[i].repeat(k) for i, k in enumerate(sizes)])
    perm = torch.randperm(group_ids.numel(), generator=g)
    group_ids = group_ids[perm]
    B = group_ids.numel()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(D)
    token_rewards = torch.randn(B, T, generator=g, dtype=D)
    outcome = torch.randint(0, 2, (B,), generator=g).to(D)
    return group_ids, mask, token_rewards, outcome


def _members(group_ids, i):
    return [j for j in range(len(group_ids)) if int(group_ids[j]) == int(group_ids[i])]


def _loop_grpo(scores, group_ids, norm_by_std):
    out = []
    for i in range(len(scores)):
        vals = [float(scores[j]) for j in _members(group_ids, i)]
        a = float(scores[i]) - sum(vals) / len(vals)
        if norm_by_std:
            a /= statistics.stdev(vals) + 1e-6
        out.append(a)
    return torch.tensor(out, dtype=D)


def _loop_rloo(scores, group_ids):
    out = []
    for i in range(len(scores)):
        others = [float(scores[j]) for j in _members(group_ids, i) if j != i]
        out.append(float(scores[i]) - sum(others) / len(others))
    return torch.tensor(out, dtype=D)


def _loop_discounted(row, length, gamma):
    G = [0.0] * len(row)
    running = 0.0
    for t in range(length - 1, -1, -1):
        running = row[t] + gamma * running
        G[t] = running
    return G


def _loop_prime_returns(process, outcome, group_ids, mask, cp, co, gp, go):
    B, T = mask.shape
    lengths = [int(mask[i].sum()) for i in range(B)]
    R = torch.zeros(B, T, dtype=D)
    for i in range(B):
        members = _members(group_ids, i)
        K = len(members)
        means = [sum(float(process[j, t]) for t in range(lengths[j])) / lengths[j] for j in members]
        r_tilde = [0.0] * T
        for t in range(lengths[i]):
            r_tilde[t] = float(process[i, t]) * K / (K - 1) - sum(means) / (K - 1)
        o_tilde = [0.0] * T
        o_tilde[lengths[i] - 1] = float(outcome[i]) - sum(float(outcome[j]) for j in members if j != i) / (K - 1)
        gp_ret = _loop_discounted(r_tilde, lengths[i], gp)
        go_ret = _loop_discounted(o_tilde, lengths[i], go)
        for t in range(lengths[i]):
            R[i, t] = cp * gp_ret[t] + co * go_ret[t]
    return R


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_rloo_match_loops(seed):
    group_ids, mask, token_rewards, _ = _random_batch(seed)
    scores = (token_rewards * mask).sum(-1)
    for norm in (True, False):
        expected = _loop_grpo(scores, group_ids, norm)[:, None] * mask
        torch.testing.assert_close(grpo_advantages(scores, group_ids, mask, norm_by_std=norm), expected)
    expected = _loop_rloo(scores, group_ids)[:, None] * mask
    torch.testing.assert_close(rloo_advantages(scores, group_ids, mask), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "coefs", [(5.0, 5.0, 1.0, 1.0), (0.3, 2.0, 0.9, 0.7), (0.0, 1.0, 1.0, 1.0), (1.0, 0.0, 0.95, 1.0)]
)
def test_prime_returns_match_loop(seed, coefs):
    group_ids, mask, process, outcome = _random_batch(seed)
    cp, co, gp, go = coefs
    expected = _loop_prime_returns(process, outcome, group_ids, mask, cp, co, gp, go)
    got = prime_returns(process, outcome, group_ids, mask, cp, co, gp, go)
    torch.testing.assert_close(got, expected)
