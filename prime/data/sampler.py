"""Resumable prompt sampler for the driver.

The driver asks for prompt indices in batches of any size: a normal step takes `batch_size`
prompts, and when the accuracy filter throws away whole groups it asks for more (oversampling).
The sampler walks a fresh deterministic permutation of `range(dataset_len)` each epoch and
crosses epoch boundaries inside one request when needed.

Its whole state is (epoch, position, pending): the permutation of an epoch is a pure function of
(seed, epoch), so a checkpoint that stores `state_dict()` resumes to exactly the same next prompts.

`pending` is the prompt buffer: prompts handed back with `put_back` (the driver returns the
prompts of groups that passed the filter but did not fit in a full batch) are served first, before
the permutation continues, so oversampling never skips a prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def epoch_permutation(dataset_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order in which epoch `epoch` visits the dataset.

    Seeded from the pair (seed, epoch) through numpy's SeedSequence, so every epoch gets an
    independent order and no earlier epoch has to be replayed to reach it.
    """
    if not shuffle:
        return list(range(dataset_len))
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(dataset_len).tolist()


class PromptSampler:
    """Deterministic, resumable stream of prompt indices over epochs.

    Args:
        dataset_len: number of prompts; indices are in [0, dataset_len).
        batch_size: default request size of `next_batch()` and of iteration.
        seed: seed of the per-epoch permutations (non-negative).
        shuffle: permute each epoch (True) or visit 0..dataset_len-1 in order (False).

    Attributes:
        epoch: the epoch the next index comes from (0-based).
        position: how many indices of that epoch have been served.
        num_served: total indices served since the start (all epochs).
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if not isinstance(dataset_len, int) or dataset_len <= 0:
            raise ValueError(f"dataset_len must be a positive integer, got {dataset_len!r}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self.num_served = 0
        self.pending: list[int] = []
        self._order = epoch_permutation(dataset_len, seed, 0, shuffle)

    def next_batch(self, n: int | None = None) -> list[int]:
        """The next `n` prompt indices (default `batch_size`).

        Any n >= 0 is allowed; a request that runs past the end of an epoch continues with the
        next epoch's permutation, so one batch may hold an index twice only if it spans epochs.
        """
        if n is None:
            n = self.batch_size
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"next_batch(n) needs a non-negative integer n, got {n!r}")
        out: list[int] = self.pending[:n]
        del self.pending[:n]
        while len(out) < n:
            take = min(n - len(out), self.dataset_len - self.position)
            out.extend(self._order[self.position:self.position + take])
            self.position += take
            if self.position == self.dataset_len:
                self._start_epoch(self.epoch + 1)
        self.num_served += n
        return out

    def put_back(self, indices: list[int]) -> None:
        """Return prompts to the buffer; the next `next_batch` calls serve them first, in order."""
        bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < self.dataset_len]
        if bad:
            raise ValueError(f"put_back got indices outside [0, {self.dataset_len}): {bad[:5]}")
        self.pending.extend(indices)
        self.num_served -= len(indices)

    def __iter__(self) -> Iterator[list[int]]:
        """Endless stream of `batch_size` batches; the driver decides when to stop."""
        while True:
            yield self.next_batch()

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._order = epoch_permutation(self.dataset_len, self.seed, epoch, self.shuffle)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the position plus the settings it is only valid for."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_served": self.num_served,
            "dataset_len": self.dataset_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "pending": list(self.pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output.

        Raises:
            ValueError: when the saved state belongs to a different dataset length, seed or
                shuffle setting (the saved position would point at different prompts).
        """
        missing = [k for k in ("epoch", "position") if k not in state]
        if missing:
            raise ValueError(f"sampler state is missing {missing}; expected keys from state_dict(): "
                             f"{sorted(self.state_dict())}")
        for key in ("dataset_len", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; resuming would serve different prompts")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.dataset_len:
            raise ValueError(f"sampler state epoch={epoch}, position={position} is out of range for "
                             f"dataset_len={self.dataset_len} (need epoch >= 0, 0 <= position < dataset_len)")
        self._start_epoch(epoch)
        self.position = position
        self.num_served = int(state.get("num_served", epoch * self.dataset_len + position))
        self.pending = [int(i) for i in state.get("pending", [])]
