"""Policy role: one actor per DeepSpeed data-parallel rank, over `prime.train.trainer.Trainer`.

Besides the shared training verbs it hands its weights to the rollout engines: whole through the
Ray object store, or streamed bucket by bucket into the engines' own worker processes
(`workers/weight_sync.py`): rank 0 broadcasts to every engine (transport "broadcast"), or every
rank fills the staging buffer its colocated engine maps (transport "ipc").
"""

from __future__ import annotations

import time
from typing import Any

import torch

from prime.train.engine import EngineSettings
from workers.group import node_ip
from workers.training import TrainingWorker


def _timed(items, total: list[float]):
    """`items` unchanged, adding the seconds spent producing each item to total[0]."""
    it = iter(items)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        total[0] += time.perf_counter() - t0
        yield item


class PolicyWorker(TrainingWorker):
    def build(self, model_path: str, loss: Any, settings: EngineSettings, trainer_kwargs: dict[str, Any]) -> None:
        from prime.train.trainer import Trainer

        self.trainer = Trainer(model_path, loss, settings, **trainer_kwargs)
        self._channel = self._ws_store = self._ws_staging = None

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

    # ------------------------------------------------------------------ streaming sync
    def weight_bucket_plan(self, bucket_bytes: int) -> list:
        """Set-up (every rank): the bucket plan of the current weights, from their names, shapes
        and dtypes alone (nothing is gathered); the same on every rank."""
        from prime.rollout.weight_transfer import plan_buckets

        self._buckets = plan_buckets(self.trainer.weight_specs(), bucket_bytes)
        return self._buckets

    def transport_info(self) -> dict[str, Any]:
        from prime.rollout.weight_transfer import transport_info

        return transport_info(node_ip())

    def open_weight_sync(self, transport: str, world_size: int, backend: str, timeout_s: float) -> dict[str, Any]:
        """A sender: start its group's TCPStore on this node (and, for transport "ipc", the staging
        buffer its engine maps); returns the group's spec for every member to join."""
        from prime.rollout.weight_transfer import SharedStaging, max_bucket_bytes, open_store

        ip = node_ip()
        self._ws_store, port = open_store(ip, world_size, timeout_s)
        spec = dict(transport=transport, host=ip, port=port, world_size=world_size, backend=backend,
                    timeout_s=timeout_s)
        if transport == "ipc":
            self._ws_staging = SharedStaging(max_bucket_bytes(self._buckets), self.trainer.device)
            spec["handle"] = self._ws_staging.handle
        return spec

    def join_weight_sync(self, spec: dict[str, Any]) -> None:
        """A sender joins its group as rank 0."""
        from prime.rollout.weight_transfer import join_channel

        self._channel = join_channel(spec, 0, node_ip(), store=self._ws_store, staging=self._ws_staging)

    def send_weights(self) -> dict[str, float] | None:
        """Every rank: stream the weights bucket by bucket (under ZeRO-3 each bucket is gathered
        collectively, so every rank walks the plan); ranks with a channel send each bucket as it
        is gathered. Returns the sender's metrics, None on ranks that only helped gather."""
        gather_s = [0.0]
        source = _timed(self.trainer.weight_buckets(self._buckets), gather_s)
        stats = None
        if self._channel is not None:
            stats = self._channel.send_stream(self._buckets, source)
        for _ in source:  # a rank without a channel gathers with the others; everyone leaves the last gather
            pass
        if stats is None:
            return None
        # The channel's seconds include the gathers it waited for; report the two apart.
        return stats | {"gather_seconds": gather_s[0], "seconds": stats["seconds"] - gather_s[0]}

    def close_weight_sync(self) -> None:
        channel = getattr(self, "_channel", None)
        if channel is not None:
            channel.close()
        self._channel = self._ws_store = self._ws_staging = None
