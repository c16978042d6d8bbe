"""Implicit process reward model: token rewards and the online PRM losses (docs/algorithms.md 1-2).

The PRM pi_phi is a causal LM; with a frozen reference pi_ref its token log-ratio
q[i,t] = log pi_phi(y_t | ...) - log pi_ref(y_t | ...) is an implicit process reward
(https://arxiv.org/abs/2412.01981, PRIME: https://arxiv.org/abs/2502.01456).

Shapes: B responses, T response positions (right-padded), G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prime.algo._groups import last_valid_index, make_groups

GRANULARITIES = ("token", "whole")
NORMS = ("batch_norm", "none")
BATCH_NORM_EPS = 1e-6


def _log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if logp.shape != ref_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(
            f"logp {tuple(logp.shape)}, ref_logp {tuple(ref_logp.shape)} and mask {tuple(mask.shape)} "
            "must all be the same [B, T] shape"
        )
    return (logp - ref_logp) * mask.to(logp.dtype)  # [B, T]


def batch_norm_scale(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max over valid (i,t) of |sum_{s>=t} r[i,s]| + 1e-6: the ``batch_norm`` divisor. Scalar.

    Computed over every response passed in. The PRIME reference computes it per data-parallel
    shard; this project computes it over the whole batch so the rewards do not depend on the
    number of ranks (pass the result as ``norm_scale`` when rewards are computed in shards).
    """
    mask = mask.to(rewards.dtype)
    reverse_cumsum = (rewards * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])  # [B, T]
    return (reverse_cumsum.abs() * mask).max() + BATCH_NORM_EPS


def token_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    granularity: str = "token",
    norm: str = "batch_norm",
    norm_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Token process rewards r[i,t] = beta * q[i,t], zero outside the mask.

    granularity ``token``: r on every valid token (the last one included); ``whole``: sum_t r[i,t]
    on the last valid token. norm ``batch_norm``: divide every r by :func:`batch_norm_scale` of the
    (granularity-applied) rewards over the whole batch, so beta cancels; ``none``: leave r as is.
    The result keeps the autograd graph of ``logp``; compute it under ``torch.no_grad()`` (or
    detach it) when it only feeds advantages.

    Args:
        logp: PRM token log-probs. # [B, T]
        ref_logp: reference token log-probs. # [B, T]
        mask: # [B, T]
        beta: ``prm.beta``.
        norm_scale: precomputed batch_norm divisor (e.g. the global max over shards); None computes
            it from this batch.
    Returns:
        rewards. # [B, T]
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    rewards = beta * _log_ratio(logp, ref_logp, mask)  # [B, T]
    if granularity == "whole":
        last = last_valid_index(mask)  # [B]
        rows = torch.arange(rewards.shape[0], device=rewards.device)
        whole = torch.zeros_like(rewards)  # [B, T]
        whole[rows, last] = rewards.sum(dim=-1)
        rewards = whole
    if norm == "batch_norm":
        scale = batch_norm_scale(rewards, mask) if norm_scale is None else norm_scale
        rewards = rewards / scale
    return rewards  # [B, T]


def sequence_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Q_i = beta * sum_t (logp - ref_logp)[i,t] * m[i,t], the PRM's sequence reward. # [B]"""
    return beta * _log_ratio(logp, ref_logp, mask).sum(dim=-1)


