"""Rollout role: one actor per generation engine (vLLM, or HF `generate` as a config switch)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from workers import failpoints
from workers.group import node_ip
from workers.lane import LaneServer


class RolloutWorker(LaneServer):
    """Owns one engine for the whole run (engine start is the expensive part; weights change in place).

    For the streaming weight sync the engine's own processes join the group (vLLM's workers, or
    this actor for the HF engine, whose model lives here); this actor only passes the calls on.
    """

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
                 top_p: float = 1.0, seed: int | None = None, logprobs: bool = True):
        """One list of `n` completions per prompt, the seconds it took, and the wall clock (`time.time()`)
        at its end."""
        failpoints.reach("rollout.generate")
        t0 = time.perf_counter()
        out = self.engine.generate(prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed, logprobs=logprobs)
        return out, time.perf_counter() - t0, time.time()

    def score_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return self.engine.score_logprobs(prompt_ids, response_ids)

    def load_weights(self, named_tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> float:
        t0 = time.perf_counter()
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        self.engine.load_weights(items)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ streaming weight sync (workers/weight_sync.py)
    def weight_sync_receivers(self) -> int:
        """Processes of this engine that join a weight-sync group (one per tensor-parallel rank)."""
        return self.engine.receivers

    def transport_infos(self) -> list[dict[str, Any]]:
        return self.engine.transport_infos(node_ip())

    def join_weight_sync(self, spec: dict[str, Any], first_rank: int, plan: list) -> list[int]:
        """The engine's processes join the group `spec` from rank `first_rank` on; `plan` is the
        sender's bucket plan in wire form (fixed for the run)."""
        return self.engine.join_weight_sync(spec, first_rank, plan, node_ip())

    def receive_weights(self) -> dict[str, float]:
        """Receive one sync; every bucket is loaded into the engine as it lands."""
        return self.engine.receive_weights()

    def close_weight_sync(self) -> None:
        self.engine.close_weight_sync()

    def memory(self, reset_peak: bool = False) -> list[dict[str, int]]:
        """RSS and peak RSS of every process that receives weights (bytes)."""
        return self.engine.memory(reset_peak)

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.wake_up(tags)

    def shutdown(self) -> None:
        self.engine.shutdown()
