"""The receiving end of the weight sync, running inside vLLM's own worker processes.

`VLLMEngine` starts vLLM with `worker_extension_cls=EXTENSION`, which mixes `WeightSyncExtension`
into vLLM's worker class, so its methods can be called by name through `LLM.collective_rpc`
(names need no insecure serialization; arguments are plain data for vLLM's msgpack encoder). Each
worker (one per tensor-parallel rank) joins the weight-sync group itself, so the buckets land in
the process that holds the model, on its device: NCCL writes straight into the worker's GPU memory,
and no copy passes through the Ray actor that owns the engine.

Loading goes through vLLM's layerwise reload, the same calls vLLM's own weight-transfer engines
make: `initialize_layerwise_reload(model)` once, then `model.load_weights(bucket)` for every
bucket as it arrives, then `finalize_layerwise_reload`. Each layer is re-processed (the CPU
backend repacks linear weights, quantised layers re-quantise) as soon as all of its tensors have
arrived, and the buffered tensors of a completed layer are dropped, so the worker holds about one
bucket plus one layer beyond its own weights. Measured on the CPU backend with vLLM 0.32:

- separate `reload_weights` calls per tensor are wrong (a layer materialised from q_proj alone
  keeps uninitialised k/v rows); per whole layer they are right, but the plan need not respect
  layers when one reload spans all buckets, as here;
- every checkpoint tensor must be sent, `lm_head.weight` included even with tied embeddings (the
  CPU backend keeps a separate head): without it the log-probs are off by about 1 nat.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

EXTENSION = "prime.rollout.vllm_ext.WeightSyncExtension"


def _load_context():
    """vLLM's guard that skips its multi-token-prediction completeness check for partial loads."""
    try:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
    except ImportError:
        return contextlib.nullcontext()
    return disable_mtp_completeness_check()


class WeightSyncExtension:
    """Methods mixed into vLLM's worker class (`self` is the worker)."""

    # ------------------------------------------------------------------ layerwise update
    def prime_begin_update(self) -> None:
        """Start an in-place update: later `model.load_weights` calls are buffered per layer."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.model)

    def prime_load(self, named: list) -> None:
        """Load one bucket's (name, tensor) pairs (checkpoint names and format)."""
        with _load_context():
            self.model_runner.model.load_weights(named)

    def prime_load_blob(self, blob: bytes) -> int:
        """Load one chunk sent as safetensors bytes (the object-store path); returns its tensor count."""
        from safetensors.torch import load

        weights = load(blob)
        self.prime_load(list(weights.items()))
        return len(weights)

    def prime_finish_update(self) -> None:
        """Process the layers not processed yet and put the kernel tensors back; drop derived caches."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.model, self.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if fn is not None:
                fn()

    # ------------------------------------------------------------------ weight-sync group
    def prime_transport_info(self, ip: str) -> dict[str, Any]:
        from prime.rollout.weight_transfer import transport_info

        return transport_info(ip)

    def prime_join_weight_sync(self, spec: dict, first_rank: int, plan: list, bind_ip: str) -> int:
        """Join the group as rank `first_rank` + this worker's rank in its engine; returns that rank."""
        from prime.rollout.weight_transfer import buckets_from_wire, join_channel

        rank = int(first_rank) + int(self.rank)
        self._prime_buckets = buckets_from_wire(plan)
        self._prime_channel = join_channel(spec, rank, bind_ip)
        return rank

    def prime_receive_weights(self) -> dict[str, float]:
        """Receive one sync and stream it into the model bucket by bucket."""
        from prime.rollout.weight_transfer import receive_into

        t0 = time.perf_counter()
        self.prime_begin_update()
        begin_s = time.perf_counter() - t0
        stats = receive_into(self._prime_channel, self._prime_buckets, self.prime_load)
        t1 = time.perf_counter()
        self.prime_finish_update()
        stats["load_seconds"] += begin_s + time.perf_counter() - t1  # the whole reload: begin, buckets, finish
        stats["seconds"] = time.perf_counter() - t0
        return stats

    def prime_close_weight_sync(self) -> None:
        channel = getattr(self, "_prime_channel", None)
        if channel is not None:
            channel.close()
        self._prime_channel = None

    def prime_memory(self, reset_peak: bool = False) -> dict[str, int]:
        """This worker process's RSS and peak RSS in bytes; `reset_peak` resets the peak first."""
        import os

        from prime.rollout.weight_transfer import process_memory, reset_peak_memory

        if reset_peak:
            reset_peak_memory()
        return process_memory() | {"pid": os.getpid()}
