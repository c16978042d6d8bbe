"""Vectorised per-group reductions shared by the estimators, losses and filters.

Responses are grouped by prompt through integer ``group_ids`` [B]. The ids may come in any order and
need not be contiguous (``[7, 3, 7, 3]`` is two groups of two). Every reduction maps ids to dense
indices once with ``torch.unique(..., return_inverse=True)`` and then uses ``index_add_``, so no
Python loop ever runs over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Groups:
    """Dense view of a group assignment.

    Attributes:
        ids: the distinct group ids, sorted. # [G]
        index: dense group index of each response, in ``[0, G)``. # [B]
        counts: number of responses in each group. # [G]
    """

    ids: torch.Tensor
    index: torch.Tensor
    counts: torch.Tensor

    @property
    def num_groups(self) -> int:
        return int(self.ids.numel())

    def size_of_each(self) -> torch.Tensor:
        """Group size K seen by each response. # [B] long"""
        return self.counts[self.index]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group sum of per-response values ``values`` [B] -> [G]."""
        out = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)  # [G]
        return out.index_add(0, self.index, values)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group mean of ``values`` [B] -> [G]."""
        return self.sum(values) / self.counts.to(values.dtype)

    def broadcast(self, per_group: torch.Tensor) -> torch.Tensor:
        """Give every response its group's value: [G] -> [B]."""
        return per_group[self.index]


def make_groups(group_ids: torch.Tensor, batch_size: int | None = None) -> Groups:
    """Check ``group_ids`` and build its dense :class:`Groups` view.

    Args:
        group_ids: integer group id per response. # [B]
        batch_size: when given, ``group_ids`` must have exactly this many entries.
    """
    group_ids = torch.as_tensor(group_ids)
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [B], got shape {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must hold integers, got dtype {group_ids.dtype}")
    if batch_size is not None and group_ids.numel() != batch_size:
        raise ValueError(
            f"group_ids has {group_ids.numel()} entries but the batch has {batch_size} responses"
        )
    ids, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return Groups(ids=ids, index=index, counts=counts)


def require_group_size_at_least_2(groups: Groups, what: str) -> None:
    """Raise ValueError naming the offending groups when any group has a single response.

    Leave-one-out baselines (RLOO, PRIME) and GVPO's (K-1) normaliser are undefined for K = 1.
    """
    small = groups.counts < 2  # [G]
    if bool(small.any()):
        bad_ids = groups.ids[small].tolist()
        bad_sizes = groups.counts[small].tolist()
        shown = ", ".join(f"group id {g} has size {k}" for g, k in zip(bad_ids[:5], bad_sizes[:5]))
        more = f" (and {len(bad_ids) - 5} more)" if len(bad_ids) > 5 else ""
        raise ValueError(
            f"{what} needs at least 2 responses per group (rollout.n >= 2): {shown}{more}"
        )


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last valid token of each response (L_i - 1 for right padding). # [B] long

    Raises ValueError when a response has no valid token.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values  # [B]
    if bool((last < 0).any()):
        empty = torch.nonzero(last < 0).flatten()[:5].tolist()
        raise ValueError(f"responses at batch positions {empty} have no valid token in the mask")
    return last
