"""Splitting a rollout batch into mini-batches (one optimizer step each) and micro-batches
(one forward/backward each).

Pure functions over lists and tensors; no DeepSpeed here.

Why a token budget: responses differ a lot in length, so a fixed number of rows per micro-batch
either wastes memory on short rows or runs out of it on long ones. A padded micro-batch is padded to
its longest row, so its cost is `rows x longest row`; a padding-free one (all rows packed into one
row, `prime.models.packing`) costs its real tokens, `sum of lengths`. We add rows until that cost
would exceed `max_tokens_per_micro_batch`. The loss does not depend on the split because every micro-batch
loss is normalised by the global (mini-batch, all ranks) normaliser, see `prime/train/trainer.py`.
"""

from __future__ import annotations

from collections.abc import Sequence



def _group_units(n: int, group_ids: Sequence[int] | None) -> list[list[int]]:
    """Indices grouped into the units that must stay together, in first-appearance order."""
    if group_ids is None:
        return [[i] for i in range(n)]
    if len(group_ids) != n:
        raise ValueError(f"group_ids has {len(group_ids)} entries but there are {n} samples")
    units: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        units.setdefault(int(g), []).append(i)
    return list(units.values())


def make_micro_batches(
    lengths: Sequence[int],
    max_tokens_per_micro_batch: int,
    group_ids: Sequence[int] | None = None,
    padding_free: bool = False,
) -> list[list[int]]:
    """Pack samples into micro-batches whose size stays within a token budget.

    Args:
        lengths: number of real tokens of each sample (prompt + response).
        max_tokens_per_micro_batch: budget on `rows x longest row` of one micro-batch, or on its
            `sum of lengths` with `padding_free`.
        group_ids: when given, all samples with the same id land in the same micro-batch
            (GVPO and the PRM's DPO loss need whole groups).
        padding_free: the micro-batches run packed, without padding, so only real tokens count.

    Returns:
        A list of index lists. Every sample is in exactly one micro-batch; indices inside a
        micro-batch are ascending. A sample (or group) larger than the budget gets a micro-batch
        of its own. Units are packed longest first, which keeps padding low and is deterministic.
    """
    if max_tokens_per_micro_batch <= 0:
        raise ValueError(f"max_tokens_per_micro_batch must be positive, got {max_tokens_per_micro_batch}")
    lengths = [int(x) for x in lengths]
    units = _group_units(len(lengths), group_ids)
    # Longest unit first (stable, so ties keep their input order).
    units.sort(key=lambda u: -max(lengths[i] for i in u))

    micro_batches: list[list[int]] = []
    current: list[int] = []
    total = longest = 0  # real tokens and longest row of `current`
    for unit in units:
        unit_total, unit_longest = sum(lengths[i] for i in unit), max(lengths[i] for i in unit)
        new_total, new_longest = total + unit_total, max(longest, unit_longest)
        cost = new_total if padding_free else (len(current) + len(unit)) * new_longest
        if current and cost > max_tokens_per_micro_batch:
            micro_batches.append(sorted(current))
            current = []
            new_total, new_longest = unit_total, unit_longest
        current.extend(unit)
        total, longest = new_total, new_longest
    if current:
        micro_batches.append(sorted(current))
    return micro_batches


def make_mini_batches(
    n: int, mini_batch_size: int, group_ids: Sequence[int] | None = None
) -> list[list[int]]:
    """Split `n` samples, in order, into mini-batches of about `mini_batch_size` samples.

    Without `group_ids` these are consecutive slices (the last one may be smaller). With
    `group_ids` whole groups are kept together: groups are taken in first-appearance order and a
    mini-batch is closed as soon as it holds at least `mini_batch_size` samples.
    """
    if mini_batch_size <= 0:
        raise ValueError(f"mini_batch_size must be positive, got {mini_batch_size}")
    mini_batches: list[list[int]] = []
    current: list[int] = []
    for unit in _group_units(n, group_ids):
        current.extend(unit)
        if len(current) >= mini_batch_size:
            mini_batches.append(sorted(current))
            current = []
    if current:
        mini_batches.append(sorted(current))
    return mini_batches
