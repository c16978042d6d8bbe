"""Implicit-PRM role: the trainable PRM and its frozen reference, over `prime.train.prm.ImplicitPRM`."""

from __future__ import annotations

from typing import Any

import numpy as np

from prime.data.batch import Batch
from workers import failpoints
from workers.training import TrainingWorker, timed, wire


class PRMWorker(TrainingWorker):
    def build(self, model_path: str, prm_kwargs: dict[str, Any]) -> None:
        from prime.train.prm import build_implicit_prm

        self.prm = build_implicit_prm(model_path, **prm_kwargs)
        self.trainer = self.prm.trainer

    def update_and_rewards(self, batch: Batch, mode: str) -> tuple[tuple[np.ndarray, dict[str, float]], float]:
        """(token rewards [B, T], metrics) of this rank's shard, the PRM updated per `mode`, and the seconds spent."""
        failpoints.reach("prm.update")
        (rewards, metrics), seconds = timed(lambda: self.prm.update_and_rewards(batch, mode))
        return (wire(rewards), metrics), seconds

    def log_ratios(self, batch: Batch) -> tuple[np.ndarray, float]:
        """q [B, T] of this rank's shard under the current PRM (held-out scoring), and the seconds spent."""
        return timed(lambda: wire(self.prm.log_ratios(batch)))
