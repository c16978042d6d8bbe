"""Group filters applied before training (docs/algorithms.md section 5).

Filters keep or drop WHOLE groups (all K responses of a prompt), so the group baselines of the
advantage estimators stay well defined. Each returns a keep mask per response.

Shapes: B responses, G groups.
"""

from __future__ import annotations

import torch

from prime.algo._groups import make_groups

# Mean accuracies are compared in float64 with this slack so that e.g. 1/5 == 0.2 counts as inside
# [0.2, 0.8] even when fractional scores accumulate rounding error.
_BOUND_TOL = 1e-9


def accuracy_filter(
    acc: torch.Tensor, group_ids: torch.Tensor, low: float = 0.2, high: float = 0.8
) -> torch.Tensor:
    """Keep whole groups whose mean acc lies in [low, high] (inclusive). # [B] bool

    Groups that are all right or all wrong give zero advantage under group baselines and only cost
    compute; PRIME keeps groups with 0.2 <= mean acc <= 0.8.

    Args:
        acc: verifier score per response. # [B]
        group_ids: # [B]
    """
    if low > high:
        raise ValueError(f"accuracy filter needs low <= high, got low={low}, high={high}")
    groups = make_groups(group_ids, acc.shape[0])
    mean = groups.mean(acc.to(torch.float64))  # [G]
    keep_group = (mean >= low - _BOUND_TOL) & (mean <= high + _BOUND_TOL)  # [G]
    return groups.broadcast(keep_group)  # [B]


def truncation_filter(truncated: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Drop whole groups that contain any response cut at the length limit. # [B] bool

    Args:
        truncated: True (or 1) where the response hit max_new_tokens (finish_reason "length"). # [B]
        group_ids: # [B]
    """
    groups = make_groups(group_ids, truncated.shape[0])
    num_truncated = groups.sum(truncated.to(torch.long))  # [G]
    return groups.broadcast(num_truncated == 0)  # [B]


def group_filter_stats(
    acc: torch.Tensor, group_ids: torch.Tensor, keep: torch.Tensor | None = None
) -> dict[str, float]:
    """Per-group statistics for logging, as Python floats.

    filter/num_groups, filter/all_correct_frac (groups with mean acc 1), filter/all_wrong_frac
    (mean acc 0), filter/mean_acc (over responses) and, when ``keep`` [B] is given,
    filter/kept_groups and filter/kept_frac (fraction of groups kept).
    """
    groups = make_groups(group_ids, acc.shape[0])
    mean = groups.mean(acc.to(torch.float64))  # [G]
    num_groups = groups.num_groups
    stats = {
        "filter/num_groups": float(num_groups),
        "filter/all_correct_frac": float((mean >= 1.0 - _BOUND_TOL).sum()) / num_groups,
        "filter/all_wrong_frac": float((mean <= _BOUND_TOL).sum()) / num_groups,
        "filter/mean_acc": float(acc.to(torch.float64).mean()),
    }
    if keep is not None:
        kept_group = groups.sum(keep.to(torch.long)) > 0  # [G]
        stats["filter/kept_groups"] = float(kept_group.sum())
        stats["filter/kept_frac"] = float(kept_group.sum()) / num_groups
    return stats


def keep_groups(
    scores: torch.Tensor,
    truncated: torch.Tensor,
    *,
    accuracy: bool = True,
    acc_low: float = 0.2,
    acc_high: float = 0.8,
    drop_truncated: bool = False,
) -> torch.Tensor:
    """Which groups survive the enabled filters (accuracy, then truncation). # [G] bool

    Args:
        scores: verifier scores, one row of K per group. # [G, K]
        truncated: True where a response hit the length limit. # [G, K]
        accuracy: apply `accuracy_filter(acc_low, acc_high)`.
        drop_truncated: apply `truncation_filter`.
    """
    if scores.dim() != 2 or truncated.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and truncated {tuple(truncated.shape)} must both be [G, K]")
    g, k = scores.shape
    group_ids = torch.arange(g).repeat_interleave(k)  # [G*K]
    keep = torch.ones(g * k, dtype=torch.bool)  # [G*K]
    if accuracy:
        keep &= accuracy_filter(scores.reshape(-1), group_ids, acc_low, acc_high)
    if drop_truncated:
        keep &= truncation_filter(truncated.reshape(-1), group_ids)
    return keep.view(g, k)[:, 0]
