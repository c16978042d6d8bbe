"""The generation-engine interface shared by the vLLM and Hugging Face engines.

Conventions both engines follow (tests check them on the same checkpoint):

- `Completion.token_ids` are the generated ids only (no prompt, no padding). When generation
  stops on the eos token, that eos id IS the last element of `token_ids` (vLLM's behaviour), and
  `finish_reason == "stop"`; otherwise `finish_reason == "length"` and
  `len(token_ids) == max_new_tokens`. An eos sampled as the very last allowed token counts as
  "stop".
- `Completion.text` is the decoded `token_ids` with special tokens skipped (so no `<|im_end|>`).
- `Completion.logprobs[i]` (empty when `generate` is called with `logprobs=False`) is the
  log-prob of `token_ids[i]` under the distribution it was
  actually sampled from: log_softmax(logits / temperature) after top-p filtering, i.e.
  renormalised over the nucleus. With `top_p == 1.0` this equals what
  `prime.models.logprobs.response_logprobs(..., temperature=temperature)` computes for the same
  tokens; with `top_p < 1` it is larger or equal (the nucleus mass is < 1). Greedy decoding
  (`temperature == 0`) returns the unscaled log_softmax(logits).
- `generate` returns one list of `n` completions per prompt, in prompt order.
- `score_logprobs(prompt_ids, response_ids)` returns log_softmax(logits)[token] (temperature 1,
  no filtering) for every token of a fixed response: the engine-side check that weights match.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

FINISH_REASONS = ("stop", "length")


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    prompt_ids: list[int]
    """The prompt token ids it continues."""
    token_ids: list[int]
    """Generated token ids, including the final eos id when it stopped on eos."""
    text: str
    """Decoded `token_ids`, special tokens skipped."""
    logprobs: list[float]
    """Sampling log-prob of each generated token (same length as `token_ids`; empty when not asked for)."""
    finish_reason: str
    """"stop" (eos generated) or "length" (max_new_tokens reached)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the rollout worker needs from a generation backend."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        logprobs: bool = True,
    ) -> list[list[Completion]]:
        """Sample `n` completions for every prompt; one list of n per prompt, in order. `logprobs=False`:
        the completions carry no log-probs (`Completion.logprobs == []`)."""
        ...

    def score_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Log-probs (temperature 1) of each fixed response token given its prompt."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights (checkpoint names) into the running engine, in place."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory between rollouts (no-op where unsupported)."""
        ...

    def wake_up(self, tags: list[str] | tuple[str, ...] | None = None) -> None:
        """Undo `sleep` for "weights" and/or "kv_cache" (None: both; no-op where unsupported)."""
        ...

    # The streaming weight sync (`prime/rollout/weight_transfer.py`); the processes that hold the
    # model join the group themselves.
    receivers: int
    """How many processes of this engine join a weight-sync group."""

    def transport_infos(self, ip: str) -> list[dict]:
        """Address and GPU identity of each receiving process."""
        ...

    def join_weight_sync(self, spec: dict, first_rank: int, plan: list, bind_ip: str) -> list[int]:
        """Join the group `spec` from rank `first_rank` on; returns the ranks taken."""
        ...

    def receive_weights(self) -> dict[str, float]:
        """Receive one sync bucket by bucket, loading each bucket as it lands."""
        ...

    def close_weight_sync(self) -> None:
        ...

    def shutdown(self) -> None:
        """Free the engine; it cannot be used afterwards."""
        ...


def check_sampling_args(
    prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    """Raise ValueError naming the bad value for out-of-range sampling arguments."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; pass at least one prompt")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_score_args(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> None:
    """Raise ValueError for mismatched or empty score_logprobs inputs."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(response_ids)} responses; they must pair up")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if len(r) == 0:
            raise ValueError(f"response {i} is empty; nothing to score")
