"""Policy role: one actor per DeepSpeed data-parallel rank, over `prime.train.policy.PolicyTrainer`."""

from __future__ import annotations

import time
from typing import Any

import torch

from workers.group import RankedWorker


class PolicyWorker(RankedWorker):
    def build(self, model_path: str, trainer_kwargs: dict[str, Any]) -> None:
        from prime.train.policy import PolicyTrainer

        torch.manual_seed(trainer_kwargs.get("seed", 0))
        self.trainer = PolicyTrainer(model_path, **trainer_kwargs)

    def compute_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Old log-probs [B, T] of this rank's shard, and the seconds spent computing them."""
        t0 = time.perf_counter()
        logp = self.trainer.compute_logprobs(batch)
        return logp, time.perf_counter() - t0

    def update(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
        """One RL update on this rank's shard: metrics and the seconds spent."""
        t0 = time.perf_counter()
        metrics = self.trainer.update(batch)
        return metrics, time.perf_counter() - t0

    def named_weights(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on rank 0 (every rank must call it: ZeRO-3 gathers collectively)."""
        weights = self.trainer.named_weights()
        return weights if self.rank == 0 else None

    def save_checkpoint(self, path: str) -> None:
        self.trainer.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.trainer.load_checkpoint(path)

    def save_hf(self, path: str) -> None:
        self.trainer.save_hf(path)

    def shutdown(self) -> None:
        pass
