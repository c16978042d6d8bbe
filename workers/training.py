"""The verbs every training role shares, over a `prime.train.trainer.Trainer` built by the role.

A role class (policy, PRM) inherits `TrainingWorker`, builds `self.trainer` in its `build` verb
and adds only its own verbs. Each compute verb returns its result with the seconds it spent, so
the driver can tell the framework's own overhead from the actors' work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from prime.data.batch import Batch
from prime.train.trainer import Trainer
from workers import failpoints
from workers.group import RankedWorker
from workers.lane import LaneServer

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()` and its wall time in seconds.

    On a GPU the call's cached blocks go back to the device afterwards: roles that share a GPU
    (colocated placement) run one after another, and the memory plan (launch/plan.py) counts only the
    working set of the role that computes.
    """
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out, time.perf_counter() - t0


def wire(rows: torch.Tensor) -> np.ndarray:
    """A [B, T] result as it goes back to the driver: a numpy view of the CPU tensor. Ray pickles a
    torch tensor through its storage object, which cost 0.5-1.2 ms more per call than the same
    numpy array on a 2-core box (`bench/ray_latency.py`); `launch.stages.gather_rows` takes it back."""
    return rows.detach().cpu().numpy()


class TrainingWorker(RankedWorker, LaneServer):
    """One data-parallel rank of a trained role (its subclass sets `self.trainer` in `build`)."""

    trainer: Trainer

    def logprobs(self, batch: Batch) -> tuple[np.ndarray, float]:
        """No-grad log-probs [B, T] of this rank's shard under the current weights, and the seconds spent."""
        return timed(lambda: wire(self.trainer.logprobs(batch)))

    def update(self, batch: Batch, on_policy: bool = False) -> tuple[tuple[dict[str, float], np.ndarray], float]:
        """One update on this rank's shard: (metrics, the update's own log-probs [B, T]) and the seconds spent.
        `on_policy`: the shard has no old_logp; the single-pass update uses its own (`Trainer.update`)."""
        failpoints.reach(f"{type(self).__name__.removesuffix('Worker').lower()}.update")
        (metrics, logp), seconds = timed(lambda: self.trainer.update(batch, on_policy=on_policy))
        return (metrics, wire(logp)), seconds

    def save_checkpoint(self, path: str) -> None:
        self.trainer.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.trainer.load_checkpoint(path)

    def save_hf(self, path: str) -> None:
        self.trainer.save_hf(path)

    def offload_states(self) -> bool:
        """Move the trainer's states to host memory (colocated GPUs, while the engines generate)."""
        return self.trainer.offload_states()

    def memory(self, reset_peak: bool = False) -> dict[str, int]:
        """This actor's RSS and peak RSS in bytes; `reset_peak` resets the peak first."""
        import os

        from prime.rollout.weight_transfer import process_memory, reset_peak_memory

        if reset_peak:
            reset_peak_memory()
        return process_memory() | {"pid": os.getpid()}

    def shutdown(self) -> Any:
        return None
