"""Policy role: one actor per DeepSpeed data-parallel rank, over `prime.train.trainer.Trainer`.

Besides the shared training verbs it hands its weights to the rollout engines: whole through the
Ray object store, or in buckets over the weight-sync broadcast group (`workers/weight_sync.py`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from prime.train.engine import EngineSettings
from workers.group import node_ip
from workers.training import TrainingWorker


class PolicyWorker(TrainingWorker):
    def build(self, model_path: str, loss: Any, settings: EngineSettings, trainer_kwargs: dict[str, Any]) -> None:
        from prime.train.trainer import Trainer

        self.trainer = Trainer(model_path, loss, settings, **trainer_kwargs)

    def _gather(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0; ranks > 0 join the gather only where it is collective (ZeRO-3)."""
        if self.rank == 0 or self.trainer.settings.zero_stage == 3:
            return self.trainer.named_weights()
        return None

    # ------------------------------------------------------------------ object-store sync
    def export_weights(self) -> tuple[dict[str, torch.Tensor] | None, int]:
        """(rank 0's full weights, their size in bytes); (None, 0) on ranks > 0. Called with
        `num_returns=2` so the driver can read the size without fetching the weights."""
        weights = self._gather()
        if self.rank != 0:
            return None, 0
        return weights, sum(t.numel() * t.element_size() for t in weights.values())

    # ------------------------------------------------------------------ broadcast sync
    def weight_bucket_plan(self, bucket_bytes: int) -> list | None:
        """Set-up (every rank): rank 0's bucket plan for its current weights."""
        from prime.rollout.weight_transfer import plan_buckets, weight_specs

        weights = self._gather()
        if self.rank != 0:
            return None
        self._weight_specs = weight_specs(weights)
        self._buckets = plan_buckets(self._weight_specs, bucket_bytes)
        return self._buckets

    def transport_info(self) -> dict[str, Any]:
        from prime.rollout.weight_transfer import transport_info

        return transport_info(node_ip())

    def open_weight_sync(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: start the weight-sync group's TCPStore on this node; returns (ip, port)."""
        from prime.rollout.weight_transfer import BroadcastChannel

        ip = node_ip()
        self._ws_store, port = BroadcastChannel.open_store(ip, world_size, timeout_s)
        return ip, port

    def join_weight_sync(self, host: str, port: int, rank: int, world_size: int, backend: str, buckets: list,
                         timeout_s: float) -> None:
        """Rank 0 joins the weight-sync group as its sender (group rank 0)."""
        from prime.rollout.weight_transfer import BroadcastChannel

        self._channel = BroadcastChannel(host, port, rank, world_size, backend, node_ip(),
                                         store=self._ws_store, timeout_s=timeout_s)
        self._buckets = buckets

    def send_weights(self) -> dict[str, float] | None:
        """Every rank: gather the weights and, on rank 0, broadcast them in buckets."""
        from prime.rollout.weight_transfer import check_specs

        t0 = time.perf_counter()
        weights = self._gather()
        if self.rank != 0:
            return None
        gather_s = time.perf_counter() - t0
        try:
            check_specs(self._weight_specs, weights)
        except ValueError:
            self._channel.send(self._buckets, None)  # release the receivers before raising
            raise
        return self._channel.send(self._buckets, weights) | {"gather_seconds": gather_s}

    def close_weight_sync(self) -> None:
        channel = getattr(self, "_channel", None)
        if channel is not None:
            channel.close()
        self._channel = self._ws_store = None
