"""KL estimators k1 / k2 / k3."""

import math

import pytest
import torch

from prime.algo.kl import kl_penalty

# Tolerances: unless a line says otherwise, values are float64 and compared with assert_close's
# float64 defaults (rtol 1e-7, atol 1e-7) or pytest.approx's (rel 1e-6): the expected values are
# computed by hand, exactly, and the code's float64 arithmetic differs from them by a few ulps.
D = torch.float64


@pytest.fixture
def pair():
    logp = torch.tensor([0.0, -1.0, -2.0], dtype=D)
    ref = torch.tensor([-1.0, -1.0, 0.0], dtype=D)
    return logp, ref  # d = logp - ref = [1, 0, -2]


def test_k1(pair):
    torch.testing.assert_close(kl_penalty(*pair, "k1"), torch.tensor([1.0, 0.0, -2.0], dtype=D))


def test_k2(pair):
    # d^2 / 2 = [0.5, 0, 2]
    torch.testing.assert_close(kl_penalty(*pair, "k2"), torch.tensor([0.5, 0.0, 2.0], dtype=D))


def test_k3(pair):
    # exp(-d) + d - 1: d=1: e^-1 + 0 = 0.3679; d=0: 0; d=-2: e^2 - 3 = 4.389
    expected = torch.tensor([math.exp(-1.0), 0.0, math.exp(2.0) - 3.0], dtype=D)
    torch.testing.assert_close(kl_penalty(*pair, "k3"), expected)


def test_k3_clamped():
    # d = -5: e^5 - 6 = 142.4 -> clamped to 10
    out = kl_penalty(torch.tensor([-5.0]), torch.tensor([0.0]), "k3")
    assert out.item() == pytest.approx(10.0)


def test_unknown_kind():
    with pytest.raises(ValueError, match="valid kinds: k1, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "low_var_kl")
