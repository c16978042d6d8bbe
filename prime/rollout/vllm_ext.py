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

The in-process CPU engine (`VLLMEngine(in_process=True)`, the rollout actors' CPU default) takes a
shorter path. It is built under `keep_cpu_linear_weights`, so vLLM's CPU linear layers keep their
plain weight beside the oneDNN kernel they pack from it (by default vLLM frees it). The update then
writes every bucket straight into those weights with `model.load_weights`, and at the end repacks
once with vLLM's own post-load step (`process_weights_after_loading`). That skips the layerwise
bookkeeping. In tiny-preset training steps (2 layers, 10 packed matrices) the engine's reload,
`weight_sync/load_seconds`, fell from 39-45 ms to 24 ms; a small-preset reload (4 layers), timed
alone, from 60-70 ms to about 50 ms. Repacking is most of what is left. The cost is one more copy
of the linear weights in the engine's memory: 62 MB for the small preset's 15.5M fp32 parameters,
6 GB for a 1.5B-parameter fp32 model. `update_path` says which path an engine takes: "direct"
needs the CPU platform, plain weights kept and no quantised layer; anything else is "layerwise".
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

EXTENSION = "prime.rollout.vllm_ext.WeightSyncExtension"
_LM_HEAD = "lm_head.weight"


def _load_context():
    """vLLM's guard that skips its multi-token-prediction completeness check for partial loads."""
    try:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
    except ImportError:
        return contextlib.nullcontext()
    return disable_mtp_completeness_check()


@contextlib.contextmanager
def keep_cpu_linear_weights():
    """While active, vLLM's CPU linear layers keep their plain weight when they pack it for oneDNN.

    vLLM's unquantised CPU linear method calls `dispatch_cpu_unquantized_gemm(layer,
    remove_weight=True)` after loading: it packs `layer.weight` into a kernel and frees it. With
    the weight kept, a later `model.load_weights` can write new values into it in place and a
    repack (vLLM's `process_weights_after_loading`) brings the kernels up to date; see the
    module docstring. Only for the process that loads the model (the in-process engine)."""
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm

    def keep(layer, remove_weight: bool) -> None:
        dispatch(layer, remove_weight=False)

    utils.dispatch_cpu_unquantized_gemm = keep
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = dispatch


def update_path(model) -> str:
    """"direct" when `model` can take new weights by plain `load_weights` plus a repack: the CPU
    platform, no quantised layer, and every packed CPU kernel's plain weight still there (the
    model was loaded under `keep_cpu_linear_weights`); otherwise "layerwise"."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "layerwise"
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and not isinstance(method, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)):
            return "layerwise"
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and (weight is None or weight.numel() == 0):
            return "layerwise"
    return "direct"


def _head_is_tied(model) -> bool:
    """True when the model's `lm_head.weight` is the same parameter as another one (the embedding)."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    return head is not None and any(
        p is head for name, p in model.named_parameters(remove_duplicate=False) if not name.startswith("lm_head.")
    )


class WeightSyncExtension:
    """Methods mixed into vLLM's worker class (`self` is the worker)."""

    # ------------------------------------------------------------------ in-place update
    def _prime_plan(self) -> None:
        """Decide once how this worker takes updates (`_prime_path`, and `_prime_skip_head`: a head
        that shares the embedding's parameter is written by the embedding). Both hold for the
        worker's life: the direct path's repack keeps the plain weights, the layerwise reload drops them."""
        if not hasattr(self, "_prime_path"):
            model = self.model_runner.model
            self._prime_path = update_path(model)
            self._prime_skip_head = self._prime_path == "direct" and _head_is_tied(model)

    def prime_update_path(self) -> str:
        """How this worker takes new weights: "direct" or "layerwise" (see `update_path`)."""
        self._prime_plan()
        return self._prime_path

    def prime_begin_update(self) -> None:
        """Start an in-place update. Layerwise: later `model.load_weights` calls are buffered per
        layer. Direct: they write into the plain weights, repacked in `prime_finish_update`."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self._prime_plan()
        if self._prime_path == "layerwise":
            initialize_layerwise_reload(self.model_runner.model)

    def prime_load(self, named: list) -> None:
        """Load one bucket's (name, tensor) pairs (checkpoint names and format).

        Direct path: a head that shares the embedding's parameter is written by the embedding, so
        `lm_head.weight` is dropped (vLLM refuses a bucket that carries a tied head without its
        embedding; the layerwise reload buffers both until the layer is complete)."""
        if getattr(self, "_prime_skip_head", False):
            named = [(name, t) for name, t in named if name != _LM_HEAD]
        if named:
            with _load_context():
                self.model_runner.model.load_weights(named)

    def prime_load_blob(self, blob: bytes) -> int:
        """Load one chunk sent as safetensors bytes (the object-store path); returns its tensor count."""
        from safetensors.torch import load

        weights = load(blob)
        self.prime_load(list(weights.items()))
        return len(weights)

    def prime_finish_update(self) -> None:
        """Layerwise: process the layers not processed yet and put the kernel tensors back. Direct:
        repack every kernel from its updated weight, keeping the weights. Then drop derived caches."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        model, model_config = self.model_runner.model, self.vllm_config.model_config
        if getattr(self, "_prime_path", "layerwise") == "direct":
            with keep_cpu_linear_weights():
                process_weights_after_loading(model, model_config, self.model_runner.device)
        else:
            finalize_layerwise_reload(model, model_config)
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
