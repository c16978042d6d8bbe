"""Rollout role: one actor per generation engine (vLLM, or HF `generate` as a config switch)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import torch


class RolloutWorker:
    """Owns one engine for the whole run (engine start is the expensive part; weights change in place)."""

    def __init__(self, engine: str, model_path: str, engine_kwargs: dict[str, Any] | None = None,
                 env_vars: dict[str, str] | None = None) -> None:
        os.environ.update(env_vars or {})
        kwargs = dict(engine_kwargs or {})
        t0 = time.perf_counter()
        if engine == "vllm":
            from prime.rollout.vllm import VLLMEngine

            self.engine = VLLMEngine(model_path, **kwargs)
        elif engine == "hf":
            from prime.rollout.hf import HFEngine

            self.engine = HFEngine(model_path, **{k: v for k, v in kwargs.items() if k in ("dtype", "device", "seed")})
        else:
            raise ValueError(f"rollout.engine={engine!r} is not valid; choose one of 'vllm', 'hf'")
        self.start_seconds = time.perf_counter() - t0

    def ready(self) -> float:
        return self.start_seconds

    def generate(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None):
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

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def shutdown(self) -> None:
        self.engine.shutdown()
