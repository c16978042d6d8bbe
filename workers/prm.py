"""Implicit-PRM role: the trainable PRM and its frozen reference, over `ImplicitPRMTrainer`."""

from __future__ import annotations

import time
from typing import Any

import torch

from workers.group import RankedWorker


class PRMWorker(RankedWorker):
    def build(self, model_path: str, trainer_kwargs: dict[str, Any]) -> None:
        from prime.train.prm import ImplicitPRMTrainer

        torch.manual_seed(trainer_kwargs.get("seed", 0))
        self.trainer = ImplicitPRMTrainer(model_path, **{k: v for k, v in trainer_kwargs.items() if k != "seed"})

    def update_and_rewards(self, batch: dict[str, torch.Tensor], acc: torch.Tensor, group_ids: torch.Tensor,
                           mode: str, ref_logp: torch.Tensor | None = None):
        """Token rewards [B, T] (after the update when mode=before), metrics, and the seconds spent."""
        t0 = time.perf_counter()
        rewards, metrics = self.trainer.update_and_rewards(batch, acc, group_ids, mode=mode, ref_logp=ref_logp)
        return rewards, metrics, time.perf_counter() - t0

    def save_checkpoint(self, path: str) -> None:
        self.trainer.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.trainer.load_checkpoint(path)

    def save_hf(self, path: str) -> None:
        self.trainer.save_hf(path)

    def shutdown(self) -> None:
        pass
