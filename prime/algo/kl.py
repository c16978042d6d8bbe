"""KL penalty estimators between the policy and a reference (docs/algorithms.md section 4).

With d = logp - ref_logp on tokens sampled from the policy (http://joschu.net/blog/kl-approx.html):
k1 = d (unbiased, high variance), k2 = d^2 / 2 (biased, low variance),
k3 = exp(-d) + d - 1 (unbiased, non-negative), clamped to [-10, 10] for stability.
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")
K3_CLAMP = 10.0


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate of ``kind`` (k1 | k2 | k3). Same shape as ``logp``, e.g. [B, T].

    Aggregate it with ``prime.algo.policy_loss.aggregate_loss`` for a loss term, or subtract it
    from the token rewards for a KL-in-reward penalty.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    d = logp - ref_logp  # [B, T]
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    return torch.clamp(torch.exp(-d) + d - 1.0, min=-K3_CLAMP, max=K3_CLAMP)


def logprob_gap(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |engine log-prob - trainer log-prob| over response tokens (all [B, T]).

    The rollout engine and the trainer score the same tokens with what should be the same weights;
    a gap well above rounding means the last weight sync (or a sampling setting) went wrong.
    """
    return float(((engine_logp - trainer_logp).abs() * mask).sum() / mask.sum().clamp(min=1))
