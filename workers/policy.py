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

    def _gather(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0; ranks > 0 join the gather only where it is collective (ZeRO-3)."""
        if self.rank == 0 or self.trainer.zero_stage == 3:
            return self.trainer.named_weights()
        return None

    # ------------------------------------------------------------------ weight sync (workers/weight_sync.py)
    def export_weights(self) -> tuple[dict[str, torch.Tensor] | None, int]:
        """Object-store sync: (rank 0's full weights, their size in bytes); (None, 0) on ranks > 0.
        Called with `num_returns=2` so the driver can read the size without fetching the weights."""
        weights = self._gather()
        if self.rank != 0:
            return None, 0
        return weights, sum(t.numel() * t.element_size() for t in weights.values())

    def weight_bucket_plan(self, bucket_bytes: int) -> list | None:
        """Broadcast sync set-up (every rank): rank 0's bucket plan for its current weights."""
        from workers.weight_sync import plan_buckets, weight_specs

        weights = self._gather()
        if self.rank != 0:
            return None
        self._weight_specs = weight_specs(weights)
        self._buckets = plan_buckets(self._weight_specs, bucket_bytes)
        return self._buckets

    def transport_info(self) -> dict[str, Any]:
        from workers.weight_sync import local_transport_info

        return local_transport_info()

    def open_weight_sync(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: start the weight-sync group's TCPStore on this node; returns (ip, port)."""
        from workers.weight_sync import BroadcastChannel, local_transport_info

        ip = local_transport_info()["ip"]
        self._ws_store, port = BroadcastChannel.open_store(ip, world_size, timeout_s)
        return ip, port

    def join_weight_sync(self, host: str, port: int, rank: int, world_size: int, backend: str, buckets: list,
                         timeout_s: float) -> None:
        """Rank 0 joins the weight-sync group as its sender (group rank 0)."""
        from workers.weight_sync import BroadcastChannel, local_transport_info

        self._channel = BroadcastChannel(host, port, rank, world_size, backend, local_transport_info()["ip"],
                                         store=self._ws_store, timeout_s=timeout_s)
        self._buckets = buckets

    def send_weights(self) -> dict[str, float] | None:
        """Broadcast sync (every rank): gather the weights and, on rank 0, broadcast them in buckets."""
        from workers.weight_sync import check_specs

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
        stats = self._channel.send(self._buckets, weights)
        return stats | {"gather_seconds": gather_s}

    def close_weight_sync(self) -> None:
        channel = getattr(self, "_channel", None)
        if channel is not None:
            channel.close()
        self._channel = self._ws_store = None

    def save_checkpoint(self, path: str) -> None:
        self.trainer.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.trainer.load_checkpoint(path)

    def save_hf(self, path: str) -> None:
        self.trainer.save_hf(path)

    def shutdown(self) -> None:
        pass
