"""Rollout role: one actor per generation engine (vLLM, or HF `generate` as a config switch)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from workers import failpoints
from workers.group import node_ip


class RolloutWorker:
    """Owns one engine for the whole run (engine start is the expensive part; weights change in place)."""

    def __init__(self, engine: str, model_path: str, engine_kwargs: dict[str, Any] | None = None) -> None:
        kwargs = dict(engine_kwargs or {})
        t0 = time.perf_counter()
        if engine == "vllm":
            from prime.rollout.vllm import VLLMEngine

            self.engine = VLLMEngine(model_path, **kwargs)
        elif engine == "hf":
            from prime.rollout.hf import HFEngine

            self.engine = HFEngine(model_path, **kwargs)
        else:
            raise ValueError(f"rollout.engine={engine!r} is not valid; choose one of 'vllm', 'hf'")
        self.start_seconds = time.perf_counter() - t0

    def ready(self) -> float:
        return self.start_seconds

    def generate(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None):
        failpoints.reach("rollout.generate")
        t0 = time.perf_counter()
        out = self.engine.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed)
        return out, time.perf_counter() - t0

    def score_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return self.engine.score_logprobs(prompt_ids, response_ids)

    def load_weights(self, named_tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> float:
        t0 = time.perf_counter()
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        self.engine.load_weights(items)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ broadcast weight sync (workers/weight_sync.py)
    def transport_info(self) -> dict[str, Any]:
        from prime.rollout.weight_transfer import transport_info

        return transport_info(node_ip())

    def join_weight_sync(self, host: str, port: int, rank: int, world_size: int, backend: str, buckets: list,
                         timeout_s: float) -> None:
        """Join the weight-sync group as a receiver; `buckets` is the sender's plan (fixed for the run)."""
        from prime.rollout.weight_transfer import BroadcastChannel

        self._channel = BroadcastChannel(host, port, rank, world_size, backend, node_ip(), timeout_s=timeout_s)
        self._buckets = buckets

    def receive_weights(self) -> dict[str, float]:
        """Receive one broadcast sync and load it into the engine in place.

        With vLLM the tensors then travel to the engine workers through `load_weights`
        (collective_rpc).
        """
        t0 = time.perf_counter()
        named = self._channel.receive(self._buckets)
        receive_s = time.perf_counter() - t0
        load_s = self.load_weights(named)
        return {"receive_seconds": receive_s, "load_seconds": load_s}

    def close_weight_sync(self) -> None:
        channel = getattr(self, "_channel", None)
        if channel is not None:
            channel.close()
        self._channel = None

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def shutdown(self) -> None:
        self.engine.shutdown()