def better_pairs(acc: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """P[w, l] = True when w and l share a group and acc_w > acc_l. # [B, B] bool"""
    groups = make_groups(group_ids, acc.shape[0])
    same_group = groups.index.unsqueeze(1) == groups.index.unsqueeze(0)  # [B, B]
    return same_group & (acc.unsqueeze(1) > acc.unsqueeze(0))  # [B, B]


def rank_counts(q: torch.Tensor, pairs: torch.Tensor) -> tuple[int, int]:
    """(pairs (w, l) of `pairs` [B, B] with Q_w > Q_l, number of pairs), for a ranking accuracy."""
    correct = (q.unsqueeze(1) > q.unsqueeze(0)) & pairs  # [B, B]
    return int(correct.sum()), int(pairs.sum())


def _rank_metrics(q: torch.Tensor, pairs: torch.Tensor) -> tuple[float, int]:
    """(fraction of pairs with Q_w > Q_l, number of pairs); NaN accuracy when there is no pair."""
    correct, num_pairs = rank_counts(q, pairs)
    if num_pairs == 0:
        return float("nan"), 0
    return correct / num_pairs, num_pairs


def _agreement(q: torch.Tensor, acc: torch.Tensor) -> float:
    """Fraction of responses where sigmoid(Q) > 0.5 agrees with acc > 0.5."""
    return float(((q > 0) == (acc > 0.5)).float().mean())


def prm_ce_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    acc: torch.Tensor,
    beta: float,
    normalizer: float | None = None,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PRM cross-entropy: BCE(sigmoid(Q_i), acc_i), mean over responses.

    Computed as binary_cross_entropy_with_logits(Q, acc) for numerical stability; acc may be
    fractional (partial credit). The loss is sum_i BCE_i / N with N = ``normalizer`` (the global
    number of responses of the optimizer step, so micro-batch losses add up to the full-batch mean)
    or this call's B when None.

    Args:
        logp: PRM token log-probs (with grad). # [B, T]
        ref_logp: reference token log-probs. # [B, T]
        mask: # [B, T]
        acc: verifier score in [0, 1]. # [B]
        beta: ``prm.beta``.
        group_ids: optional; when given, prm/rank_acc is reported. # [B]
    Returns:
        (loss, metrics) with prm/loss, prm/acc, and prm/rank_acc when group_ids is given.
    """
    q = sequence_rewards(logp, ref_logp, mask, beta)  # [B]
    acc = acc.to(q.dtype)
    per_response = F.binary_cross_entropy_with_logits(q, acc, reduction="none")  # [B]
    n = q.shape[0] if normalizer is None else normalizer
    loss = per_response.sum() / n
    with torch.no_grad():
        metrics = {"prm/loss": float(loss), "prm/acc": _agreement(q, acc)}
        if group_ids is not None:
            metrics["prm/rank_acc"], _ = _rank_metrics(q, better_pairs(acc, group_ids))
    return loss, metrics


def prm_dpo_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    acc: torch.Tensor,
    group_ids: torch.Tensor,
    beta: float,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PRM pairwise (DPO-style) loss: -log sigmoid(Q_w - Q_l) averaged over within-group pairs.

    Pairs are all (w, l) in the same group with acc_w > acc_l; groups whose responses all have the
    same acc add nothing. With no pair at all the loss is a zero that still depends on ``logp``
    (so backward() works and gives zero gradients). The loss is sum over pairs / N with
    N = ``normalizer`` (global pair count across micro-batches; groups must stay whole within a
    micro-batch) or this call's pair count when None.

    Args:
        logp: # [B, T]
        ref_logp: # [B, T]
        mask: # [B, T]
        acc: # [B]
        group_ids: # [B]
        beta: ``prm.beta``.
    Returns:
        (loss, metrics) with prm/loss, prm/acc, prm/rank_acc, prm/num_pairs.
    """
    q = sequence_rewards(logp, ref_logp, mask, beta)  # [B]
    acc = acc.to(q.dtype)
    pairs = better_pairs(acc, group_ids)  # [B, B]
    margins = q.unsqueeze(1) - q.unsqueeze(0)  # [B, B] Q_w - Q_l
    pair_losses = -F.logsigmoid(margins) * pairs.to(q.dtype)  # [B, B]
    num_pairs = int(pairs.sum())
    n = num_pairs if normalizer is None else normalizer
    loss = pair_losses.sum() / max(n, 1)
    with torch.no_grad():
        rank_acc, _ = _rank_metrics(q, pairs)
        metrics = {
            "prm/loss": float(loss),
            "prm/acc": _agreement(q, acc),
            "prm/rank_acc": rank_acc,
            "prm/num_pairs": float(num_pairs),
        }
    return loss, metrics
